"""Hot reload in the lab: every way an editor or a script changes the
configuration file is followed, and a bad file changes nothing."""

import os
import signal
import time

from lab.pytest_support import root_marks
from lab.tunnel import Tunnel
from tests.e2e.helpers import fastfwd_routes as kernel_routes
from tests.e2e.helpers import answers, wait_for

pytestmark = root_marks()


def test_config_file_changes_are_followed_and_bad_files_change_nothing(lab, tmp_path):
    b1, b2 = (str(b.subnet) for b in lab.bridges)
    t = Tunnel(lab, tmp_path / "t", routes=[b1])
    base = open(t.config).read()
    t.start()
    try:
        assert kernel_routes(lab) == [b1]

        # append
        with open(t.config, "a") as f:
            f.write(f"route {b2}\n")
        assert wait_for(lambda: kernel_routes(lab) == sorted([b1, b2])), t.logs()
        assert answers(lab, str(lab.containers[1].ip))

        # an editor's save: write a temporary file, rename it over the original
        tmp = t.config + ".swp"
        with open(tmp, "w") as f:
            f.write(base)
        os.replace(tmp, t.config)
        assert wait_for(lambda: kernel_routes(lab) == [b1]), t.logs()

        # a bad line: reported with its line number, nothing applied
        with open(t.config, "a") as f:
            f.write(f"route {b2}\nroute not-a-subnet\n")
        assert wait_for(lambda: "configuration rejected" in t.logs()), t.logs()
        assert ":".join(["host.conf", str(len(base.splitlines()) + 2)]) in t.logs()
        time.sleep(0.5)
        assert kernel_routes(lab) == [b1]
        assert answers(lab, str(lab.containers[0].ip))

        # deleted: the running configuration stays; re-created: applied
        os.unlink(t.config)
        time.sleep(0.6)
        assert kernel_routes(lab) == [b1]
        with open(t.config, "w") as f:
            f.write(base + f"route {b2}\n")
        assert wait_for(lambda: kernel_routes(lab) == sorted([b1, b2])), t.logs()

        # in-place rewrite (truncate and write)
        with open(t.config, "r+") as f:
            f.truncate(0)
            f.write(base)
        assert wait_for(lambda: kernel_routes(lab) == [b1]), t.logs()
    finally:
        t.stop()


def test_symlink_swap_and_sighup_reload(lab, tmp_path):
    b1, b2 = (str(b.subnet) for b in lab.bridges)
    t = Tunnel(lab, tmp_path / "t", routes=[b1])
    base = open(t.config).read()
    v1, v2 = t.config + ".v1", t.config + ".v2"
    os.replace(t.config, v1)
    with open(v2, "w") as f:
        f.write(base + f"route {b2}\n")
    os.symlink(v1, t.config)
    t.start()
    try:
        assert kernel_routes(lab) == [b1]
        # ln -sfn: a new link renamed over the old one
        os.symlink(v2, t.config + ".new")
        os.replace(t.config + ".new", t.config)
        assert wait_for(lambda: kernel_routes(lab) == sorted([b1, b2])), t.logs()
        # the new target is followed too
        with open(v2, "w") as f:
            f.write(base)
        assert wait_for(lambda: kernel_routes(lab) == [b1]), t.logs()

        # SIGHUP reloads as well (here: the same content, nothing changes)
        t.host_proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert t.host_proc.poll() is None
        assert kernel_routes(lab) == [b1]
    finally:
        t.stop()


def test_config_command_applies_saves_and_refuses_cleanly(lab, tmp_path):
    import subprocess
    import sys

    b1, b2 = (str(b.subnet) for b in lab.bridges)
    t = Tunnel(lab, tmp_path / "t", routes=[b1])
    t.start()

    def cli(*lines):
        return subprocess.run(
            [sys.executable, "-m", "fastfwd", "config", "--socket", t.host_socket, *lines],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip

    try:
        res = cli(f"route {b2}", "route also-bad", "mtu 9")
        assert res.returncode == 2
        assert "<config>:2:" in res.stderr and "<config>:3:" in res.stderr
        assert kernel_routes(lab) == [b1]
        assert f"route {b2}" not in open(t.config).read()

        res = cli("")  # no line at all: usage, like a bad line
        assert res.returncode == 2 and "no configuration line" in res.stderr

        res = cli(f"route {b2}")
        assert res.returncode == 0, res.stderr
        assert wait_for(lambda: kernel_routes(lab) == sorted([b1, b2]))
        assert open(t.config).read().endswith(f"route {b2}\n")

        res = cli("mtu 1300")  # restart-only: saved, reported, not applied
        assert res.returncode == 1
        assert "mtu takes effect at the next restart" in res.stderr
        assert t.status("host")["processes"]  # still running

        res = cli(f"route {lab.underlay}")  # overlaps the host's own network
        assert res.returncode == 1 and "refused" in res.stderr
        assert str(lab.underlay) not in kernel_routes(lab)
    finally:
        t.stop()
