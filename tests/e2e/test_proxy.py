"""``proxy`` lines in the lab: a container fetches, through the host's
tunnel address, a web page served on the host's loopback."""

import signal
import socket
import subprocess
import sys

from lab.nsocket import socket_in
from lab.pytest_support import root_marks
from lab.tunnel import Tunnel
from tests.e2e.helpers import wait_for

pytestmark = root_marks()

TUNNEL_HOST_IP = "192.168.251.2"  # the host's side of the default `addr`

# Bypasses any http_proxy variable of the environment.
FETCH = """
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
sys.stdout.write(opener.open(sys.argv[1], timeout=5).read().decode())
"""

CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
    print("open")
except OSError as exc:
    print(type(exc).__name__)
"""

# Connects, waits for a line on stdin, then sends its request.
HOLD = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
print("connected", flush=True)
sys.stdin.readline()
s.sendall(b"GET /index.txt HTTP/1.0\\r\\n\\r\\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
sys.stdout.write(data.decode().split("\\r\\n\\r\\n", 1)[1])
"""


def web_server(lab, tmp_path, ip, port, text):
    """``python -m http.server`` on ip:port in the host namespace, serving
    ``text`` as /index.txt; returns once it accepts connections."""
    root = tmp_path / f"www-{ip}-{port}"
    root.mkdir()
    (root / "index.txt").write_text(text)
    proc = lab.popen(
        lab.host_ns, sys.executable, "-m", "http.server", "--bind", ip,
        "--directory", str(root), str(port),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    def accepts():
        with socket_in(lab.host_ns, kind=socket.SOCK_STREAM) as s:
            return s.connect_ex((ip, port)) == 0

    assert wait_for(accepts), f"http.server on {ip}:{port} did not start"
    return proc


def fetch(lab, container, port, path="/index.txt"):
    url = f"http://{TUNNEL_HOST_IP}:{port}{path}"
    return lab.run(container.ns, sys.executable, "-c", FETCH, url, timeout=30).stdout


def connect(lab, container, port):
    """What a connection from ``container`` to the host's tunnel address
    got: "open" or the name of the error."""
    out = lab.run(
        container.ns,
        sys.executable,
        "-c",
        CONNECT,
        TUNNEL_HOST_IP,
        str(port),
        timeout=30,
    )
    return out.stdout.strip()


def proxy_stats(t):
    return t.status("host")["proxies"]


def test_proxy_serves_containers_and_a_busy_port_fails_only_its_line(lab, tmp_path):
    web, busy = 18080, 18081
    busy_line = f"proxy {web}:{busy}"
    server = web_server(lab, tmp_path, "127.0.0.1", web, "hello from the host\n")
    blocker = socket_in(lab.host_ns, kind=socket.SOCK_STREAM)
    blocker.bind(("0.0.0.0", busy))
    blocker.listen()
    t = Tunnel(lab, tmp_path / "t", lines=[f"proxy {web}", f"proxy {web}:{busy}"])
    t.start()
    try:
        c1, c2 = lab.containers
        assert fetch(lab, c1, web) == "hello from the host\n"
        assert fetch(lab, c2, web) == "hello from the host\n"

        # the line whose port is taken is reported with the OS reason
        failed = f'proxy listen failed line="{busy_line}"'
        assert wait_for(lambda: failed in t.logs()), t.logs()
        assert "reason=Address already in use" in t.logs()
        stats = proxy_stats(t)
        assert not stats[busy_line]["listening"]
        assert "Address already in use" in stats[busy_line]["error"]
        good = stats[f"proxy {web}"]
        assert good["listening"] and good["connections"] >= 2 and good["bytes_down"] > 0

        # a reload tries it again once the port is free
        blocker.close()
        t.host_proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: proxy_stats(t)[busy_line]["listening"]), t.logs()
        assert fetch(lab, c1, busy) == "hello from the host\n"

        # removing a line from the file closes its listener only; a
        # connection opened through it before still gets its answer
        held = lab.popen(
            c2.ns, sys.executable, "-c", HOLD, TUNNEL_HOST_IP, str(busy),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert held.stdout.readline() == "connected\n"
        t.write_config([f"proxy {web}"])
        assert wait_for(lambda: list(proxy_stats(t)) == [f"proxy {web}"]), t.logs()
        assert connect(lab, c1, busy) == "ConnectionRefusedError"
        assert fetch(lab, c1, web) == "hello from the host\n"
        out, _ = held.communicate("go\n", timeout=30)
        assert out == "hello from the host\n"
    finally:
        blocker.close()
        t.stop()
        lab.stop(server)
    assert "proxy closed" in t.logs()


def test_proxy_with_address_and_listen_port_and_lines_added_by_command(lab, tmp_path):
    port, listen, added = 18090, 18091, 18092
    # 127.0.0.2 is loopback too, but nothing listens on 127.0.0.1:port
    server = web_server(lab, tmp_path, "127.0.0.2", port, "served on 127.0.0.2\n")
    t = Tunnel(lab, tmp_path / "t", lines=[f"proxy 127.0.0.2:{port}:{listen}"])
    t.start()
    try:
        c1 = lab.containers[0]
        assert fetch(lab, c1, listen) == "served on 127.0.0.2\n"
        assert connect(lab, c1, port) == "ConnectionRefusedError"
        stats = proxy_stats(t)[f"proxy 127.0.0.2:{port}:{listen}"]
        assert stats["listen"] == f"{TUNNEL_HOST_IP}:{listen}"
        assert stats["target"] == f"127.0.0.2:{port}"

        # a line given with `fastfwd config` listens at once; one whose
        # target refuses resets the container's connection
        reply = t.config_lines(f"proxy 127.0.0.2:{port}:{added}", f"proxy {port}")
        assert reply["ok"], reply
        assert fetch(lab, c1, added) == "served on 127.0.0.2\n"
        # A listener answers (the handshake completes); the reset for the
        # refused target may already have arrived when connect() returns.
        assert connect(lab, c1, port) in ("open", "ConnectionResetError")
        res = lab.run(
            c1.ns,
            sys.executable,
            "-c",
            FETCH,
            f"http://{TUNNEL_HOST_IP}:{port}/",
            check=False,
            timeout=30,
        )
        assert res.returncode != 0 and "Connection reset" in res.stderr
        assert proxy_stats(t)[f"proxy {port}"]["target_failures"] >= 1
    finally:
        t.stop()
        lab.stop(server)
