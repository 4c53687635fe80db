"""A Docker Desktop on one Linux box, built from network namespaces.

Used by the root tests, the demo and the perf harness (docs/testing.md):

    from lab import Lab

    with Lab(bridges=2, containers_per_bridge=1) as lab:
        c1 = lab.containers[0]
        lab.run(lab.vm_ns, "ping", "-c1", "-W1", c1.ip)

Modules: `netns` (ip command primitives), `processes` (stopping what the lab
started), `firewall` (Docker 28's iptables rules), `topology` (the Lab),
`guard` (teardown at exit and on SIGTERM), `tcpcheck` (a checksummed TCP
transfer CLI) and `pytest_support` (skip or fail when not root).
"""

from .netns import CommandError, LabError
from .topology import Bridge, Container, Lab

__all__ = ["Bridge", "CommandError", "Container", "Lab", "LabError"]
