"""The supervisor: the process the user starts, parent of all the others.

It runs the standard asyncio loop, not uvloop: it forwards no packets, and
uvloop reserves SIGCHLD for its own subprocess tracking.

It owns every file descriptor the data path uses (TUN queues, UDP sockets,
the shared counters and both ends of every channel), so that a child that
dies loses nothing: its replacement inherits the same descriptors, and the
channel to the control process keeps whatever was queued in it. It restarts
any child that dies, and on SIGINT/SIGTERM asks the control process to undo
what it set up, then closes the TUN queues, which removes the device and
every route on it.
"""

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

from control import messages
from fastfwd import errors, steering
from fastfwd import stats as st

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 30.0
SHUTDOWN_TIMEOUT_S = 10.0
RESTART_BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)
HEALTHY_AFTER_S = 30.0


class Child:
    """One supervised process and how to start it again."""

    def __init__(self, name, argv, pass_fds, env=None, cpu=None):
        self.name = name
        self.cpu = cpu  # pinned to this CPU (see fastfwd.steering)
        self.argv = argv
        self.pass_fds = pass_fds
        self.env = env
        self.proc = None
        self.started_at = 0.0
        self.restarts = 0
        self.failures = 0

    def spawn(self):
        self.proc = subprocess.Popen(
            self.argv,
            pass_fds=self.pass_fds,
            stdin=subprocess.DEVNULL,
            env=self.env,
            # Ctrl-C reaches only the supervisor, which stops children in order.
            process_group=0,
        )
        if self.cpu is not None:
            steering.pin(self.proc.pid, self.cpu)
        self.started_at = time.monotonic()
        return self.proc.pid


def _seqpacket_pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        s.set_inheritable(True)
    return a, b


class Supervisor:
    """Starts and keeps alive the control process and the workers of a side.

    ``side`` is "host", "vm" or "access"; ``tun_fds`` holds one TUN queue fd per
    worker and ``udp_socks`` one UDP socket per worker; ``control_args`` is
    passed to the control process as its specification (JSON).
    """

    def __init__(
        self,
        side,
        tun_name,
        tun_fds,
        udp_socks,
        control_args,
        loglevel,
        vnet_hdr=False,
        control_env=None,
        steer=True,
    ):
        self.side = side
        self.control_env = control_env or {}  # secrets: kept out of argv
        self.vnet_hdr = vnet_hdr
        self.tun_name = tun_name
        self.tun_fds = tun_fds
        self.udp_socks = udp_socks
        self.control_args = control_args
        self.loglevel = loglevel
        self.workers = len(tun_fds)
        if steer:
            self.writer_cpus = steering.apply(side, tun_name, self.workers)
        else:
            self.writer_cpus = {}
            log.info("steering off reason=switched off")
        self.stats_fd = st.create(self.workers)
        os.set_inheritable(self.stats_fd, True)
        for fd in tun_fds:
            os.set_inheritable(fd, True)
        for s in udp_socks:
            s.set_inheritable(True)
        self.sup_ours, self.sup_theirs = _seqpacket_pair()
        self.sup_ours.setblocking(False)
        self.channels = []  # (role, queue, control end, worker end)
        for q in range(self.workers):
            for role in ("reader", "writer"):
                ctl_end, wrk_end = _seqpacket_pair()
                self.channels.append((role, q, ctl_end, wrk_end))
        self.children = {}
        self.control = None
        self.exit_code = 0
        self._stopping = False
        self._stop_event = None
        self._ready = None

    # children

    def _control_child(self, cleanup_only=False):
        spec = dict(self.control_args)
        spec.update(
            side=self.side,
            tun_name=self.tun_name,
            vnet_hdr=self.vnet_hdr,
            udp_fds=[s.fileno() for s in self.udp_socks],
            sup_fd=self.sup_theirs.fileno(),
            stats_fd=self.stats_fd,
            workers=self.workers,
            channels=[
                {"role": role, "queue": q, "fd": ctl.fileno()}
                for role, q, ctl, _ in self.channels
            ],
            parent=os.getpid(),
            cleanup_only=cleanup_only,
            loglevel=self.loglevel,
        )
        # The control process holds a TUN queue too, unused: the device then
        # outlives the workers until the control process has finished
        # undoing its rules, so a new instance cannot start on the same
        # device and have its fresh rules purged by the old one's clean-up.
        fds = [s.fileno() for s in self.udp_socks]
        fds += [self.sup_theirs.fileno(), self.stats_fd, self.tun_fds[0]]
        fds += [ctl.fileno() for _, _, ctl, _ in self.channels]
        argv = [sys.executable, "-m", "control.process", "--spec", json.dumps(spec)]
        env = dict(os.environ, **self.control_env) if self.control_env else None
        return Child("control", argv, fds, env)

    def _worker_child(self, role, queue, wrk_end):
        tun_fd = self.tun_fds[queue]
        udp = self.udp_socks[queue % len(self.udp_socks)]
        argv = [
            sys.executable, "-m", "fastfwd.worker",
            "--role", role, "--queue", str(queue),
            "--tun-fd", str(tun_fd), "--udp-fd", str(udp.fileno()),
            "--chan-fd", str(wrk_end.fileno()), "--stats-fd", str(self.stats_fd),
            "--parent", str(os.getpid()), "--loglevel", self.loglevel,
        ]  # fmt: skip
        if self.side in ("vm", "access"):
            argv.append("--client")
        if self.vnet_hdr:
            argv.append("--vnet-hdr")
        fds = [tun_fd, udp.fileno(), wrk_end.fileno(), self.stats_fd]
        cpu = self.writer_cpus.get(queue) if role == "writer" else None
        return Child(f"{role}{queue}", argv, fds, cpu=cpu)

    def _announce(self, child):
        if self.control is None:
            return
        if child.name == "control":
            role, queue = "control", 0
        else:
            role = "reader" if child.name.startswith("reader") else "writer"
            queue = int(child.name[len(role) :])
        self._send_control(
            messages.pack(
                messages.CHILD_STARTED,
                role=role,
                queue=queue,
                pid=child.proc.pid,
                restarts=child.restarts,
            )  # fmt: skip
        )

    def _send_control(self, packed):
        try:
            self.sup_ours.send(packed)
        except OSError as exc:
            log.warning("control channel full, message dropped errno=%s", exc.errno)

    # lifecycle

    async def run(self):
        """Run until a stop signal; returns the process exit code."""
        loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._ready = loop.create_future()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._forward_signal, signal.SIGHUP)
        loop.add_signal_handler(signal.SIGCHLD, self._reap)
        loop.add_reader(self.sup_ours.fileno(), self._on_control_message)

        self.control = self._control_child()
        self.children["control"] = self.control
        self.control.spawn()
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), READY_TIMEOUT_S)
        except asyncio.TimeoutError:
            self._ready.set_exception(
                errors.FastfwdError(
                    f"control process not ready after {READY_TIMEOUT_S:.0f}s"
                )
            )
        if self._ready.exception() is not None:
            await self._shutdown()
            raise self._ready.exception()

        for role, q, _, wrk_end in self.channels:
            child = self._worker_child(role, q, wrk_end)
            self.children[child.name] = child
            child.spawn()
            self._announce(child)
        log.info(
            "started side=%s tun=%s workers=%d", self.side, self.tun_name, self.workers
        )
        await self._stop_event.wait()
        await self._shutdown()
        return self.exit_code

    def _on_stop_signal(self, sig):
        log.info("stopping signal=%s", signal.Signals(sig).name)
        self._stopping = True
        self._stop_event.set()

    def _forward_signal(self, sig):
        if self.control and self.control.proc and self.control.proc.poll() is None:
            self.control.proc.send_signal(sig)

    def _on_control_message(self):
        while True:
            try:
                data = self.sup_ours.recv(messages.MAX_MESSAGE_BYTES)
            except BlockingIOError:
                return
            if not data:
                return
            try:
                msg = messages.unpack(data)
            except ValueError:
                continue
            if msg["op"] == messages.READY:
                if not self._ready.done():
                    self._ready.set_result(None)
                # Every pid, in case the control process was restarted.
                for child in self.children.values():
                    if child.proc is not None and child.proc.poll() is None:
                        self._announce(child)
            elif msg["op"] == messages.FATAL:
                reason = msg.get("reason", "control process failed")
                exc = errors.FastfwdError(reason)
                exc.exit_code = int(msg.get("exit_code", errors.EXIT_SETUP))
                if not self._ready.done():
                    self._ready.set_exception(exc)
                else:
                    # A restarted control process that cannot set up again
                    # exits; it is restarted with backoff like any crash.
                    log.error("control failed reason=%s", reason)

    def _reap(self):
        for name, child in list(self.children.items()):
            if child.proc is None or child.proc.poll() is None:
                continue
            code = child.proc.returncode
            if self._stopping:
                continue
            if name == "control" and not self._ready.done():
                # Only the first start can fail the whole run.
                self._ready.set_exception(
                    errors.FastfwdError(
                        f"control process exited during set-up code={code}"
                    )
                )
                continue
            healthy = time.monotonic() - child.started_at > HEALTHY_AFTER_S
            child.failures = 0 if healthy else child.failures + 1
            delay = RESTART_BACKOFF_S[min(child.failures, len(RESTART_BACKOFF_S) - 1)]
            log.warning(
                "child died name=%s code=%s restart_in_s=%.1f", name, code, delay
            )
            child.proc = None
            asyncio.get_running_loop().call_later(delay, self._restart, child)

    def _restart(self, child):
        if self._stopping or child.proc is not None:
            return
        child.restarts += 1
        child.spawn()
        if child.name != "control":
            self._announce(child)

    async def _shutdown(self):
        self._stopping = True
        # workers first: nothing forwards while control tears down routes.
        workers = [c for n, c in self.children.items() if n != "control"]
        for child in workers:
            _terminate(child)
        control_ok = False
        if self.control.proc is not None and self.control.proc.poll() is None:
            self._send_control(messages.pack(messages.SHUTDOWN))
            control_ok = await _wait_exit(self.control.proc, SHUTDOWN_TIMEOUT_S) == 0
        if not control_ok:
            # The control process died or hung: a fresh one undoes its work.
            if self.control.proc is not None and self.control.proc.poll() is None:
                self.control.proc.kill()
            cleaner = self._control_child(cleanup_only=True)
            cleaner.spawn()
            await _wait_exit(cleaner.proc, SHUTDOWN_TIMEOUT_S)
        for child in workers:
            await _wait_exit(child.proc, 5.0)
        for fd in self.tun_fds:
            os.close(fd)
        self.tun_fds = []
        for s in self.udp_socks:
            s.close()
        log.info("stopped side=%s", self.side)


def _terminate(child):
    if child.proc is not None and child.proc.poll() is None:
        child.proc.terminate()


async def _wait_exit(proc, timeout_s):
    """Wait for ``proc`` to exit; kill it after ``timeout_s``. Returns its code."""
    if proc is None:
        return None
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            break
        await asyncio.sleep(0.05)
    return proc.returncode
