"""Entry point of one worker process: a reader or a writer of one queue.

Started by the supervisor as ``python -m fastfwd.worker`` with the file
descriptors it inherited: the TUN queue, the UDP socket, the seqpacket
channel to the control process and the shared counters. The process runs one
uvloop event loop until SIGTERM or until its parent dies.
"""

import argparse
import asyncio
import logging
import os
import signal
import socket

import uvloop

from control import messages
from fastfwd import engine, linux, logsetup
from fastfwd import stats as st

log = logging.getLogger(__name__)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="fastfwd-worker")
    p.add_argument("--role", choices=("reader", "writer"), required=True)
    p.add_argument("--queue", type=int, default=0)
    # The client role (VM side, accessor): one server address, told by the
    # control process; the socket itself is never connected.
    p.add_argument("--client", action="store_true")
    p.add_argument("--vnet-hdr", action="store_true")
    p.add_argument("--tun-fd", type=int, required=True)
    p.add_argument("--udp-fd", type=int, required=True)
    p.add_argument("--chan-fd", type=int, required=True)
    p.add_argument("--stats-fd", type=int, required=True)
    p.add_argument("--parent", type=int, required=True)
    p.add_argument("--loglevel", default="INFO")
    return p.parse_args(argv)


class Worker:
    """Binds one engine loop to its control channel."""

    def __init__(self, loop, args):
        self.loop = loop
        self.args = args
        self.counters = st.Counters(args.stats_fd)
        slot = self.counters.slot(st.slot_index(args.role, args.queue))
        self.sock = socket.socket(fileno=args.udp_fd)
        self.sock.setblocking(False)
        self.channel = socket.socket(fileno=args.chan_fd)
        self.channel.setblocking(False)
        if args.role == "reader":
            self.engine = engine.Reader(
                loop, args.tun_fd, self.sock, slot, connected=False,
                vnet_hdr=args.vnet_hdr, gso=True,
            )  # fmt: skip
        else:
            self.engine = engine.Writer(
                loop, args.tun_fd, self.sock, slot, self.channel,
                connected=args.client, vnet_hdr=args.vnet_hdr,
            )  # fmt: skip
        self.stopped = loop.create_future()

    def start(self):
        self._on_channel()  # apply what the control process already sent
        if self.args.role == "writer":
            self.engine.refresh_peers = self._on_channel
        self.engine.start()
        self.loop.add_reader(self.channel.fileno(), self._on_channel)

    def _on_channel(self):
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(
                    self.channel, messages.MAX_MESSAGE_BYTES, 1
                )
            except BlockingIOError:
                return
            except OSError as exc:
                log.error("control channel failed errno=%s", exc.errno)
                self._stop()
                return
            if not data:
                self._stop()
                return
            try:
                self.handle(messages.unpack(data), fds)
            except ValueError as exc:
                for fd in fds:
                    os.close(fd)
                log.warning("bad control message reason=%s", exc)

    def handle(self, msg, fds=()):
        op = msg["op"]
        if op == messages.SET_EXPOSE and self.args.role == "writer":
            sock = socket.socket(fileno=fds[0]) if fds else None
            self.engine.set_expose(sock, bool(msg.get("read")))
            log.debug("expose socket set present=%s", sock is not None)
            return
        for fd in fds:  # only SET_EXPOSE carries one
            os.close(fd)
        if op == messages.SET_SESSIONS and self.args.role == "writer":
            self.engine.set_sessions(
                [
                    (s[0], (s[1], int(s[2])), s[3] if len(s) > 3 else "")
                    for s in msg.get("sessions", ())
                ],
                msg.get("exposed", ()),
                msg.get("host_ip", ""),
                msg.get("pong", False),
            )
        elif op == messages.SET_PEER:
            addrs = messages.peers_from_wire(msg.get("addrs"))
            if self.args.role == "reader":
                # Spread the queues over the peer's worker sockets.
                self.engine.set_peer(
                    addrs[self.args.queue % len(addrs)] if addrs else None
                )
                self.set_framing(msg.get("framing", engine.COMPAT))
                self.engine.set_frame_segments(int(msg.get("frame_seg", 0)))
            else:
                self.engine.set_peer(addrs, msg.get("framing", engine.COMPAT))
            log.debug("peer set addrs=%s framing=%s", addrs, msg.get("framing"))
        elif op == messages.SET_LOGLEVEL:
            logsetup.set_level(msg.get("level", "INFO"))
        elif op == messages.STOP:
            self._stop()

    def set_framing(self, framing):
        """Switch the reader's framing and the device's offloads together.

        The reader changes framing first, so that the kernel hands over
        super-packets only to a reader that frames them whole; packets
        already queued in the old shape are dropped and counted.
        """
        if framing == self.engine.framing:
            return
        self.engine.set_framing(framing)
        try:
            flags = linux.set_offload(self.args.tun_fd, framing == engine.OFFLOAD)
        except OSError as exc:
            log.warning("offload not enabled, staying compatible errno=%s", exc.errno)
            self.engine.set_framing(engine.COMPAT)
            return
        log.info("framing changed framing=%s offload_flags=%#x", framing, flags)

    def _stop(self):
        if not self.stopped.done():
            self.stopped.set_result(None)


async def run_worker(args):
    loop = asyncio.get_running_loop()
    worker = Worker(loop, args)
    loop.add_signal_handler(signal.SIGTERM, worker._stop)
    loop.add_signal_handler(signal.SIGINT, worker._stop)
    worker.start()
    log.debug("worker started role=%s queue=%d", args.role, args.queue)
    await worker.stopped
    worker.engine.stop()


def main(argv=None):
    args = parse_args(argv)
    linux.die_with_parent(args.parent)
    role = f"{args.role}{args.queue}"
    linux.set_process_name(f"fastfwd-{role}")
    logsetup.setup(role, args.loglevel)
    uvloop.run(run_worker(args))
    os._exit(0)


if __name__ == "__main__":
    main()
