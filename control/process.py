"""Entry point of the control process: ``python -m control.process``.

The supervisor starts it with a JSON specification (``--spec``) that names
the inherited file descriptors: the UDP sockets, one seqpacket channel per
worker, the channel to the supervisor and the shared counters. It runs the
host side (:mod:`control.hostside`) or the VM side (:mod:`control.vmside`)
on one uvloop event loop; every system change (addresses, routes, iptables)
happens here and nowhere in the data path.
"""

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time

import psutil
import uvloop

from control import localsock, messages
from fastfwd import frames, linux, logsetup
from fastfwd import stats as st
from fastfwd.errors import EXIT_SETUP, FastfwdError

log = logging.getLogger(__name__)

TICK_S = 1.0
PATH_MTU_CHECK_S = 5.0


class Side:
    """What the host side and the VM side share: channels, ticks, status.

    Subclasses implement :meth:`setup`, :meth:`teardown`, :meth:`cleanup`,
    :meth:`on_tick`, :meth:`on_frame` and :meth:`on_control_body`.
    """

    name = "?"

    def __init__(self, spec):
        self.spec = spec
        self.loop = asyncio.get_running_loop()
        self.tun_name = spec["tun_name"]
        self.socks = [_sock(fd, socket.SOCK_DGRAM) for fd in spec["udp_fds"]]
        self.sup = _sock(spec["sup_fd"], socket.SOCK_SEQPACKET)
        self.channels = [
            (c["role"], c["queue"], _sock(c["fd"], socket.SOCK_SEQPACKET))
            for c in spec["channels"]
        ]
        self.counters = st.Counters(spec["stats_fd"])
        self.pids = {}  # "reader0" -> pid
        self.restarts = {}  # "reader0" -> times restarted, from the supervisor
        self.stopped = self.loop.create_future()
        self.framing = "compat"
        self.framing_label = "compat"
        self.frame_seg = 0
        # Offload frames reach this side whole as UDP_SEGMENT runs until a
        # writer counts one that did not (the path cuts them up).
        self.gso_frames_ok = _udp_gro_on(self.socks)
        self._splits_seen = 0
        self._peer_args = ([], "compat", 0)
        self._next_mtu_check = 0.0
        self.started_at = time.time()
        self.local = None

    # channels

    def listen(self):
        """Take the supervisor's messages; the workers' wait for
        :meth:`listen_workers`."""
        self.loop.add_reader(self.sup.fileno(), self._drain, self.sup, "supervisor")

    def listen_workers(self):
        """Take what the workers pass up (frames from the peer). Called once
        set-up is done, so a frame never meets a half-built side: a hello
        read during set-up would be overtaken by the peer restored from the
        state file. Meanwhile the frames wait in the channels."""
        for role, queue, chan in self.channels:
            self.loop.add_reader(chan.fileno(), self._drain, chan, f"{role}{queue}")

    def _drain(self, chan, who):
        while True:
            try:
                data = chan.recv(messages.MAX_MESSAGE_BYTES)
            except BlockingIOError:
                return
            if not data:
                self.loop.remove_reader(chan.fileno())
                return
            try:
                msg = messages.unpack(data)
            except ValueError as exc:
                log.warning("bad message from=%s reason=%s", who, exc)
                continue
            try:
                self._dispatch(msg, who)
            except Exception:
                log.exception(
                    "message handling failed from=%s op=%s", who, msg.get("op")
                )

    def _dispatch(self, msg, who):
        op = msg["op"]
        if op == messages.FRAME:
            self.on_frame(messages.peer_from_wire(msg.get("src")), msg["data"])
        elif op == messages.CONTROL_BODY:
            self.on_control_body(msg["body"])
        elif op == messages.EXPOSE_FRAME:
            src = messages.peer_from_wire(msg.get("src"))
            self.on_expose_frame(src, msg["data"], msg.get("local", ""))
        elif op == messages.UNKNOWN_SOURCE:
            self.on_unknown_source(messages.peer_from_wire(msg.get("src")))
        elif op == messages.CHILD_STARTED:
            if msg["role"] == "control":
                self.restarts["control"] = msg.get("restarts", 0)
                return
            name = f"{msg['role']}{msg['queue']}"
            self.pids[name] = msg["pid"]
            self.restarts[name] = msg.get("restarts", 0)
            log.debug("worker started name=%s pid=%d", name, msg["pid"])
            self.on_worker_started(msg["role"], msg["queue"])
        elif op == messages.SHUTDOWN:
            self.stop()

    def to_workers(self, packed, role=None):
        for r, _, chan in self.channels:
            if role is None or r == role:
                try:
                    chan.send(packed)
                except OSError as exc:
                    log.warning(
                        "worker channel full, message dropped errno=%s", exc.errno
                    )

    def set_workers_peer(self, addrs, framing, peer_caps=0):
        """Tell every worker whom to talk to and how to frame; logs a
        change of framing. With ``peer_caps`` holding CAP_GSO_FRAMES (and
        this side still receiving frames whole) offload frames travel as
        UDP_SEGMENT runs sized for the path to the peer."""
        self._peer_args = (list(addrs), framing, peer_caps)
        seg = 0
        if framing == "offload" and peer_caps & frames.CAP_GSO_FRAMES and addrs:
            try:
                seg = linux.udp_payload_limit(addrs[0])
            except (OSError, OverflowError, ValueError) as exc:
                log.debug("path MTU unknown reason=%s", exc)
        label = framing if not seg else f"{framing}+gso-frames"
        if label != self.framing_label:
            log.info("framing changed framing=%s segment_bytes=%d", framing, seg)
            self.framing_label = label
        self.framing = framing
        self.frame_seg = seg
        self.to_workers(
            messages.pack(
                messages.SET_PEER, addrs=messages.peers_to_wire(addrs),
                framing=framing, frame_seg=seg,
            )  # fmt: skip
        )

    def to_supervisor(self, packed):
        self.sup.send(packed)

    def stop(self):
        if not self.stopped.done():
            self.stopped.set_result(None)

    # counters

    def slots(self, role):
        return [
            self.counters.read(st.slot_index(role, q))
            for q in range(self.spec["workers"])
        ]

    def refresh_frame_segments(self, now):
        """Follow the path MTU: when the largest unfragmented payload to the
        peer changed (an underlay MTU changed), tell the readers the new
        segment size; a reader that met EMSGSIZE meanwhile sends whole
        datagrams."""
        if now < self._next_mtu_check or not self.frame_seg:
            return
        self._next_mtu_check = now + PATH_MTU_CHECK_S
        addrs, framing, caps = self._peer_args
        try:
            seg = linux.udp_payload_limit(addrs[0])
        except (OSError, IndexError):
            return
        if seg != self.frame_seg:
            log.info("path MTU changed segment_bytes=%d was=%d", seg, self.frame_seg)
            self.set_workers_peer(addrs, framing, caps)

    def check_splits(self):
        """True once, when writers first report offload frames that did not
        arrive whole: this side then stops asking for GSO frames."""
        splits = sum(s["drops_split"] for s in self.slots("writer"))
        if splits > self._splits_seen and self.gso_frames_ok:
            self._splits_seen = splits
            self.gso_frames_ok = False
            log.warning(
                "offload frames arrive cut up on this path drops=%d; "
                "asking the peer for whole datagrams again", splits,
            )  # fmt: skip
            return True
        return False

    def latest(self, role, field):
        """Newest monotonic timestamp (seconds) of ``field`` over all workers."""
        ns = max((s[field] for s in self.slots(role)), default=0)
        return ns / 1e9

    async def status(self):
        """The state ``fastfwd status`` prints."""
        procs = []
        for name in sorted(self.pids):
            role = "reader" if name.startswith("reader") else "writer"
            queue = int(name[len(role) :])
            entry = {
                "name": name,
                "pid": self.pids[name],
                "restarts": self.restarts.get(name, 0),
            }
            entry["counters"] = {
                k: v
                for k, v in self.counters.read(st.slot_index(role, queue)).items()
                if not k.startswith("last_")
            }
            entry.update(_usage(self.pids[name]))
            procs.append(entry)
        control = {
            "name": "control",
            "pid": os.getpid(),
            "counters": {},
            "restarts": self.restarts.get("control", 0),
        }
        control.update(_usage(os.getpid()))
        procs.insert(0, control)
        return {
            "side": self.name,
            "tun": self.tun_name,
            "uptime_s": round(time.time() - self.started_at, 1),
            "processes": procs,
        }

    # subclass hooks

    async def setup(self):
        raise NotImplementedError

    async def teardown(self):
        raise NotImplementedError

    async def cleanup(self):
        raise NotImplementedError

    async def on_tick(self, now):
        pass

    def on_frame(self, src, data):
        pass

    def on_control_body(self, body):
        pass

    def on_unknown_source(self, src):
        pass

    def on_expose_frame(self, src, data, local=""):
        pass

    def on_worker_started(self, role, queue):
        pass

    def on_sighup(self):
        pass

    async def on_local_request(self, request):
        if request.get("op") == "status":
            return {"ok": True, "status": await self.status()}
        return {
            "ok": False,
            "code": "unknown_op",
            "error": f"unknown request {request.get('op')!r}",
        }

    async def run_ticks(self):
        while True:
            await asyncio.sleep(TICK_S)
            try:
                await self.on_tick(time.monotonic())
            except Exception:
                log.exception("periodic task failed")


def framing_for(caps):
    """The best framing a fastfwd peer with these capabilities accepts."""
    if caps & frames.CAP_OFFLOAD:
        return "offload"
    return "compat"


def _usage(pid):
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            cpu = p.cpu_times()
            mem = p.memory_info()
            cpus = p.cpu_affinity()
        try:
            pss = p.memory_full_info().pss
        except (psutil.AccessDenied, AttributeError):
            pss = None
        return {
            "cpu_s": round(cpu.user + cpu.system, 2),
            "rss_bytes": mem.rss,
            "pss_bytes": pss,
            "cpus": sorted(cpus),
        }
    except psutil.Error:
        return {}


def _udp_gro_on(socks):
    """Whether the sockets hand over UDP_GRO runs whole (Linux >= 5.0)."""
    try:
        return all(s.getsockopt(linux.SOL_UDP, linux.UDP_GRO) for s in socks)
    except OSError:
        return False


def _sock(fd, kind):
    s = socket.socket(fileno=fd)
    s.setblocking(False)
    return s


def _side_class(name):
    if name == "host":
        from control.hostside import HostSide

        return HostSide
    if name == "access":
        from control.accessside import AccessSide

        return AccessSide
    from control.vmside import VmSide

    return VmSide


async def run_control(spec):
    loop = asyncio.get_running_loop()
    # A SIGHUP during set-up must not kill the process; it reloads once
    # set-up is done.
    hup_pending = []
    loop.add_signal_handler(signal.SIGHUP, hup_pending.append, True)
    side = _side_class(spec["side"])(spec)
    loop.add_signal_handler(signal.SIGTERM, side.stop)
    loop.add_signal_handler(signal.SIGINT, side.stop)
    if spec.get("cleanup_only"):
        await side.cleanup()
        return 0
    side.listen()

    async def failed(reason, exit_code, undo):
        """Set-up failed: tell the supervisor (which exits with the code)
        and undo what was made."""
        side.to_supervisor(
            messages.pack(messages.FATAL, reason=reason, exit_code=exit_code)
        )
        await undo()
        return exit_code

    try:
        await side.setup()
    except FastfwdError as exc:
        log.error("set-up failed reason=%s", exc)
        return await failed(str(exc), exc.exit_code, side.cleanup)
    except Exception as exc:
        log.exception("set-up failed")
        return await failed(f"set-up failed: {exc}", EXIT_SETUP, side.cleanup)
    side.listen_workers()
    loop.add_signal_handler(signal.SIGHUP, side.on_sighup)
    if hup_pending:
        side.on_sighup()
    if spec.get("socket"):
        try:
            side.local = await localsock.serve(spec["socket"], side.on_local_request)
            local_inode = localsock.inode(spec["socket"])
        except FastfwdError as exc:
            log.error("set-up failed reason=%s", exc)
            return await failed(str(exc), exc.exit_code, side.teardown)
    side.to_supervisor(messages.pack(messages.READY))
    ticks = loop.create_task(side.run_ticks())
    await side.stopped
    ticks.cancel()
    if side.local is not None:
        side.local.close()
        localsock.remove_own(spec["socket"], local_inode)
    await side.teardown()
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="fastfwd-control")
    p.add_argument("--spec", required=True)
    args = p.parse_args(argv)
    spec = json.loads(args.spec)
    linux.die_with_parent(spec["parent"])
    linux.set_process_name("fastfwd-control")
    logsetup.setup(
        "control" if not spec.get("cleanup_only") else "cleanup",
        spec.get("loglevel", "INFO"),
    )
    code = uvloop.run(run_control(spec))
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
