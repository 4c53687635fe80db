"""What both sides open before the supervisor starts: TUN queues and UDP.

Opening happens in the process the user started, so a missing privilege or
a busy port is reported as one line before anything else is set up, and
nothing is left half made.
"""

import errno
import os
import socket

from fastfwd import linux
from fastfwd.errors import DeviceError, PermissionProblem, TransportError

SOCKET_BUFFER_BYTES = 4 << 20


def open_tun(name, queues):
    """Open ``queues`` queues of a new TUN device; returns ``(fds, name)``."""
    if not os.path.exists(linux.TUN_PATH):
        raise DeviceError(
            f"{linux.TUN_PATH} does not exist: load the tun module (modprobe tun) "
            "or pass the device to the container (--device /dev/net/tun)"
        )
    fds = []
    try:
        fd, actual = linux.open_tun_queue(name)
        fds.append(fd)
        for _ in range(queues - 1):
            fds.append(linux.open_tun_queue(actual)[0])
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        if linux.is_permission_error(exc):
            raise PermissionProblem(
                f"cannot create TUN device {name}: {exc.strerror} "
                "(run as root or grant CAP_NET_ADMIN)"
            ) from exc
        if exc.errno == errno.EBUSY:
            raise DeviceError(
                f"cannot create TUN device {name}: it exists and is in use "
                "(another fastfwd running?)"
            ) from exc
        raise DeviceError(f"cannot create TUN device {name}: {exc.strerror}") from exc
    return fds, actual


def _tune(sock):
    # Large buffers absorb bursts at line rate; the kernel caps them at
    # net.core.{r,w}mem_max unless we are privileged enough to force them.
    for opt, force in ((socket.SO_RCVBUF, 33), (socket.SO_SNDBUF, 32)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER_BYTES)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)


def bind_udp(host, port):
    """The host side's UDP socket, bound to ``host:port``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        hint = " (another fastfwd or connector running?)" if exc.errno == errno.EADDRINUSE else ""
        raise TransportError(f"cannot listen on UDP {host}:{port}: {exc.strerror}{hint}") from exc
    _tune(sock)
    sock.setblocking(False)
    return sock


def dial_udp():
    """The VM side's UDP socket: bound to an ephemeral port, not yet connected.

    The control process connects it once the host's name resolves.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(("0.0.0.0", 0))
    except OSError as exc:
        sock.close()
        raise TransportError(f"cannot create a UDP socket: {exc.strerror}") from exc
    _tune(sock)
    sock.setblocking(False)
    return sock
