"""Names for containers in the lab: the host publishes a hosts file with
``hosts FILE SUFFIX``, the VM side answers the containers' DNS queries
(redirected from port 53 on their bridge) and forwards the rest to a fake
nameserver inside the vm namespace (127.0.0.1:53, the lab's resolv.conf)."""

import threading
import time

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from lab.nsocket import socket_in
from lab.pytest_support import root_marks
from lab.tunnel import Tunnel
from tests.e2e.test_interop import PORT, recv, wait_for

pytestmark = root_marks()

HOST_TUN_IP = "192.168.251.2"
UPSTREAM_IP = "10.9.9.9"


class FakeNameserver:
    """Answers every query with an A record of UPSTREAM_IP, from a socket
    bound to 127.0.0.1:53 inside namespace ``ns``."""

    def __init__(self, ns):
        self.sock = socket_in(ns)
        self.sock.bind(("127.0.0.1", 53))
        self.sock.settimeout(0.1)
        self.asked = []
        self.stopping = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stopping:
            try:
                data, addr = self.sock.recvfrom(65535)
            except (TimeoutError, OSError):
                continue
            query = dns.message.from_wire(data)
            question = query.question[0]
            self.asked.append(question.name.to_text())
            response = dns.message.make_response(query)
            if question.rdtype == dns.rdatatype.A:
                response.answer.append(
                    dns.rrset.from_text(question.name, 60, "IN", "A", UPSTREAM_IP)
                )
            self.sock.sendto(response.to_wire(), addr)

    def close(self):
        self.stopping = True
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def nameserver(lab):
    ns = FakeNameserver(lab.vm_ns)
    yield ns
    ns.close()


def query(container, name, rdtype="A", timeout_s=1.0):
    """Ask the container's gateway on port 53, from inside the container;
    ``(rcode, [record text, ...])`` or None without an answer."""
    sock = socket_in(container.ns)
    sock.setblocking(False)  # dnspython waits for readiness itself
    try:
        response = dns.query.udp(
            dns.message.make_query(name, rdtype), str(container.bridge.gateway),
            port=53, sock=sock, timeout=timeout_s,
        )  # fmt: skip
    except (dns.exception.Timeout, OSError):
        return None
    finally:
        sock.close()
    return dns.rcode.to_text(response.rcode()), [
        r.to_text() for rrset in response.answer for r in rrset
    ]


def wait_answer(container, name, expected, rdtype="A", timeout_s=15.0):
    deadline = time.monotonic() + timeout_s
    got = None
    while time.monotonic() < deadline:
        got = query(container, name, rdtype)
        if got == expected:
            return got
        time.sleep(0.2)
    return got


def redirects(lab):
    text = lab.iptables(lab.vm_ns, "-t", "nat", "-S", "PREROUTING")
    return [
        line for line in text.splitlines() if "REDIRECT" in line and "fastfwd:" in line
    ]


def test_containers_resolve_published_names_and_the_rest_is_forwarded(
    lab, tmp_path, nameserver
):
    hosts = tmp_path / "hosts"
    hosts.write_text(
        "127.0.0.1 localhost app.dev.test\n"
        "::1 localhost app.dev.test\n"
        "10.0.0.5 db.dev.test\n"
        "10.0.0.6 fakedev.test\n"
    )
    t = Tunnel(lab, tmp_path / "t", lines=[f"hosts {hosts} dev.test"])
    t.start()
    c1, c2 = lab.containers
    try:
        ok = ("NOERROR", [HOST_TUN_IP])
        assert wait_answer(c1, "app.dev.test", ok) == ok, t.logs()
        assert wait_answer(c2, "app.dev.test", ok) == ok, t.logs()  # every bridge
        assert query(c1, "2.251.168.192.in-addr.arpa", "PTR") == (
            "NOERROR",
            ["app.dev.test."],
        )
        assert query(c1, "app.dev.test", "AAAA") == ("NOERROR", [])
        assert query(c1, "db.dev.test") == ("NOERROR", ["10.0.0.5"])
        assert query(c1, "nope.dev.test") == ("NXDOMAIN", [])
        assert nameserver.asked == []

        # not under the suffix: not ours, whatever the hosts file says
        assert query(c1, "fakedev.test") == ("NOERROR", [UPSTREAM_IP])
        assert query(c2, "example.org") == ("NOERROR", [UPSTREAM_IP])
        assert nameserver.asked == ["fakedev.test.", "example.org."]

        rules = redirects(lab)
        assert sorted(r.split("-i ")[1].split()[0] for r in rules) == sorted(
            b.name for b in lab.bridges
        )
        assert all("-p udp" in r and "--dport 53" in r for r in rules)

        # an edited hosts file: a changed address, a removed name
        new = tmp_path / "hosts.new"
        new.write_text("10.0.0.8 app.dev.test\n")
        new.replace(hosts)
        assert wait_answer(c1, "app.dev.test", ("NOERROR", ["10.0.0.8"])) == (
            "NOERROR",
            ["10.0.0.8"],
        ), t.logs()
        assert query(c1, "db.dev.test") == ("NXDOMAIN", [])
        # no name for the old address any more: forwarded
        assert query(c1, "2.251.168.192.in-addr.arpa", "PTR") == ("NOERROR", [])
        assert nameserver.asked[-1] == "2.251.168.192.in-addr.arpa."

        # the directive removed: no suffix served, no redirect left
        t.write_config([])
        assert wait_for(lambda: redirects(lab) == []), t.logs()
        assert query(c1, "app.dev.test") is None  # nothing listens on the gateway
    finally:
        t.stop()
    assert redirects(lab) == []


def test_vm_side_serves_names_pushed_by_an_upstream_host(lab, tmp_path, nameserver):
    fake_host = socket_in(lab.host_ns)
    fake_host.bind((str(lab.host_ip), PORT))
    t = Tunnel(lab, tmp_path / "t")
    t.start_vm()
    try:
        beat, vm_addr = recv(fake_host, 10)
        assert beat == b"\x00"
        body = f"dns dev.test,host {HOST_TUN_IP} app.dev.test".encode()
        fake_host.sendto(bytes([1, len(body) >> 8, len(body) & 0xFF]), vm_addr)
        for i in range(0, len(body), 8):  # the body split over several datagrams
            fake_host.sendto(body[i : i + 8], vm_addr)

        c1 = lab.containers[0]
        ok = ("NOERROR", [HOST_TUN_IP])
        assert wait_answer(c1, "app.dev.test", ok) == ok, t.logs()
        assert query(c1, "other.dev.test") == ("NXDOMAIN", [])
        assert query(c1, "example.org") == ("NOERROR", [UPSTREAM_IP])

        # the upstream's "dns -SUFFIX": no longer served, redirect removed
        body = b"dns -dev.test"
        fake_host.sendto(bytes([1, 0, len(body)]), vm_addr)
        fake_host.sendto(body, vm_addr)
        assert wait_for(lambda: redirects(lab) == []), t.logs()
    finally:
        t.stop()
        fake_host.close()
