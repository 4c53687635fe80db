"""What both sides open before the supervisor starts: TUN queues and UDP.

Opening happens in the process the user started, so a missing privilege or
a busy port is reported as one line before anything else is set up, and
nothing is left half made.
"""

import errno
import os
import socket
import time

from fastfwd import linux
from fastfwd.errors import DeviceError, PermissionProblem, TransportError

SOCKET_BUFFER_BYTES = 4 << 20


def open_tun(name, queues, vnet_hdr=False):
    """Open ``queues`` queues of a new TUN device.

    Returns ``(fds, name, vnet_hdr)``. With ``vnet_hdr`` every packet on the
    device carries a virtio-net header (needed to carry offloaded
    super-packets) if the kernel allows it; the third value says whether it
    does. Offloads themselves stay off until a peer can take them.
    """
    if not os.path.exists(linux.TUN_PATH):
        raise DeviceError(
            f"{linux.TUN_PATH} does not exist: load the tun module (modprobe tun) "
            "or pass the device to the container (--device /dev/net/tun)"
        )
    if vnet_hdr:
        try:
            return _open_queues(name, queues, True) + (True,)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise _tun_error(name, exc) from exc
    try:
        return _open_queues(name, queues, False) + (False,)
    except OSError as exc:
        raise _tun_error(name, exc) from exc


BUSY_WAIT_S = 5.0


def _open_queues(name, queues, vnet_hdr):
    """Open the queues; a device still held by an instance that is shutting
    down (EBUSY) is waited for, up to BUSY_WAIT_S."""
    deadline = time.monotonic() + BUSY_WAIT_S
    while True:
        try:
            return _open_queues_once(name, queues, vnet_hdr)
        except OSError as exc:
            if (
                exc.errno not in (errno.EBUSY, errno.EEXIST)
                or time.monotonic() > deadline
            ):
                raise
            time.sleep(0.1)


def _open_queues_once(name, queues, vnet_hdr):
    fds = []
    try:
        fd, actual = linux.open_tun_queue(name, vnet_hdr=vnet_hdr, create=True)
        fds.append(fd)
        for _ in range(queues - 1):
            fds.append(linux.open_tun_queue(actual, vnet_hdr=vnet_hdr)[0])
    except OSError:
        for fd in fds:
            os.close(fd)
        raise
    return fds, actual


def _tun_error(name, exc):
    if linux.is_permission_error(exc):
        return PermissionProblem(
            f"cannot create TUN device {name}: {exc.strerror} "
            "(run as root or grant CAP_NET_ADMIN)"
        )
    if exc.errno in (errno.EBUSY, errno.EEXIST):
        return DeviceError(
            f"cannot create TUN device {name}: it exists and is in use "
            "(another fastfwd running?)"
        )
    return DeviceError(f"cannot create TUN device {name}: {exc.strerror}")


def tune_socket(sock):
    # Large buffers absorb bursts at line rate; the kernel caps them at
    # net.core.{r,w}mem_max unless we are privileged enough to force them.
    for opt, force in (
        (socket.SO_RCVBUF, linux.SO_RCVBUFFORCE),
        (socket.SO_SNDBUF, linux.SO_SNDBUFFORCE),
    ):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER_BYTES)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)
    # Runs of equal-sized datagrams from one sender arrive as one buffer
    # (fastfwd's readers send them with UDP_SEGMENT); the writer splits them.
    try:
        sock.setsockopt(linux.SOL_UDP, linux.UDP_GRO, 1)
    except OSError:
        pass  # LIMIT: before Linux 5.0 each datagram is received alone.


def bind_udp(host, port, count=1):
    """The host side's UDP sockets, one per worker, all bound to ``host:port``.

    Several sockets share the port through SO_REUSEPORT; the kernel then
    spreads the peer's worker sockets over them by address hash.
    """
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(sock)
            if count > 1:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            tune_socket(sock)
            sock.setblocking(False)
    except OSError as exc:
        for sock in socks:
            sock.close()
        hint = (
            " (another fastfwd or connector running?)"
            if exc.errno == errno.EADDRINUSE
            else ""
        )
        raise TransportError(
            f"cannot listen on UDP {host}:{port}: {exc.strerror}{hint}"
        ) from exc
    return socks


def dial_udp(count=1):
    """The VM side's UDP sockets, one per worker, each on its own ephemeral
    port and not yet connected: the control process connects them once the
    host's name resolves. Distinct ports let the host's kernel spread them.
    """
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(sock)
            sock.bind(("0.0.0.0", 0))
            tune_socket(sock)
            sock.setblocking(False)
    except OSError as exc:
        for sock in socks:
            sock.close()
        raise TransportError(f"cannot create a UDP socket: {exc.strerror}") from exc
    return socks
