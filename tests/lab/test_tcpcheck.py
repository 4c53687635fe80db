"""tcpcheck over loopback, in this process's namespace (no root needed)."""

from __future__ import annotations

import socket
import subprocess

from lab import tcpcheck


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pair(server_args, client_args):
    server = subprocess.Popen(
        tcpcheck.argv("serve", "--bind", "127.0.0.1", *server_args),
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        client = subprocess.run(
            tcpcheck.argv(*client_args), capture_output=True, text=True, timeout=30
        )
        server_out, _ = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    return client.returncode, tcpcheck.parse(client.stdout), tcpcheck.parse(server_out)


def test_stream_is_deterministic_and_seed_dependent():
    data = b"".join(tcpcheck.stream(200_000, "a"))
    assert len(data) == 200_000
    assert data == b"".join(tcpcheck.stream(200_000, "a"))
    assert data != b"".join(tcpcheck.stream(200_000, "b"))
    assert data[:1000] == b"".join(tcpcheck.stream(1000, "a"))


def test_client_send_gets_matching_digest_from_server():
    port = free_port()
    stream = ["--bytes", "300000", "--seed", "s1", "--timeout", "20"]
    rc, client, server = run_pair(
        ["--port", str(port), *stream],
        ["send", "--host", "127.0.0.1", "--port", str(port), *stream],
    )
    assert rc == 0 and client["ok"] and server["ok"]
    assert client["sha256"] == server["sha256"] == tcpcheck.digest(300000, "s1")
    assert server["bytes"] == 300000


def test_client_recv_checks_server_stream_against_expected_digest():
    port = free_port()
    rc, client, server = run_pair(
        ["--port", str(port), "--mode", "send", "--bytes", "123457", "--seed", "s2"],
        ["recv", "--host", "127.0.0.1", "--port", str(port),
         "--expect-sha256", tcpcheck.digest(123457, "s2")],
    )  # fmt: skip
    assert rc == 0 and client["ok"] and server["ok"]
    assert client["bytes"] == 123457


def test_client_recv_reports_mismatch_when_seed_differs():
    port = free_port()
    rc, client, _ = run_pair(
        ["--port", str(port), "--mode", "send", "--bytes", "5000", "--seed", "x"],
        ["recv", "--host", "127.0.0.1", "--port", str(port),
         "--bytes", "5000", "--seed", "y"],
    )  # fmt: skip
    assert rc == 1 and client["ok"] is False


def test_client_gives_up_after_timeout_when_nobody_listens():
    port = free_port()
    result = subprocess.run(
        tcpcheck.argv("send", "--host", "127.0.0.1", "--port", port,
                      "--bytes", "10", "--seed", "z", "--timeout", "0.5"),
        capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    out = tcpcheck.parse(result.stdout)
    assert result.returncode == 1 and out["ok"] is False and out["error"]
