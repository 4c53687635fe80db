"""A shared secret: only a signed hello can change the host's peer."""

import contextlib
import os
import time

from lab.nsocket import socket_in
from lab.pytest_support import root_marks
from lab.tunnel import Tunnel
from tests.e2e.helpers import pid_of, wait_for

pytestmark = root_marks()

SECRET = "correct-horse-battery-staple"


def start(lab, tmp_path, vm_secret):
    secret_file = tmp_path / "secret"
    secret_file.write_text(vm_secret + "\n")
    os.chmod(secret_file, 0o600)
    t = Tunnel(
        lab,
        tmp_path / "t",
        lines=[f"secret {SECRET}"],
        vm_args=["--secret-file", str(secret_file)],
    )
    t.start_host()
    t.start_vm()
    return t


@contextlib.contextmanager
def pair_and_stranger(lab, tmp_path):
    """A ready pair sharing the secret, and a UDP socket of someone else's
    in the VM's namespace."""
    t = start(lab, tmp_path, SECRET)
    stranger = socket_in(lab.vm_ns)
    try:
        t.wait_ready()
        stranger.bind(("0.0.0.0", 0))
        yield t, stranger
    finally:
        stranger.close()
        t.stop()


def test_with_a_secret_a_stranger_cannot_take_the_tunnel_from_a_restarted_vm_side(
    lab, tmp_path
):
    with pair_and_stranger(lab, tmp_path) as (t, stranger):
        first = t.status("host")["peer"]
        t.stop_vm()
        # The stranger heartbeats all through the VM side's restart.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            stranger.sendto(b"\x00", (str(lab.host_ip), 2511))
            time.sleep(0.05)
        t.start_vm()
        for _ in range(40):
            stranger.sendto(b"\x00", (str(lab.host_ip), 2511))
            time.sleep(0.05)
        # The restarted VM side is followed at once (its hello is signed),
        # without waiting for the old peer's silence, and never the stranger.
        peer = wait_for(lambda: (p := t.status("host")["peer"]) != first and p, 10)
        assert peer and peer != "%s:%d" % stranger.getsockname(), t.logs()
        assert (
            lab.run(
                lab.host_ns,
                "ping",
                "-c2",
                "-W2",
                str(lab.containers[0].ip),
                check=False,
            ).returncode
            == 0
        )


def test_a_vm_side_with_the_wrong_secret_is_never_the_peer(lab, tmp_path):
    t = start(lab, tmp_path, "a-different-secret-value")
    try:
        assert wait_for(lambda: t.status("host")["rejected_hellos"] > 0, 10), t.logs()
        time.sleep(1)
        assert t.status("host")["peer"] is None
        with open(t.host_log, encoding="utf-8") as f:
            warnings = [line for line in f if "same secret?" in line]
        assert len(warnings) == 1, t.logs()  # said once, not per hello
        assert (
            lab.run(
                lab.host_ns,
                "ping",
                "-c1",
                "-W1",
                str(lab.containers[0].ip),
                check=False,
            ).returncode
            != 0
        )
    finally:
        t.stop()


def test_a_signed_hello_from_before_a_control_restart_is_refused_after_it(
    lab, tmp_path
):
    from fastfwd import frames

    with pair_and_stranger(lab, tmp_path) as (t, replayer):
        peer = t.status("host")["peer"]
        # What a capture of the VM side's hello would hold: signed a moment
        # before the restart, within the clock window, never accepted yet.
        old_hello = frames.encode_hello(
            frames.Hello(1, frames.CAP_OFFLOAD, 1400),
            SECRET.encode(),
            now_ms=int(time.time() * 1000) - 500,
        )
        control = pid_of(t, "host", "control")
        os.kill(control, 9)
        replayer.sendto(old_hello, (str(lab.host_ip), 2511))  # waits in the queue
        assert wait_for(lambda: pid_of(t, "host", "control") != control, 20), t.logs()
        time.sleep(1)
        status = t.status("host")
        assert status["peer"] == peer, t.logs()
        assert status["rejected_hellos"] >= 1, t.logs()
