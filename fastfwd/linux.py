"""Everything fastfwd asks of the Linux kernel directly (ioctls, prctl).

The rest of the data plane calls these functions and nothing else that is
Linux specific, so another host platform replaces this one module.
"""

import ctypes
import errno
import fcntl
import os
import signal
import socket
import stat
import struct

TUN_PATH = "/dev/net/tun"
TUN_MAJOR, TUN_MINOR = 10, 200

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFF_VNET_HDR = 0x4000
IFF_TUN_EXCL = 0x8000
IFNAMSIZ = 16

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
# struct virtio_net_hdr: flags, gso_type, hdr_len, gso_size, csum_start,
# csum_offset; in the host's byte order (both ends are little-endian in
# practice).
VNET_HDR_BYTES = 10
VNET_HDR_F_NEEDS_CSUM = 0x01
VNET_GSO_NONE = 0

# Socket buffer sizes past net.core.{r,w}mem_max (needs CAP_NET_ADMIN).
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
# UDP segmentation offload: one send of equal-sized datagrams (Linux 4.18)
# and their coalesced receive (Linux 5.0).
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
IP_MTU = 14  # getsockopt on a connected socket: the path MTU
UDP_IP_OVERHEAD = 28  # IPv4 header without options + UDP header
IPPROTO_IP, IP_PKTINFO = 0, 8
_PKTINFO = struct.Struct("=I4s4s")  # struct in_pktinfo: ifindex, spec_dst, addr

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15


def send_from(local):
    """Control messages that make a datagram leave from the IPv4 address
    ``local`` (text; "" for none: the kernel picks)."""
    if not local:
        return []
    packed = socket.inet_aton(local)
    return [(IPPROTO_IP, IP_PKTINFO, _PKTINFO.pack(0, packed, b"\0\0\0\0"))]


def pktinfo_destination(data):
    """The address a received datagram was sent to, from its IP_PKTINFO."""
    return socket.inet_ntoa(_PKTINFO.unpack(bytes(data))[2])


def udp_payload_limit(addr):
    """The largest UDP payload that reaches ``addr`` unfragmented (path MTU
    minus headers), from a throw-away connected socket."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.connect(addr)
        return sock.getsockopt(socket.IPPROTO_IP, IP_MTU) - UDP_IP_OVERHEAD
    finally:
        sock.close()


def ensure_tun_node():
    """Create /dev/net/tun when a container was started without it.

    Returns True when the node had to be created. Needs CAP_MKNOD.
    """
    if os.path.exists(TUN_PATH):
        return False
    os.makedirs(os.path.dirname(TUN_PATH), exist_ok=True)
    os.mknod(TUN_PATH, 0o600 | stat.S_IFCHR, os.makedev(TUN_MAJOR, TUN_MINOR))
    return True


def open_tun_queue(name, multi_queue=True, vnet_hdr=False, create=False):
    """Open one queue of TUN device ``name``.

    With ``create`` the device must not exist yet (IFF_TUN_EXCL; EBUSY
    otherwise): a multi-queue device would otherwise quietly take a second
    process as one more queue. Later queues of the same device are opened
    without it.

    Returns ``(fd, actual_name)``. The fd is non-blocking and close-on-exec;
    the device lives as long as some queue fd is open (it is not persistent),
    so every route and address on it vanishes with the last fd. Raises
    OSError with the kernel's errno.
    """
    flags = IFF_TUN | IFF_NO_PI
    if multi_queue:
        flags |= IFF_MULTI_QUEUE
    if vnet_hdr:
        flags |= IFF_VNET_HDR
    if create:
        flags |= IFF_TUN_EXCL
    fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        ifr = struct.pack("16sH22x", name.encode(), flags)
        res = fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError:
        os.close(fd)
        raise
    actual = res[:IFNAMSIZ].split(b"\0", 1)[0].decode()
    return fd, actual


def set_offload(fd, enabled):
    """Let the kernel hand over (and accept) TCP super-packets on the device.

    With ``enabled``, reads return up to 64 KiB packets that still need
    segmentation, described by their virtio-net header, and checksums may be
    left to the receiver. Applies to every queue of the device. Returns the
    offload flags the kernel accepted (0 when disabled); raises OSError when
    the device was not opened with a virtio-net header.
    """
    if not enabled:
        fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
        return 0
    for flags in (
        TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN,
        TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6,
        TUN_F_CSUM,
    ):
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
            return flags
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    raise OSError(errno.EINVAL, "the TUN device accepts no offload")


def valid_ifname(name):
    """Whether ``name`` is acceptable as a Linux interface name."""
    return (
        0 < len(name.replace("%d", "0")) < IFNAMSIZ
        and "/" not in name
        and not any(c.isspace() for c in name)
        and name not in (".", "..")
    )


_libc = None


def _prctl(option, arg):
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def die_with_parent(parent_pid):
    """Ask the kernel to SIGTERM this process when its parent dies.

    The check against ``parent_pid`` closes the race where the parent died
    before the request was made.
    """
    _prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)


def set_process_name(name):
    """Name the process as ``ps`` and ``top`` show it (15 bytes at most)."""
    try:
        buf = ctypes.create_string_buffer(name.encode()[:15])
        global _libc
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        _libc.prctl(PR_SET_NAME, buf, 0, 0, 0)
    except OSError:
        pass


def is_permission_error(exc):
    return isinstance(exc, OSError) and exc.errno in (errno.EPERM, errno.EACCES)
