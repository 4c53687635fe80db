"""TCP proxies from the host's tunnel address to services on the host.

A ``proxy [IP:]PORT[:LISTEN]`` line lets containers reach a service that
listens only on the host, typically on its loopback: the host side listens
on its tunnel address, port LISTEN, and relays each connection to IP:PORT
(IP defaults to 127.0.0.1). The kernel delivers these connections to the
tunnel address like to any local socket; the data plane sees only packets.

A connection passes through these steps, on the control process's event
loop (asyncio or uvloop):

1. accepted by the line's listener; connect to the target within
   :data:`CONNECT_TIMEOUT_S`; on failure the client's connection is reset;
2. one copy per direction: read up to :data:`CHUNK_BYTES`, write, wait for
   the socket to drain; EOF on one side becomes shutdown(SHUT_WR) on the
   other, while the opposite direction carries on;
3. both directions at EOF: both sockets closed; a socket error in either
   direction: both aborted.

Buffering is bounded: a stream reader stops reading its socket once it
holds twice :data:`CHUNK_BYTES`, and a copy waits in ``drain()`` while the
transport holds more than its high-water mark (64 KiB). The rest waits in
the kernel's socket buffers, and TCP slows the sender.

Performance assumption, not measured: a read, a write and a drain per
chunk move a few hundred MB/s per connection on one core. iperf3 through a
``proxy`` line in the lab would confirm it.
"""

import asyncio
import errno
import functools
import logging
import os
import socket
import struct
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)

DEFAULT_TARGET_IP = "127.0.0.1"
CHUNK_BYTES = 64 * 1024
CONNECT_TIMEOUT_S = 10.0
BACKLOG = 128

_HINTS = {
    errno.EADDRINUSE: "; free the port or choose another LISTEN port, then reload",
    errno.EADDRNOTAVAIL: "; the tunnel address is not on any device",
}


def line_text(proxy):
    """The ``proxy`` line in its shortest form, as a user would write it."""
    spec = f"{proxy.ip}:{proxy.port}" if proxy.ip else str(proxy.port)
    if proxy.listen != proxy.port:
        spec += f":{proxy.listen}"
    return f"proxy {spec}"


@dataclass
class ProxyStats:
    """Counters of one ``proxy`` line since it was first applied."""

    connections: int = 0  # accepted
    active: int = 0
    target_failures: int = 0  # connect to the target refused or timed out
    errors: int = 0  # relays ended by a socket error (reset, broken pipe)
    bytes_up: int = 0  # client -> target
    bytes_down: int = 0  # target -> client

    def add_up(self, n):
        self.bytes_up += n

    def add_down(self, n):
        self.bytes_down += n


class _Listener:
    """One ``proxy`` line: its listening server (None when not listening)."""

    def __init__(self, proxy):
        self.proxy = proxy
        self.server = None
        self.error = None  # why the last attempt to listen failed
        self.stats = ProxyStats()

    @property
    def target(self):
        return (self.proxy.ip or DEFAULT_TARGET_IP, self.proxy.port)


class ProxySet:
    """The host side's ``proxy`` listeners and the connections they relay.

    Owned by the control process: create it, call :meth:`apply` and
    :meth:`close` on one running event loop. ``listen_ip`` is the host's
    tunnel address; it must be on a device before a line can listen.
    """

    def __init__(self, listen_ip):
        self.listen_ip = str(listen_ip)
        self._loop = asyncio.get_running_loop()
        self._wanted_ports = set()
        self._listeners = {}  # LISTEN port -> _Listener
        self._relays = set()  # every open connection's task, removed lines' too
        self._lock = asyncio.Lock()
        self._closed = False

    @property
    def failed(self):
        """Lines that are not listening: ``{line: reason}``."""
        return {
            line_text(lst.proxy): lst.error
            for lst in self._listeners.values()
            if lst.server is None
        }

    async def apply(self, proxies):
        """Make the listeners match ``proxies`` (a ``Config.proxies`` list).

        New lines start listening and removed lines stop; their open
        connections run to their end. An unchanged line keeps its listener.
        A line whose LISTEN port stays but whose target changed keeps its
        listener too, and new connections go to the new target. A line that
        cannot listen is logged at ERROR, left out and tried again at the
        next call; the other lines are not affected.

        Returns :attr:`failed`.
        """
        async with self._lock:
            if self._closed:
                raise RuntimeError("apply() after close()")
            wanted = {p.listen: p for p in proxies}
            self._wanted_ports = set(wanted)
            for port in [p for p in self._listeners if p not in wanted]:
                self._remove(port)
            for port, proxy in wanted.items():
                lst = self._listeners.get(port)
                if lst is None:
                    lst = self._listeners[port] = _Listener(proxy)
                elif lst.proxy != proxy:
                    lst.proxy = proxy
                    log.info('proxy target changed line="%s"', line_text(proxy))
                if lst.server is None:
                    await self._listen(lst)
            return self.failed

    async def close(self):
        """Stop every listener and abort every open connection."""
        async with self._lock:
            self._closed = True
            for port in list(self._listeners):
                self._remove(port)
            relays = list(self._relays)
            for task in relays:
                task.cancel()
            await asyncio.gather(*relays, return_exceptions=True)

    def statistics(self):
        """Per line: where it listens and relays to, and its counters."""
        return {
            line_text(lst.proxy): {
                "listen": f"{self.listen_ip}:{port}",
                "target": "{}:{}".format(*lst.target),
                "listening": lst.server is not None,
                "error": lst.error,
                **asdict(lst.stats),
            }
            for port, lst in sorted(self._listeners.items())
        }

    async def _listen(self, lst):
        addr = (self.listen_ip, lst.proxy.listen)
        # A target that is any proxy's listening address would relay into
        # itself, directly or around a loop of lines.
        listening = {(self.listen_ip, port) for port in self._wanted_ports}
        if lst.target in listening:
            lst.error = "the target is a proxy's own listening address"
        else:
            try:
                lst.server = await asyncio.start_server(
                    functools.partial(self._accept, lst), *addr,
                    limit=CHUNK_BYTES, backlog=BACKLOG,
                )  # fmt: skip
                lst.error = None
            except OSError as exc:
                lst.error = _reason(exc) + _HINTS.get(exc.errno, "")
        if lst.error is not None:
            log.error(
                'proxy listen failed line="%s" listen=%s:%d reason=%s',
                line_text(lst.proxy),
                *addr,
                lst.error,
            )
            return
        log.info("proxy listening listen=%s:%d target=%s:%d", *addr, *lst.target)

    def _remove(self, port):
        lst = self._listeners.pop(port)
        if lst.server is None:
            return
        # Closes the listening socket only; accepted connections run on.
        # Not awaiting wait_closed(): uvloop's waits for them to end.
        lst.server.close()
        addr = (self.listen_ip, port)
        log.info("proxy closed listen=%s:%d active=%d", *addr, lst.stats.active)

    def _accept(self, lst, reader, writer):
        # A plain callback, so the task is tracked before it first runs.
        if self._closed:
            writer.transport.abort()
            return
        task = self._loop.create_task(self._relay(lst, reader, writer))
        self._relays.add(task)
        task.add_done_callback(self._relays.discard)

    async def _relay(self, lst, client_r, client_w):
        stats = lst.stats
        stats.connections += 1
        stats.active += 1
        host, port = lst.target
        client = client_w.get_extra_info("peername")
        try:
            try:
                target_r, target_w = await asyncio.wait_for(
                    asyncio.open_connection(host, port, limit=CHUNK_BYTES),
                    CONNECT_TIMEOUT_S,
                )
            except OSError as exc:  # TimeoutError is one too
                stats.target_failures += 1
                log.debug(
                    "proxy target unreachable target=%s:%d client=%s reason=%s",
                    host,
                    port,
                    client,
                    _reason(exc),
                )
                _reset(client_w)
                return
            except asyncio.CancelledError:
                client_w.transport.abort()
                raise
            log.debug("proxy connected target=%s:%d client=%s", host, port, client)
            await self._copy_both(stats, client, client_r, client_w, target_r, target_w)
        finally:
            stats.active -= 1

    async def _copy_both(self, stats, client, client_r, client_w, target_r, target_w):
        up = self._loop.create_task(_copy(client_r, target_w, stats.add_up))
        down = self._loop.create_task(_copy(target_r, client_w, stats.add_down))
        clean = False
        try:
            done, _ = await asyncio.wait(
                (up, down), return_when=asyncio.FIRST_EXCEPTION
            )
            failure = next((t.exception() for t in done if t.exception()), None)
            if failure is None:
                clean = True
            else:
                stats.errors += 1
                reason = _reason(failure)
                log.debug("proxy connection failed client=%s reason=%s", client, reason)
        finally:
            for task in (up, down):
                task.cancel()
            # close() sends what is still buffered; abort() drops it.
            for w in (client_w, target_w):
                if clean:
                    w.close()
                else:
                    w.transport.abort()
            await asyncio.gather(up, down, return_exceptions=True)


async def _copy(src, dst, count):
    """Copy ``src`` to ``dst`` until EOF, then shut down ``dst``'s writing."""
    while data := await src.read(CHUNK_BYTES):
        dst.write(data)
        count(len(data))
        await dst.drain()
    if dst.can_write_eof() and not dst.is_closing():
        dst.write_eof()


def _reset(writer):
    # The target refused: answer the client with a reset rather than a FIN,
    # so it sees a failed connection and not an empty reply. SO_LINGER with
    # a zero timeout makes close() send RST.
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        except OSError:
            pass  # already gone; abort() below still closes it
    writer.transport.abort()


def _reason(exc):
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    if isinstance(exc, TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT_S:g} s"
    return str(exc) or type(exc).__name__
