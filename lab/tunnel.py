"""Both sides of fastfwd running in a lab: host side in the host namespace,
VM side in the vm namespace, each a real ``fastfwd`` process tree.

Used by the end-to-end tests, the demo and the perf harness. Every file
(configuration, state, control sockets, logs) lives in ``workdir``; the
processes are started through :meth:`Lab.popen`, so the lab stops them by
PID even if the caller forgets.
"""

import os
import signal
import subprocess
import sys
import time

from control import localsock

READY_TIMEOUT_S = 20.0


class Tunnel:
    """``fastfwd run`` and ``fastfwd connect`` wired together in ``lab``.

    ``routes`` defaults to every bridge subnet of the lab; ``lines`` are
    extra configuration lines for the host side.
    """

    def __init__(
        self,
        lab,
        workdir,
        *,
        routes=None,
        lines=(),
        mtu=1400,
        workers=1,
        vm_args=(),
        host_args=(),
    ):
        self.lab = lab
        self.workdir = str(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.routes = (
            [str(b.subnet) for b in lab.bridges] if routes is None else list(routes)
        )
        self.mtu = mtu
        self.workers = workers
        self.vm_args = list(vm_args)
        self.host_args = list(host_args)
        self.config = os.path.join(self.workdir, "host.conf")
        self.state = os.path.join(self.workdir, "host.state")
        self.host_socket = os.path.join(self.workdir, "host.sock")
        self.vm_socket = os.path.join(self.workdir, "vm.sock")
        self.host_log = os.path.join(self.workdir, "host.log")
        self.vm_log = os.path.join(self.workdir, "vm.log")
        self.access_socket = os.path.join(self.workdir, "access.sock")
        self.access_log = os.path.join(self.workdir, "access.log")
        self.host_proc = None
        self.vm_proc = None
        self.access_proc = None
        self.write_config(lines)

    def write_config(self, lines=()):
        text = [
            f"host {self.lab.host_ip}",
            f"mtu {self.mtu}",
            f"state {self.state}",
            f"socket {self.host_socket}",
            *[f"route {r}" for r in self.routes],
            *lines,
        ]
        with open(self.config, "w", encoding="utf-8") as f:
            f.write("\n".join(text) + "\n")

    def _fastfwd(self, ns, argv, log_path):
        log = open(log_path, "ab")
        try:
            return self.lab.popen(
                ns, sys.executable, "-m", "fastfwd", *argv,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=_repo_root(),
            )  # fmt: skip
        finally:
            log.close()

    def start_host(self):
        argv = [
            "run",
            "-c",
            self.config,
            "--workers",
            str(self.workers),
            *self.host_args,
        ]
        self.host_proc = self._fastfwd(self.lab.host_ns, argv, self.host_log)
        return self.host_proc

    def start_vm(self):
        argv = [
            "connect", "-host", "host.docker.internal", "-mtu", str(self.mtu),
            "--socket", self.vm_socket, "--workers", str(self.workers), *self.vm_args,
        ]  # fmt: skip
        self.vm_proc = self._fastfwd(self.lab.vm_ns, argv, self.vm_log)
        return self.vm_proc

    def start_accessor(self, token, port, *args, host=None):
        """``fastfwd access`` in the lab's remote namespace, logging in to
        the host's expose port ``port`` on ``host`` (default: the host's
        remote-facing address)."""
        argv = [
            "access", "-remote", f"{host or self.lab.host_remote_ip}:{port}",
            "--socket", self.access_socket, *args,
        ]  # fmt: skip
        env = dict(os.environ, FASTFWD_TOKEN=token)
        log = open(self.access_log, "ab")
        try:
            self.access_proc = self.lab.popen(
                self.lab.remote_ns, sys.executable, "-m", "fastfwd", *argv,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=_repo_root(), env=env,
            )  # fmt: skip
        finally:
            log.close()
        return self.access_proc

    def stop_accessor(self, sig=signal.SIGTERM, timeout_s=15.0):
        code = _signal_and_wait(self.access_proc, sig, timeout_s)
        self.lab.stop(self.access_proc)
        return code

    def start(self, timeout_s=READY_TIMEOUT_S):
        self.start_host()
        self.start_vm()
        self.wait_ready(timeout_s)
        return self

    def status(self, side):
        path = {"host": self.host_socket, "vm": self.vm_socket}.get(
            side, self.access_socket
        )
        reply = localsock.request(path, {"op": "status"})
        return reply["status"]

    def config_lines(self, *lines):
        return localsock.request(
            self.host_socket, {"op": "config", "lines": list(lines)}
        )

    def wait_ready(self, timeout_s=READY_TIMEOUT_S):
        """Wait until the host knows its peer and the VM side its host."""
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            for proc, name in ((self.host_proc, "host"), (self.vm_proc, "vm")):
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(
                        f"fastfwd {name} side exited code={proc.returncode}\n{self.logs()}"
                    )
            try:
                host, vm = self.status("host"), self.status("vm")
                if host.get("peer") and vm.get("host") and host["routes"]:
                    return host, vm
                last = (host, vm)
            except OSError as exc:
                last = exc
            time.sleep(0.1)
        raise TimeoutError(
            f"tunnel not ready after {timeout_s}s: {last}\n{self.logs()}"
        )

    def stop_host(self, sig=signal.SIGTERM, timeout_s=15.0):
        code = _signal_and_wait(self.host_proc, sig, timeout_s)
        self.lab.stop(self.host_proc)
        return code

    def stop_vm(self, sig=signal.SIGTERM, timeout_s=15.0):
        code = _signal_and_wait(self.vm_proc, sig, timeout_s)
        self.lab.stop(self.vm_proc)
        return code

    def stop(self):
        codes = []
        for proc, stop in (
            (self.access_proc, self.stop_accessor),
            (self.vm_proc, self.stop_vm),
            (self.host_proc, self.stop_host),
        ):
            if proc is not None and proc.poll() is None:
                codes.append(stop())
        return codes

    def logs(self):
        out = []
        for path in (self.host_log, self.vm_log, self.access_log):
            if os.path.exists(path):
                with open(path, encoding="utf-8", errors="replace") as f:
                    out.append(f"--- {os.path.basename(path)}\n{f.read()[-6000:]}")
        return "\n".join(out)


def _signal_and_wait(proc, sig, timeout_s):
    if proc is None or proc.poll() is not None:
        return None if proc is None else proc.returncode
    # `ip netns exec` execs the command, so the pid is fastfwd's supervisor.
    proc.send_signal(sig)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return None


def _repo_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
