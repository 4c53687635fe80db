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
  2. one datagram is received into the preallocated buffer;
  3. an IP packet from the peer is written to the TUN queue as it is;
  4. anything else leaves the fast path (:meth:`Writer._slow_path`):
     heartbeats, control frames and logins go to the control process over
     its channel, never blocking; garbage is dropped and counted;
  5. repeat until the socket would block or the budget is spent; count once.

Both loops are single-threaded and owned by their process's event loop;
nothing here may be called from another thread.
"""

import logging
import os
import time

from control import messages
from fastfwd import frames
from fastfwd import stats as st

log = logging.getLogger(__name__)

BATCH_PKTS = 256
BUFFER_BYTES = 65536
CONTROL_BODY_TIMEOUT_NS = 1_000_000_000


class Framing:
    """How a TUN packet becomes a datagram and back.

    ``headroom`` bytes in front of each packet are free for a header; the
    reader reads the packet at ``buf[headroom:]`` and sends
    ``buf[:headroom + n]`` after :meth:`encode` filled the front. The
    upstream-compatible framing has no header at all. A framing that carries
    offloaded super-packets puts its header (virtio-net header, flags) in
    the headroom, so the hot loops stay as they are.
    """

    headroom = 0

    def encode(self, buf, n):
        """Fill ``buf[:headroom]`` for a packet of ``n`` bytes after it."""


COMPAT = Framing()


class Reader:
    """Carries packets from one TUN queue to the UDP socket.

    ``connected`` means the socket was connected to the peer by the control
    process (VM side); otherwise each datagram goes to the address set with
    :meth:`set_peer` (host side).
    """

    def __init__(self, loop, tun_fd, sock, counters, *, connected, framing=COMPAT):
        self._loop = loop
        self._tun_fd = tun_fd
        # A raw FileIO returns None instead of raising when the fd would block.
        self._tun = open(tun_fd, "rb", buffering=0, closefd=False)
        self._sock = sock
        self._c = counters
        self._connected = connected
        self._framing = framing
        self._buf = bytearray(BUFFER_BYTES)
        self._view = memoryview(self._buf)
        self._rx_view = self._view[framing.headroom :]
        self._peer = None
        self._pending_bytes = 0

    def start(self):
        self._loop.add_reader(self._tun_fd, self._on_tun_readable)

    def stop(self):
        self._loop.remove_reader(self._tun_fd)
        self._loop.remove_writer(self._sock.fileno())

    def set_peer(self, addr):
        """Send to ``addr`` (an ``(ip, port)`` tuple) from now on; None stops."""
        self._peer = addr

    def _on_tun_readable(self):
        readinto = self._tun.readinto
        rx_view, view = self._rx_view, self._view
        sock, peer, connected = self._sock, self._peer, self._connected
        headroom, encode = self._framing.headroom, self._framing.encode
        pkts = out_bytes = in_bytes = no_peer = io_errors = received = 0
        for _ in range(BATCH_PKTS):
            n = readinto(rx_view)
            if n is None:
                break
            received += 1
            in_bytes += n
            if headroom:
                encode(view, n)
            size = headroom + n
            try:
                if connected:
                    sock.send(view[:size])
                elif peer is not None:
                    sock.sendto(view[:size], peer)
                else:
                    no_peer += 1
                    continue
            except BlockingIOError:
                self._pause(size)
                break
            except OSError as exc:
                if exc.errno in _NOT_CONNECTED:
                    no_peer += 1
                else:
                    io_errors += 1
                continue
            pkts += 1
            out_bytes += size
        c = self._c
        c[st.PKTS_IN] += received
        c[st.BYTES_IN] += in_bytes
        c[st.PKTS_OUT] += pkts
        c[st.BYTES_OUT] += out_bytes
        c[st.BATCHES] += 1
        if no_peer:
            c[st.DROPS_NO_PEER] += no_peer
        if io_errors:
            c[st.DROPS_IO] += io_errors
        if pkts:
            c[st.LAST_OUT_NS] = time.monotonic_ns()

    def _pause(self, size):
        # The datagram stays in the buffer; nothing reads TUN until it is sent.
        self._pending_bytes = size
        self._c[st.BACKPRESSURE] += 1
        self._loop.remove_reader(self._tun_fd)
        self._loop.add_writer(self._sock.fileno(), self._on_sock_writable)

    def _on_sock_writable(self):
        size = self._pending_bytes
        try:
            if self._connected:
                self._sock.send(self._view[:size])
            elif self._peer is not None:
                self._sock.sendto(self._view[:size], self._peer)
        except BlockingIOError:
            return
        except OSError:
            self._c[st.DROPS_IO] += 1
        else:
            self._c[st.PKTS_OUT] += 1
            self._c[st.BYTES_OUT] += size
        self._pending_bytes = 0
        self._loop.remove_writer(self._sock.fileno())
        self._loop.add_reader(self._tun_fd, self._on_tun_readable)


_NOT_CONNECTED = {89, 107}  # EDESTADDRREQ, ENOTCONN: no peer yet


class Writer:
    """Carries datagrams from the UDP socket to one TUN queue.

    On the host side (``connected`` false) only IP packets whose source is
    the peer reach TUN; on the VM side the kernel already filters by the
    connected address. ``channel`` is the non-blocking seqpacket socket to
    the control process.
    """

    def __init__(self, loop, tun_fd, sock, counters, channel, *, connected):
        self._loop = loop
        self._tun_fd = tun_fd
        self._sock = sock
        self._c = counters
        self._channel = channel
        self._connected = connected
        self._buf = bytearray(BUFFER_BYTES)
        self._view = memoryview(self._buf)
        self._peer = None
        # VM side: a control body being reassembled from chunks.
        self._body = None
        self._body_left = 0
        self._body_deadline_ns = 0

    def start(self):
        self._loop.add_reader(self._sock.fileno(), self._on_udp_readable)

    def stop(self):
        self._loop.remove_reader(self._sock.fileno())

    def set_peer(self, addr):
        self._peer = addr

    def _on_udp_readable(self):
        buf, view, tun_fd = self._buf, self._view, self._tun_fd
        write = os.write
        peer = self._peer
        recv_into, recvfrom_into = self._sock.recv_into, self._sock.recvfrom_into
        connected = self._connected
        src = None
        pkts = out_bytes = in_bytes = received = io_errors = 0
        collecting = self._body is not None
        for _ in range(BATCH_PKTS):
            try:
                if connected:
                    n = recv_into(buf)
                else:
                    n, src = recvfrom_into(buf)
            except BlockingIOError:
                break
            except OSError:
                # ECONNREFUSED after an ICMP error on a connected socket.
                io_errors += 1
                continue
            received += 1
            in_bytes += n
            if n and (buf[0] >> 4 == 4 or buf[0] >> 4 == 6) and src == peer and not collecting:
                try:
                    write(tun_fd, view[:n])
                except OSError:
                    io_errors += 1
                    continue
                pkts += 1
                out_bytes += n
            else:
                self._slow_path(n, src)
                collecting = self._body is not None
        c = self._c
        c[st.PKTS_IN] += received
        c[st.BYTES_IN] += in_bytes
        c[st.PKTS_OUT] += pkts
        c[st.BYTES_OUT] += out_bytes
        c[st.BATCHES] += 1
        if io_errors:
            c[st.DROPS_IO] += io_errors
        if pkts:
            # Liveness of the peer: only packets it sent that reached TUN count.
            c[st.LAST_IN_NS] = time.monotonic_ns()

    def _slow_path(self, n, src):
        buf = self._buf
        if self._body is not None and self._collect_body(n):
            return
        if n == 0:
            self._c[st.DROPS_MALFORMED] += 1
            return
        first = buf[0]
        if frames.is_ip(first):
            if src != self._peer:
                self._c[st.DROPS_UNKNOWN_SRC] += 1
                return
            self._write_tun(n)
            return
        if self._connected and n == frames.CONTROL_HEADER_BYTES and first == frames.CONTROL:
            self._start_body(buf[1] << 8 | buf[2])
            return
        if first < 0x10 and n <= frames.UPSTREAM_BUFFER_BYTES:
            self._to_control(messages.pack(messages.FRAME, src=messages.peer_to_wire(src), data=bytes(buf[:n])))
            return
        self._c[st.DROPS_MALFORMED] += 1

    def _write_tun(self, n):
        try:
            os.write(self._tun_fd, self._view[:n])
        except OSError:
            self._c[st.DROPS_IO] += 1
            return
        self._c[st.PKTS_OUT] += 1
        self._c[st.BYTES_OUT] += n

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
        if frames.looks_like_ip_packet(self._buf, n):
            return False
        self._body += self._view[:n]
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
