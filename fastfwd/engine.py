"""The forwarding engine: the hot loops of the reader and writer processes.

Reader, TUN queue k -> UDP:
  1. the event loop reports the TUN queue readable;
  2. one packet is read into the preallocated buffer, ``headroom`` bytes in;
  3. the framing fills the headroom (upstream-compatible framing uses none);
  4. the datagram goes to the peer; if the socket is full the datagram stays
     pending, reading TUN stops and the loop waits for the socket to drain,
     so the kernel's TUN queue fills and TCP backs off instead of losing
     packets inside fastfwd;
  5. repeat until TUN would block or the batch budget is spent; count once.

Writer, UDP -> TUN queue k:
  1. the event loop reports the UDP socket readable;
  2. one datagram is received into the preallocated buffer (or a run of
     them that UDP_GRO joined, taken apart in :meth:`Writer._write_run`);
  3. an IP packet or OFFLOAD frame from the peer is written to the TUN
     queue as it is;
  4. anything else leaves the fast path (:meth:`Writer._slow_path`):
     heartbeats, control frames and logins go to the control process over
     its channel, never blocking; garbage is dropped and counted;
  5. repeat until the socket would block or the budget is spent; count once.

Both loops are single-threaded and owned by their process's event loop;
nothing here may be called from another thread.
"""

import errno
import ipaddress
import logging
import os
import sys
import time

from control import messages
from fastfwd import frames, linux, packets
from fastfwd import stats as st

log = logging.getLogger(__name__)

BATCH_PKTS = 256
# COMPAT batching: room for one packet (MTU < 2000), the buffer for a run
# (UDP length limit), and the kernel's limit on segments per send.
SLOT_BYTES = 2048
BATCH_BUFFER_BYTES = 65507
MAX_SEGMENTS = 64
SOL_UDP, UDP_SEGMENT, UDP_GRO = linux.SOL_UDP, linux.UDP_SEGMENT, linux.UDP_GRO
_GRO_CMSG_BYTES = 64  # room for the UDP_GRO control message (a u16 segment size)
# A TUN super-packet (gso_max_size is kept below 64 KiB) plus its header.
BUFFER_BYTES = 65536 + 64
CONTROL_BODY_TIMEOUT_NS = 1_000_000_000
# The smallest IP packet (an IPv4 header); shorter "packets" are garbage.
MIN_PACKET_BYTES = 20
# Frames from addresses that are not the peer reach the control process at
# this rate at most; the rest are dropped and counted.
STRANGER_FRAMES_PER_S = 50.0
STRANGER_BURST = 100.0
# The expose port (logins): each source address gets a small budget, all of
# them together a larger one.
EXPOSE_SOURCE_PER_S, EXPOSE_SOURCE_BURST = 5.0, 10.0
EXPOSE_SOURCES_TRACKED = 4096
EXPOSE_PER_S, EXPOSE_BURST = 100.0, 200.0


# Reader framings: how a packet read from TUN becomes a datagram.
COMPAT = "compat"  # one IP packet per datagram, exactly as the upstream
OFFLOAD = "offload"  # OFFLOAD frame byte + virtio-net header + super-packet

_VNET = linux.VNET_HDR_BYTES
OFFLOAD_FRAME = frames.OFFLOAD


class Reader:
    """Carries packets from one TUN queue to the UDP socket.

    Each datagram goes to the address set with :meth:`set_peer`; with
    ``connected`` the socket is connected to the peer and ``send`` is used
    instead (fastfwd's own sides keep their sockets unconnected, see
    :class:`Writer`). ``vnet_hdr`` says the TUN queue was opened
    with IFF_VNET_HDR, so every read starts with a virtio-net header.

    Buffer layout with a virtio-net header: the packet is read at offset 1,
    so ``buf[0]`` holds the OFFLOAD frame byte, ``buf[1:11]`` the header and
    ``buf[11:]`` the packet. In OFFLOAD framing the datagram is ``buf[0:]``;
    in COMPAT framing it is ``buf[11:]``, the bare packet, and a packet that
    still needs segmentation (left over from a switch of framing) is dropped
    and counted, since a compatible peer cannot take it.
    """

    def __init__(
        self, loop, tun_fd, sock, counters, *, connected, vnet_hdr=False, gso=False
    ):
        self._loop = loop
        self._tun_fd = tun_fd
        # A raw FileIO returns None instead of raising when the fd would block.
        self._tun = open(tun_fd, "rb", buffering=0, closefd=False)
        self._sock = sock
        self._c = counters
        self._connected = connected
        self._vnet = vnet_hdr
        self._buf = bytearray(BUFFER_BYTES)
        self._buf[0] = frames.OFFLOAD
        self._view = memoryview(self._buf)
        self._rx_view = self._view[1:] if vnet_hdr else self._view
        self._peer = None
        self._pending = (self._view, 0, 0, 0)
        # COMPAT batching: equal-sized packets gathered back to back and sent
        # with one UDP_SEGMENT call (see _drain_batched).
        self._gso = gso
        self._batch = bytearray(BATCH_BUFFER_BYTES)
        self._batch_view = memoryview(self._batch)
        self._hdr = bytearray(_VNET)
        self.set_frame_segments(0)
        self.set_framing(COMPAT)

    def start(self):
        self._loop.add_reader(self._tun_fd, self._on_tun_readable)

    def stop(self):
        self._loop.remove_reader(self._tun_fd)
        self._loop.remove_writer(self._sock.fileno())

    def set_peer(self, addr):
        """Send to ``addr`` (an ``(ip, port)`` tuple) from now on; None stops."""
        self._peer = addr

    def set_frame_segments(self, seg):
        """Send OFFLOAD frames as UDP_SEGMENT runs of ``seg``-byte datagrams
        (the largest payload the path carries unfragmented); 0 sends each
        frame as one datagram, which the underlay fragments."""
        self._frame_seg = seg
        self._frame_cmsg = (
            [(SOL_UDP, UDP_SEGMENT, seg.to_bytes(2, sys.byteorder))] if seg else []
        )

    def set_framing(self, framing):
        """Switch between COMPAT and OFFLOAD (OFFLOAD needs ``vnet_hdr``)."""
        if framing == OFFLOAD and not self._vnet:
            raise ValueError("offload framing needs a TUN opened with IFF_VNET_HDR")
        self.framing = framing
        if not self._vnet:
            self._start, self._end_extra, self._check_gso = 0, 0, False
        elif framing == OFFLOAD:
            self._start, self._end_extra, self._check_gso = 0, 1, False
        else:
            self._start, self._end_extra, self._check_gso = 1 + _VNET, 1, True

    def _on_tun_readable(self):
        if self._gso and self.framing == COMPAT:
            self._drain_batched()
            return
        readinto = self._tun.readinto
        buf, rx_view, view = self._buf, self._rx_view, self._view
        sock, peer, connected = self._sock, self._peer, self._connected
        start, extra, check_gso = self._start, self._end_extra, self._check_gso
        # OFFLOAD frames longer than one datagram of the path go out as a
        # UDP_SEGMENT run (GSO frames) when the peer takes them that way.
        seg = self._frame_seg if self.framing == OFFLOAD else 0
        cmsg = self._frame_cmsg
        pkts = out_bytes = in_bytes = no_peer = io_errors = received = bad = 0
        for _ in range(BATCH_PKTS):
            n = readinto(rx_view)
            if n is None:
                break
            received += 1
            in_bytes += n
            if check_gso and buf[2] != 0:  # gso_type: needs segmentation
                bad += 1
                continue
            end = n + extra
            try:
                if seg and end - start > seg and peer is not None:
                    try:
                        sock.sendmsg([view[start:end]], cmsg, 0, peer)
                    except BlockingIOError:
                        raise
                    except OSError as exc:
                        if exc.errno not in _NO_FRAME_GSO:
                            raise
                        # The kernel refuses UDP segmentation, or the path's
                        # MTU shrank below the segment size: whole
                        # datagrams, fragmented, until the control process
                        # says a new size.
                        self.set_frame_segments(0)
                        seg = 0
                        sock.sendto(view[start:end], peer)
                elif connected:
                    sock.send(view[start:end])
                elif peer is not None:
                    sock.sendto(view[start:end], peer)
                else:
                    no_peer += 1
                    continue
            except BlockingIOError:
                self._pause(view, start, end)
                break
            except OSError as exc:
                if exc.errno in _NOT_CONNECTED:
                    no_peer += 1
                else:
                    io_errors += 1
                continue
            pkts += 1
            out_bytes += end - start
        c = self._c
        _count_batch(c, received, in_bytes, pkts, out_bytes)
        if no_peer:
            c[st.DROPS_NO_PEER] += no_peer
        if io_errors:
            c[st.DROPS_IO] += io_errors
        if bad:
            c[st.DROPS_MALFORMED] += bad
        if pkts:
            c[st.LAST_OUT_NS] = time.monotonic_ns()

    def _drain_batched(self):
        """COMPAT framing with UDP segmentation offload.

        Packets of one size (a bulk TCP flow's are all MSS-sized) are read
        back to back into the batch buffer and sent with one sendmsg()
        carrying UDP_SEGMENT: on the wire they are the same one-packet
        datagrams an upstream peer expects, but the kernel handles the run
        as one buffer, and a fastfwd receiver with UDP_GRO takes it whole.
        A packet of another size ends the run (a shorter one may close it).
        """
        fd, vnet, hdr = self._tun_fd, self._vnet, self._hdr
        view, readinto = self._batch_view, self._tun.readinto
        readv = os.readv
        received = in_bytes = bad = 0
        p = seg = count = 0
        limit = BATCH_BUFFER_BYTES - SLOT_BYTES
        for _ in range(BATCH_PKTS):
            try:
                if vnet:
                    n = readv(fd, [hdr, view[p : p + SLOT_BYTES]]) - _VNET
                else:
                    n = readinto(view[p : p + SLOT_BYTES])
                    if n is None:
                        break
            except BlockingIOError:
                break
            received += 1
            in_bytes += n
            if vnet and hdr[1] != 0:  # needs segmentation: not for COMPAT
                bad += 1
                continue
            if count and n > seg:
                # Another size: send the run so far, start a new one here.
                if not self._send_run(0, p, seg, count):
                    return self._count_run(received, in_bytes, bad)
                view[0:n] = view[p : p + n]
                p = count = 0
            if count == 0:
                seg = n
            p += n
            count += 1
            if n < seg or p > limit or count == MAX_SEGMENTS:
                if not self._send_run(0, p, seg, count):
                    return self._count_run(received, in_bytes, bad)
                p = count = 0
        if count and not self._send_run(0, p, seg, count):
            return self._count_run(received, in_bytes, bad)
        self._count_run(received, in_bytes, bad)

    def _count_run(self, received, in_bytes, bad):
        c = self._c
        c[st.PKTS_IN] += received
        c[st.BYTES_IN] += in_bytes
        c[st.BATCHES] += 1
        if bad:
            c[st.DROPS_MALFORMED] += bad

    def _send_run(self, start, end, seg, count):
        """Send ``count`` packets of ``seg`` bytes (the last may be shorter)
        lying back to back in the batch buffer; False when the socket is full
        and reading has paused."""
        view, sock, peer = self._batch_view, self._sock, self._peer
        if peer is None and not self._connected:
            self._c[st.DROPS_NO_PEER] += count
            return True
        try:
            if count == 1:
                if self._connected:
                    sock.send(view[start:end])
                else:
                    sock.sendto(view[start:end], peer)
            else:
                cmsg = [(SOL_UDP, UDP_SEGMENT, seg.to_bytes(2, sys.byteorder))]
                if self._connected:
                    sock.sendmsg([view[start:end]], cmsg)
                else:
                    sock.sendmsg([view[start:end]], cmsg, 0, peer)
        except BlockingIOError:
            self._pause(view, start, end, seg if count > 1 else 0)
            return False
        except OSError as exc:
            if count > 1 and exc.errno in (
                errno.EINVAL,
                errno.EIO,
                errno.ENOPROTOOPT,
                errno.EOPNOTSUPP,
            ):
                # LIMIT: the kernel or the egress device cannot segment UDP
                # (needs Linux >= 4.18 and checksum offload); this run goes
                # out packet by packet and batching stays off.
                self._gso = False
                for i in range(start, end, seg):
                    self._send_run(i, min(i + seg, end), seg, 1)
                return True
            self._c[
                st.DROPS_NO_PEER if exc.errno in _NOT_CONNECTED else st.DROPS_IO
            ] += count
            return True
        self._c[st.PKTS_OUT] += count
        self._c[st.BYTES_OUT] += end - start
        self._c[st.LAST_OUT_NS] = time.monotonic_ns()
        return True

    def _pause(self, view, start, end, seg=0):
        # The datagram (or run) stays in its buffer; nothing reads TUN until
        # it is sent.
        self._pending = (view, start, end, seg)
        self._c[st.BACKPRESSURE] += 1
        self._loop.remove_reader(self._tun_fd)
        self._loop.add_writer(self._sock.fileno(), self._on_sock_writable)

    def _on_sock_writable(self):
        view, start, end, seg = self._pending
        cmsg = [(SOL_UDP, UDP_SEGMENT, seg.to_bytes(2, sys.byteorder))] if seg else []
        try:
            if self._connected:
                self._sock.sendmsg([view[start:end]], cmsg)
            elif self._peer is not None:
                self._sock.sendmsg([view[start:end]], cmsg, 0, self._peer)
        except BlockingIOError:
            return
        except OSError:
            self._c[st.DROPS_IO] += 1
        else:
            self._c[st.PKTS_OUT] += -(-(end - start) // seg) if seg else 1
            self._c[st.BYTES_OUT] += end - start
        self._loop.remove_writer(self._sock.fileno())
        self._loop.add_reader(self._tun_fd, self._on_tun_readable)


_NOT_CONNECTED = {89, 107}  # EDESTADDRREQ, ENOTCONN: no peer yet
IPPROTO_IP, IP_PKTINFO = linux.IPPROTO_IP, linux.IP_PKTINFO
_NO_CMSG = []



_NO_UDP_GSO = {errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP}
_NO_FRAME_GSO = _NO_UDP_GSO | {errno.EMSGSIZE}
# An IP packet wrapped as an OFFLOAD frame with an empty virtio-net header.
_PLAIN_FRAME_HEAD = bytes([frames.OFFLOAD]) + bytes(_VNET)


def _count_batch(c, received, in_bytes, sent, out_bytes):
    """Add one batch's totals to a counter slot (once per wake-up)."""
    c[st.PKTS_IN] += received
    c[st.BYTES_IN] += in_bytes
    c[st.PKTS_OUT] += sent
    c[st.BYTES_OUT] += out_bytes
    c[st.BATCHES] += 1


class Writer:
    """Carries datagrams from the UDP socket to one TUN queue.

    Only IP packets whose source is one of the peer's addresses reach TUN.
    ``connected`` means the client role (VM side, accessor): the peer is the
    one server it was told, strangers are never heard, and control bodies
    arrive. (The socket itself stays unconnected: on a connected UDP socket
    an ICMP error becomes a poll error, and the event loop would stop
    watching the socket.) ``channel`` is the non-blocking
    seqpacket socket to the control process.

    With ``vnet_hdr`` every TUN write starts with a virtio-net header. The
    datagram is received at offset 10, so an IP packet is written as
    ``buf[0:]`` behind ten zero bytes (which no receive ever overwrites) and
    an OFFLOAD frame as ``buf[11:]``, its own header followed by the packet.
    """

    def __init__(
        self, loop, tun_fd, sock, counters, channel, *, connected, vnet_hdr=False
    ):
        self._loop = loop
        self._tun_fd = tun_fd
        self._sock = sock
        self._c = counters
        self._channel = channel
        self._connected = connected
        self._off = _VNET if vnet_hdr else 0
        self._buf = bytearray(BUFFER_BYTES + self._off)
        self._view = memoryview(self._buf)
        self._rx = self._view[self._off :]
        self._peers = frozenset()
        try:
            self._gro = bool(sock.getsockopt(SOL_UDP, UDP_GRO))
        except OSError:
            self._gro = False
        self.refresh_peers = None  # set by the worker: reads pending messages
        # Token buckets for strangers' frames: [tokens, time]; the expose
        # port has its own, so a flood there cannot starve the tunnel's.
        self._bucket = [STRANGER_BURST, 0.0]
        self._xbucket = [EXPOSE_BURST, 0.0]
        self._xsources = {}  # source IP -> bucket, expose port
        # Host side with accessors: the expose socket, and the sessions as
        # accessor IP (4 bytes) -> address, and address -> IP. ``_sessions``
        # stays empty while there is no socket to relay through.
        self._expose = None
        self._expose_reading = False
        self._all_sessions = {}
        self._sessions = {}
        self._session_ip = {}
        self._exposed = ()
        self._host_ip = b""
        self._pong = False
        self._out_peer = None
        self._accessor_gso = True
        self._relay_gso = True
        self._raw_ok = True
        self._frames_out = False
        self._peer_key = None
        self._xbuf = bytearray(BUFFER_BYTES)
        self._xview = memoryview(self._xbuf)
        # VM side: a control body being reassembled from chunks.
        self._body = None
        self._body_left = 0
        self._body_deadline_ns = 0

    def start(self):
        self._loop.add_reader(self._sock.fileno(), self._on_udp_readable)

    def stop(self):
        self._loop.remove_reader(self._sock.fileno())
        self.set_expose(None, False)

    def set_peer(self, addrs, framing=COMPAT):
        """Accept datagrams from these ``(ip, port)`` addresses only: the VM
        side's worker sockets on the host, the host on the VM side.

        With ``framing`` OFFLOAD what this side relays to the peer
        (accessor packets) goes as frames, and once the peer's first frame
        has arrived a bare IP packet from it is not its own (a piece of a
        frame that the path cut up, whose payload happens to look like a
        packet) and is dropped. Until then bare packets still pass: the two
        sides switch framing one after the other, and what the peer sent
        before its switch is its own.
        """
        peers = frozenset(addrs)
        offload = framing == OFFLOAD and bool(self._off)
        if (peers, offload) != self._peer_key:
            self._raw_ok = True  # until the first frame (see _seen_frame)
        self._peer_key = (peers, offload)
        self._peers = peers
        self._out_peer = addrs[0] if addrs else None
        self._frames_out = offload

    def _seen_frame(self):
        """A frame from the peer: in offload framing bare packets stop."""
        if self._frames_out:
            self._raw_ok = False

    # accessors (host side)

    def set_expose(self, sock, read):
        """Relay accessor traffic through ``sock`` (None: no expose port).
        With ``read`` this writer also serves the socket: accessor packets
        to the VM side, answers to pings, logins to the control process."""
        if self._expose is not None:
            if self._expose_reading:
                self._loop.remove_reader(self._expose.fileno())
            self._expose.close()
        self._expose, self._expose_reading = sock, False
        if sock is not None:
            sock.setblocking(False)
            if read:
                self._loop.add_reader(sock.fileno(), self._on_expose_readable)
                self._expose_reading = True
        self._sessions = self._all_sessions if sock is not None else {}

    def set_sessions(self, sessions, exposed, host_ip, pong):
        """``sessions``: ``(accessor_ip, (host, port), local_ip)`` triples
        (``local_ip``: the address the accessor dialled, "" if unknown);
        ``exposed``: the networks accessors may reach; ``pong``: answer their
        pings to ``host_ip`` here."""
        self._all_sessions = {
            ipaddress.IPv4Address(ip).packed: (tuple(addr), linux.send_from(local))
            for ip, addr, local in sessions
        }
        self._session_ip = {
            tuple(addr): ipaddress.IPv4Address(ip).packed for ip, addr, _ in sessions
        }
        self._exposed = tuple(
            (int(n.network_address), int(n.netmask))
            for n in map(ipaddress.IPv4Network, exposed)
        )
        self._host_ip = ipaddress.IPv4Address(host_ip).packed if host_ip else b""
        self._pong = bool(pong)
        self._sessions = self._all_sessions if self._expose is not None else {}

    def _divert(self, n):
        """Send the datagram in the receive area to an accessor if it is
        addressed to one; True when it was (sent or dropped and counted).

        Super-packets and partial checksums are finished in software first:
        an accessor takes one whole packet per datagram.
        """
        rx, c = self._rx, self._c
        first = rx[0]
        if first >> 4 == 4:
            addr = self._sessions.get(bytes(rx[16:20]))
            if addr is None:
                return False
            self._to_accessor(rx[:n], addr)
            return True
        ip = 1 + _VNET
        if first != OFFLOAD_FRAME or not self._off or n < ip + 20:
            return False
        addr = self._sessions.get(bytes(rx[ip + 16 : ip + 20]))
        if addr is None:
            return False
        out = packets.finish(rx[1:ip], rx[ip:n])
        if out is None:
            c[st.DROPS_ACL] += 1
            return True
        self._to_accessor_run(out[0], out[1], addr)
        return True

    def _to_accessor(self, packet, target):
        addr, cmsg = target
        try:
            self._expose.sendmsg([packet], cmsg, 0, addr)
        except OSError:
            self._c[st.DROPS_IO] += 1
            return
        self._c[st.TO_ACCESSORS] += 1

    def _to_accessor_run(self, data, size, target):
        """Send packets of ``size`` bytes lying back to back in ``data`` (the
        last may be shorter), as UDP_SEGMENT runs while the kernel takes
        them: on the wire they are one packet per datagram all the same."""
        if len(data) <= size:
            self._to_accessor(data, target)
            return
        addr, local = target
        view = memoryview(data)
        step = size * min(MAX_SEGMENTS, BATCH_BUFFER_BYTES // size)
        for start in range(0, len(data), step):
            run = view[start : start + step]
            count = -(-len(run) // size)
            if self._accessor_gso and count > 1:
                cmsg = [(SOL_UDP, UDP_SEGMENT, size.to_bytes(2, sys.byteorder))]
                try:
                    self._expose.sendmsg([run], cmsg + local, 0, addr)
                    self._c[st.TO_ACCESSORS] += count
                    continue
                except OSError as exc:
                    if exc.errno not in _NO_UDP_GSO:
                        self._c[st.DROPS_IO] += count
                        continue
                    # LIMIT: no UDP segmentation towards the accessor (old
                    # kernel, no checksum offload): one send per packet.
                    self._accessor_gso = False
            for i in range(0, len(run), size):
                self._to_accessor(run[i : i + size], target)

    def _on_expose_readable(self):
        """Datagrams on the expose port: IP packets from logged-in accessors
        go to the VM side when they may; the rest goes to control.

        The socket has UDP_GRO: an accessor's run of equal-sized packets
        (fastfwd's accessor sends them with UDP_SEGMENT) arrives as one
        buffer and, when every packet in it may pass, goes on to the VM side
        as one UDP_SEGMENT run.
        """
        sock, view, c = self._expose, self._xview, self._c
        session_ip, out_peer = self._session_ip, self._out_peer
        xlist = [view]
        relayed = 0
        for _ in range(BATCH_PKTS):
            try:
                n, anc, _, src = sock.recvmsg_into(xlist, _GRO_CMSG_BYTES)
            except BlockingIOError:
                break
            except OSError:
                c[st.DROPS_IO] += 1
                continue
            seg, local = n, ""
            for level, kind, data in anc:
                if kind == UDP_GRO and level == SOL_UDP:
                    seg = int.from_bytes(data[:2], sys.byteorder)
                elif kind == IP_PKTINFO and level == IPPROTO_IP:
                    local = linux.pktinfo_destination(data)
            ip = session_ip.get(src)
            if ip is None and n >= MIN_PACKET_BYTES and view[0] >> 4 == 4:
                # The message with a just-made session may still wait in
                # the control channel (an accessor sends right after login).
                if self.refresh_peers is not None:
                    self.refresh_peers()
                session_ip, out_peer = self._session_ip, self._out_peer
                ip = session_ip.get(src)
            if ip is None or seg >= n:
                relayed += self._from_accessor(view[:n], src, ip, out_peer, local)
                continue
            checked = [
                self._check_accessor_packet(view[i : i + seg], ip)
                for i in range(0, n, seg)
            ]
            whole_run = (
                self._relay_gso and not self._frames_out and out_peer is not None
            )
            if whole_run and not any(checked):
                cmsg = [(SOL_UDP, UDP_SEGMENT, seg.to_bytes(2, sys.byteorder))]
                try:
                    self._sock.sendmsg([view[:n]], cmsg, 0, out_peer)
                    relayed += len(checked)
                    continue
                except OSError as exc:
                    if exc.errno in _NO_UDP_GSO:
                        self._relay_gso = False
            for i in range(0, n, seg):
                relayed += self._from_accessor(
                    view[i : min(i + seg, n)], src, ip, out_peer, local
                )
        if relayed:
            c[st.FROM_ACCESSORS] += relayed

    def _check_accessor_packet(self, packet, ip):
        """0 when an accessor's packet may go to the VM side as it is."""
        if (
            len(packet) < MIN_PACKET_BYTES
            or packet[0] >> 4 != 4
            or packet[12:16] != ip
            or (packet[2] << 8 | packet[3]) != len(packet)
        ):
            return 1
        dst = packet[16:20]
        return 0 if dst != self._host_ip and self._is_exposed(dst) else 1

    def _is_exposed(self, dst):
        """Whether ``dst`` (4 bytes) lies in a network accessors may reach."""
        d = int.from_bytes(dst, "big")
        return any(d & mask == net for net, mask in self._exposed)

    def _from_accessor(self, packet, src, ip, out_peer, local=""):
        """One datagram from the expose port; returns 1 if relayed.
        ``local``: the address it was sent to, which answers leave from."""
        c = self._c
        n = len(packet)
        if ip is not None and n and packet[0] >> 4 == 6:
            c[st.DROPS_ACL] += 1  # accessors have IPv4 addresses only
            return 0
        if ip is None or n < MIN_PACKET_BYTES or packet[0] >> 4 != 4:
            self._expose_frame(packet, src, local)
            return 0
        if (packet[2] << 8 | packet[3]) != n:
            c[st.DROPS_MALFORMED] += 1  # not one whole IP packet
            return 0
        if packet[12:16] != ip:
            c[st.DROPS_ACL] += 1  # an accessor sends from its own address only
            return 0
        dst = packet[16:20]
        if dst == self._host_ip:
            reply = packets.echo_reply(packet) if self._pong else None
            if reply is None:
                c[st.DROPS_ACL] += 1
                return 0
            try:
                self._expose.sendmsg([reply], linux.send_from(local), 0, src)
                c[st.PONGS] += 1
            except OSError:
                c[st.DROPS_IO] += 1
            return 0
        if not self._is_exposed(dst):
            c[st.DROPS_ACL] += 1
            return 0
        if out_peer is None:
            c[st.DROPS_NO_PEER] += 1
            return 0
        try:
            if not self._frames_out:
                self._sock.sendto(packet, out_peer)
            else:
                self._sock.sendmsg([_PLAIN_FRAME_HEAD, packet], _NO_CMSG, 0, out_peer)
        except OSError:
            c[st.DROPS_IO] += 1
            return 0
        return 1

    def _expose_frame(self, packet, src, local=""):
        """Logins, and datagrams from addresses without a session: to the
        control process, throttled like other strangers' frames."""
        c = self._c
        n = len(packet)
        if n == 0 or n > frames.UPSTREAM_BUFFER_BYTES:
            c[st.DROPS_MALFORMED] += 1
        elif not self._take_expose_token(src[0]):
            c[st.DROPS_THROTTLED] += 1
        else:
            self._to_control(
                messages.pack(
                    messages.EXPOSE_FRAME,
                    src=messages.peer_to_wire(src),
                    data=bytes(packet),
                    local=local,
                )
            )

    def _on_udp_readable(self):
        buf, view, rx, off, tun_fd = (
            self._buf,
            self._view,
            self._rx,
            self._off,
            self._tun_fd,
        )
        write = os.write
        recvfrom_into, recvmsg_into = self._sock.recvfrom_into, self._sock.recvmsg_into
        gro, rx_list = self._gro, [rx]
        sessions = self._sessions
        frame_bytes = frames.offload_frame_bytes
        pkts = out_bytes = in_bytes = received = io_errors = split = bare = 0
        collecting, peers, raw_ok = self._batch_state()
        for _ in range(BATCH_PKTS):
            try:
                if gro:
                    n, anc, _, src = recvmsg_into(rx_list, _GRO_CMSG_BYTES)
                    if anc and n > (
                        seg := int.from_bytes(anc[0][2][:2], sys.byteorder)
                    ):
                        # Several datagrams of seg bytes, taken as one run.
                        # A GSO frame (one offload frame the sender's kernel
                        # cut into datagrams) comes back whole and goes the
                        # way of any single frame below; anything else is
                        # taken apart.
                        if rx[0] != OFFLOAD_FRAME or frame_bytes(rx, 0, n) != n:
                            got, got_bytes, runs = self._write_run(n, src, seg)
                            received += runs
                            in_bytes += n
                            pkts += got
                            out_bytes += got_bytes
                            collecting, peers, raw_ok = self._batch_state()
                            continue
                else:
                    n, src = recvfrom_into(rx)
            except BlockingIOError:
                break
            except OSError:
                io_errors += 1
                continue
            received += 1
            in_bytes += n
            if src in peers and n >= MIN_PACKET_BYTES and not collecting:
                if sessions and self._divert(n):
                    continue
                first = buf[off]
                if first >> 4 == 4 or first >> 4 == 6:
                    if not raw_ok:
                        bare += 1
                        continue
                    packet = view[: off + n]
                elif first == OFFLOAD_FRAME and off:
                    if frame_bytes(rx) != n:
                        split += 1  # a piece of a frame the path cut up
                        continue
                    if raw_ok:
                        self._seen_frame()
                        raw_ok = self._raw_ok
                    packet = view[off + 1 : off + n]
                else:
                    self._slow_path(n, src)
                    collecting, peers, raw_ok = self._batch_state()
                    continue
                try:
                    write(tun_fd, packet)
                except OSError:
                    io_errors += 1
                    continue
                pkts += 1
                out_bytes += n
            else:
                self._slow_path(n, src)
                collecting, peers, raw_ok = self._batch_state()
        c = self._c
        _count_batch(c, received, in_bytes, pkts, out_bytes)
        if io_errors:
            c[st.DROPS_IO] += io_errors
        if split:
            c[st.DROPS_SPLIT] += split
        if bare:
            c[st.DROPS_MALFORMED] += bare
        if pkts:
            # Liveness of the peer: only packets it sent that reached TUN count.
            c[st.LAST_IN_NS] = time.monotonic_ns()

    def _batch_state(self):
        """What the receive loop keeps in locals and reads again after the
        slow path (which may take control messages that change it)."""
        return self._body is not None, self._peers, self._raw_ok

    def _write_run(self, n, src, seg):
        """Handle a run of datagrams that UDP_GRO delivered together;
        returns (written, bytes, datagrams).

        GRO joins datagrams of one size, the last perhaps shorter, so an
        OFFLOAD frame in a run fills whole segments unless it ends it. The
        walk goes datagram by datagram: a frame whose own length fits that
        way is written whole, in place (one GSO frame or several small
        ones); every other datagram is handled as if it had come alone
        (heartbeats and hellos leave from a worker's socket too, and a
        piece of a frame the path cut up is dropped as split). Such a
        datagram is first moved to the start of the receive area, where
        the single-datagram code expects it (a bare packet goes to the TUN
        behind the ten zero bytes there); a move of at most one MTU.
        """
        rx, view, off = self._rx, self._view, self._off
        frame_bytes = frames.offload_frame_bytes
        pkts = nbytes = count = pos = 0
        while pos < n:
            count += 1
            first, end, whole = rx[pos], min(pos + seg, n), False
            if first == OFFLOAD_FRAME and off:
                size = frame_bytes(rx, pos, n)
                if size >= 1 + _VNET + MIN_PACKET_BYTES and (
                    pos + size == n or (pos + size < n and size % seg == 0)
                ):
                    end, whole = pos + size, True
            length = end - pos
            from_peer = src in self._peers and self._body is None
            if from_peer and whole and not self._sessions:
                packet = view[off + pos + 1 : off + end]
                if self._raw_ok:
                    self._seen_frame()
            else:
                if pos:
                    rx[0:length] = rx[pos:end]
                bare = (first >> 4 == 4 or first >> 4 == 6) and self._raw_ok
                if not (from_peer and bare and length >= MIN_PACKET_BYTES):
                    self._slow_path(length, src)  # accessors, control, drops
                    pos = end
                    continue
                if self._sessions and self._divert(length):
                    pos = end
                    continue
                packet = view[: off + length]
            try:
                os.write(self._tun_fd, packet)
            except OSError:
                self._c[st.DROPS_IO] += 1
            else:
                pkts += 1
                nbytes += length
            pos = end
        return pkts, nbytes, count

    def _slow_path(self, n, src):
        rx, c = self._rx, self._c
        from_peer = src in self._peers
        if not from_peer and self.refresh_peers is not None:
            # The message naming this peer may still wait in the control
            # channel (both became readable in the same wake-up).
            self.refresh_peers()
            from_peer = src in self._peers
        if from_peer and self._body is not None and self._collect_body(n):
            return
        if n == 0:
            c[st.DROPS_MALFORMED] += 1
            return
        first = rx[0]
        if not from_peer:
            # Strangers: the host hears heartbeats and hellos of a new VM
            # side (throttled, so a flood cannot crowd out the control
            # channel); the VM side talks to its host only.
            if self._connected or first >= 0x10 and not frames.is_ip(first):
                c[st.DROPS_UNKNOWN_SRC] += 1
            elif not self._take_token(self._bucket):
                c[st.DROPS_THROTTLED] += 1
            elif frames.is_ip(first) or first == OFFLOAD_FRAME:
                # A peer whose address changed (NAT rebinding) while sending.
                c[st.DROPS_UNKNOWN_SRC] += 1
                self._to_control(
                    messages.pack(
                        messages.UNKNOWN_SOURCE, src=messages.peer_to_wire(src)
                    )
                )
            elif n <= frames.UPSTREAM_BUFFER_BYTES:
                self._to_control(
                    messages.pack(
                        messages.FRAME,
                        src=messages.peer_to_wire(src),
                        data=bytes(rx[:n]),
                    )
                )
            else:
                c[st.DROPS_MALFORMED] += 1
            return
        if first == frames.HEARTBEAT and n == 1:
            # The peer is alive; the control process reads this, nothing to
            # send it.
            c[st.LAST_IN_NS] = time.monotonic_ns()
            return
        if (frames.is_ip(first) or first == OFFLOAD_FRAME) and n < MIN_PACKET_BYTES:
            c[st.DROPS_MALFORMED] += 1
            return
        if frames.is_ip(first) or first == OFFLOAD_FRAME:
            if first == OFFLOAD_FRAME and not self._off:
                c[st.DROPS_MALFORMED] += 1
            elif first == OFFLOAD_FRAME and frames.offload_frame_bytes(rx, 0, n) != n:
                c[st.DROPS_SPLIT] += 1  # a piece of a frame, not a frame
            elif first != OFFLOAD_FRAME and not self._raw_ok:
                c[st.DROPS_MALFORMED] += 1  # the peer sends frames only
            elif self._sessions and self._divert(n):
                return
            else:
                if first == OFFLOAD_FRAME and self._raw_ok:
                    self._seen_frame()
                start = self._off + 1 if first == OFFLOAD_FRAME else 0
                self._write_tun(self._view[start : self._off + n])
            return
        if (
            self._connected
            and n == frames.CONTROL_HEADER_BYTES
            and first == frames.CONTROL
        ):
            self._start_body(rx[1] << 8 | rx[2])
            return
        if first < 0x10 and n <= frames.UPSTREAM_BUFFER_BYTES:
            self._to_control(
                messages.pack(
                    messages.FRAME, src=messages.peer_to_wire(src), data=bytes(rx[:n])
                )
            )
            return
        c[st.DROPS_MALFORMED] += 1

    def _take_expose_token(self, ip):
        """Budget for the expose port's strangers: per source address (so
        one sender cannot shut out the others' logins), then overall."""
        buckets = self._xsources
        bucket = buckets.get(ip)
        if bucket is None:
            if len(buckets) >= EXPOSE_SOURCES_TRACKED:
                buckets.clear()  # a spoofed flood: start over, stay bounded
            bucket = buckets[ip] = [EXPOSE_SOURCE_BURST, time.monotonic()]
        if not self._take_token(bucket, EXPOSE_SOURCE_PER_S, EXPOSE_SOURCE_BURST):
            return False
        return self._take_token(self._xbucket, EXPOSE_PER_S, EXPOSE_BURST)

    @staticmethod
    def _take_token(bucket, rate=STRANGER_FRAMES_PER_S, burst=STRANGER_BURST):
        """Token bucket for frames from strangers: STRANGER_FRAMES_PER_S."""
        now = time.monotonic()
        tokens = min(burst, bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def _write_tun(self, packet):
        try:
            os.write(self._tun_fd, packet)
        except OSError:
            self._c[st.DROPS_IO] += 1
            return
        self._c[st.PKTS_OUT] += 1
        self._c[st.BYTES_OUT] += len(packet)

    def _start_body(self, length):
        self._body = bytearray()
        self._body_left = length
        self._body_deadline_ns = time.monotonic_ns() + CONTROL_BODY_TIMEOUT_NS
        if length == 0:
            self._finish_body()

    def _collect_body(self, n):
        """Take datagram ``n`` as the next body chunk; False if it is not one.

        An IP packet that arrives while a body is incomplete is forwarded as
        usual (the chunk was lost or reordered); a body that is not complete
        within a second is abandoned and counted.
        """
        if time.monotonic_ns() > self._body_deadline_ns:
            self._abort_body()
            return False
        if frames.looks_like_ip_packet(self._rx, n) or self._rx[0] == OFFLOAD_FRAME:
            return False
        if n > self._body_left:
            # More than the header announced: not a body the upstream sends.
            self._abort_body()
            self._c[st.DROPS_MALFORMED] += 1
            return True
        self._body += self._rx[:n]
        self._body_left -= n
        if self._body_left <= 0:
            self._finish_body()
        return True

    def _finish_body(self):
        body = bytes(self._body)
        self._body = None
        self._c[st.CONTROL_BODIES] += 1
        self._to_control(messages.pack(messages.CONTROL_BODY, body=body))

    def _abort_body(self):
        self._body = None
        self._c[st.CONTROL_ABORTED] += 1

    def _to_control(self, packed):
        try:
            self._channel.send(packed)
        except (BlockingIOError, OSError):
            self._c[st.DROPS_CONTROL_FULL] += 1
            return
        self._c[st.FRAMES_TO_CONTROL] += 1
