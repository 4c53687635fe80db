import subprocess
import sys

from control import cli


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "fastfwd", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_names_every_bad_line_with_its_number(tmp_path):
    conf = tmp_path / "bad.conf"
    conf.write_text(
        "route 172.18.0.0/16\nroute nope\n# ok\nmtu 0\npong maybe\nroute 172.19.0.0/16 expose\n"
    )
    res = run_cli("check", "-c", str(conf))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert [line.split(":")[1] for line in lines] == ["2", "4", "5"]
    assert all(line.startswith(f"{conf}:") for line in lines)
    assert "Traceback" not in res.stderr


def test_check_accepts_a_valid_file(tmp_path):
    conf = tmp_path / "good.conf"
    conf.write_text("route 172.18.0.0/16\niptables 172.18.0.0+172.19.0.0\n")
    res = run_cli("check", "-c", str(conf))
    assert res.returncode == 0, res.stderr
    assert "ok" in res.stdout


def test_run_refuses_an_invalid_file_before_touching_anything(tmp_path):
    conf = tmp_path / "bad.conf"
    conf.write_text("mtu 99999\n")
    res = run_cli("run", "-c", str(conf))
    assert res.returncode == 2
    assert f"{conf}:1: mtu 99999 is outside" in res.stderr
    assert "not started" in res.stderr


def test_connect_accepts_upstream_single_dash_flags_and_gnu_spelling():
    p = cli.build_parser()
    a = p.parse_args(
        [
            "connect",
            "-host",
            "h1",
            "-port",
            "2600",
            "-addr",
            "10.1.0.1/24",
            "-mtu",
            "1300",
        ]
    )
    b = p.parse_args(
        [
            "connect",
            "--host=h1",
            "--port",
            "2600",
            "--addr",
            "10.1.0.1/24",
            "--mtu=1300",
        ]
    )
    for args in (a, b):
        assert (args.host, args.port, args.addr, args.mtu) == (
            "h1",
            2600,
            "10.1.0.1/24",
            1300,
        )
    d = p.parse_args(["connect"])
    assert (d.host, d.port, d.addr, d.mtu) == (
        "host.docker.internal",
        2511,
        "192.168.251.1/24",
        1400,
    )


def test_connect_rejects_bad_flags_with_one_line():
    res = run_cli("connect", "-addr", "not-an-address")
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "not-an-address" in res.stderr


def test_status_without_a_running_instance_says_so(tmp_path):
    res = run_cli("status", "--socket", str(tmp_path / "none.sock"))
    assert res.returncode == 1
    assert "no running fastfwd" in res.stderr


def test_docker_image_entrypoint_is_the_connect_command():
    import pathlib
    import tomllib

    root = pathlib.Path(__file__).parents[2]
    dockerfile = (root / "docker" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["fastfwd", "connect"]' in dockerfile
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["fastfwd"] == "control.cli:main"
    assert "connect" in cli.COMMANDS
    for copied in ("fastfwd", "control", "pyproject.toml"):
        assert f"COPY {copied}" in dockerfile or f" {copied} " in dockerfile


def test_what_the_dockerfile_copies_is_a_package_pip_can_build(tmp_path):
    """The image's /src, laid out as the Dockerfile's COPY lines do, builds
    (no Docker engine needed: the same files, the same pip)."""
    import pathlib
    import shutil
    import subprocess
    import sys

    root = pathlib.Path(__file__).parents[2]
    src = tmp_path / "src"
    src.mkdir()
    for line in (root / "docker" / "Dockerfile").read_text().splitlines():
        if not line.startswith("COPY "):
            continue
        *sources, dest = line.split()[1:]
        for name in sources:
            target = src / name if dest.endswith("/") else tmp_path / dest.lstrip("/")
            if (root / name).is_dir():
                skip = shutil.ignore_patterns("results")
                shutil.copytree(root / name, target, ignore=skip)
            else:
                shutil.copy(root / name, target)
    # setuptools' build step, as `pip install /src` runs it (offline).
    res = subprocess.run(
        [sys.executable, "-c", "import setuptools; setuptools.setup()",
         "build_py", "--build-lib", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, cwd=src,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "out" / "control" / "cli.py").exists()


def test_status_lists_each_process_cpus_as_ranges():
    from control.cli import _cpu_list, format_status

    assert _cpu_list([0, 1, 2, 5]) == "0-2,5"
    assert _cpu_list([3]) == "3"
    assert _cpu_list([]) == "-"
    text = format_status(
        {
            "side": "vm",
            "tun": "fastfwd0",
            "uptime_s": 1.0,
            "processes": [
                {"name": "writer0", "pid": 7, "counters": {}, "cpus": [1]},
                {"name": "reader0", "pid": 8, "counters": {}, "cpus": [0, 1]},
            ],
        }
    )
    assert text.splitlines()[-3].endswith(" cpus")
    assert text.splitlines()[-2].startswith("writer0") and text.endswith(" 0-1")
    assert text.splitlines()[-2].endswith(" 1")
