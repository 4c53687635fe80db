"""One TCP transfer with a checksum, in either direction; a CLI for the lab.

    serve --port P [--mode recv]          accept one connection, read to EOF,
                                          reply with the sha256 hex of it
    serve --port P --mode send --bytes N --seed S
                                          accept one connection, send N bytes
    send --host H --port P --bytes N --seed S
                                          client sends; compares the server's
                                          digest with its own
    recv --host H --port P --bytes N --seed S   (or --expect-sha256 HEX)
                                          client receives and checks
    digest --bytes N --seed S             print the digest of that stream

Every command prints one JSON line (role, mode, bytes, seconds, sha256, ok,
and error on failure) and exits 0 when ok, 1 otherwise. Everything is
bounded by --timeout. The byte stream is a function of (N, seed) only, so
both ends can derive the expected digest without talking.

This module uses the standard library only, so it also runs as a plain
script: `python3 /path/to/lab/tcpcheck.py ...` (see `argv`), whatever the
working directory or PYTHONPATH inside a namespace.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

CHUNK_BYTES = 64 * 1024
RECV_BUFFER_BYTES = 256 * 1024
CONNECT_RETRY_S = 0.05
DEFAULT_TIMEOUT_S = 60.0
_RETRY_ERRNOS = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH}


class CheckError(Exception):
    """The transfer did not complete (timeout, reset, short stream)."""


def stream(nbytes: int, seed: str) -> Iterator[bytes]:
    """Yield `nbytes` pseudo-random bytes determined by `seed`, in chunks."""
    index = 0
    while nbytes > 0:
        size = min(CHUNK_BYTES, nbytes)
        key = f"fastfwd-tcpcheck:{seed}:{index}".encode()
        yield hashlib.shake_256(key).digest(size)
        nbytes -= size
        index += 1


def digest(nbytes: int, seed: str) -> str:
    """sha256 hex of `stream(nbytes, seed)`."""
    h = hashlib.sha256()
    for chunk in stream(nbytes, seed):
        h.update(chunk)
    return h.hexdigest()


def argv(*args: object) -> list[str]:
    """Command line that runs this checker with `args`, independent of cwd."""
    return [sys.executable, str(Path(__file__).resolve()), *(str(a) for a in args)]


def parse(stdout: str) -> dict:
    """The result dict from a checker's stdout (its last non-empty line)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise ValueError("tcpcheck printed nothing")
    return json.loads(lines[-1])


class _Deadline:
    def __init__(self, timeout_s: float) -> None:
        self.end = time.monotonic() + timeout_s

    def arm(self, sock: socket.socket) -> None:
        left = self.end - time.monotonic()
        if left <= 0:
            raise CheckError("timeout")
        sock.settimeout(left)


def _send_all(sock: socket.socket, nbytes: int, seed: str, dl: _Deadline) -> str:
    h = hashlib.sha256()
    for chunk in stream(nbytes, seed):
        h.update(chunk)
        dl.arm(sock)
        sock.sendall(chunk)
    sock.shutdown(socket.SHUT_WR)
    return h.hexdigest()


def _recv_all(sock: socket.socket, dl: _Deadline) -> tuple[int, str]:
    h = hashlib.sha256()
    buf = bytearray(RECV_BUFFER_BYTES)
    view = memoryview(buf)
    total = 0
    while True:
        dl.arm(sock)
        n = sock.recv_into(buf)
        if n == 0:
            return total, h.hexdigest()
        h.update(view[:n])
        total += n


def _connect(host: str, port: int, dl: _Deadline) -> socket.socket:
    # the server may still be starting, or a tunnel still coming up: retry
    while True:
        left = dl.end - time.monotonic()
        if left <= 0:
            raise CheckError("timeout")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(min(left, 2.0))
            sock.connect((host, port))
            return sock
        except (TimeoutError, OSError) as exc:
            sock.close()
            retry = isinstance(exc, socket.timeout) or exc.errno in _RETRY_ERRNOS
            if not retry or time.monotonic() + CONNECT_RETRY_S >= dl.end:
                raise
            time.sleep(CONNECT_RETRY_S)


def _expected(args: argparse.Namespace) -> str | None:
    if args.expect_sha256:
        return args.expect_sha256.lower()
    if args.bytes is not None and args.seed is not None:
        return digest(args.bytes, args.seed)
    return None


def serve(args: argparse.Namespace, dl: _Deadline) -> dict:
    """Accept one connection on args.port and run args.mode on it."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((args.bind, args.port))
        listener.listen(1)
        dl.arm(listener)
        conn, peer = listener.accept()
    with conn:
        start = time.monotonic()
        if args.mode == "send":
            sha = _send_all(conn, args.bytes, args.seed, dl)
            _recv_all(conn, dl)  # wait for the client to close: all delivered
            result = {"bytes": args.bytes, "sha256": sha, "ok": True}
        else:
            total, sha = _recv_all(conn, dl)
            dl.arm(conn)
            conn.sendall(sha.encode() + b"\n")
            conn.shutdown(socket.SHUT_WR)
            expected = _expected(args)
            ok = expected is None or expected == sha
            result = {"bytes": total, "sha256": sha, "ok": ok}
        result["seconds"] = round(time.monotonic() - start, 6)
        result["peer"] = peer[0]
    return result


def send(args: argparse.Namespace, dl: _Deadline) -> dict:
    """Connect, send the (bytes, seed) stream, check the server's digest."""
    with _connect(args.host, args.port, dl) as sock:
        start = time.monotonic()
        sha = _send_all(sock, args.bytes, args.seed, dl)
        reply = b""
        while True:
            dl.arm(sock)
            part = sock.recv(4096)
            if not part:
                break
            reply += part
        seconds = time.monotonic() - start
    peer_sha = reply.decode(errors="replace").strip()
    return {"bytes": args.bytes, "sha256": sha, "peer_sha256": peer_sha,
            "ok": peer_sha == sha, "seconds": round(seconds, 6)}  # fmt: skip


def recv(args: argparse.Namespace, dl: _Deadline) -> dict:
    """Connect, read to EOF, compare with the expected digest."""
    expected = _expected(args)
    if expected is None:
        raise CheckError("recv needs --bytes and --seed, or --expect-sha256")
    with _connect(args.host, args.port, dl) as sock:
        start = time.monotonic()
        total, sha = _recv_all(sock, dl)
        seconds = time.monotonic() - start
    ok = sha == expected and (args.bytes is None or total == args.bytes)
    return {"bytes": total, "sha256": sha, "expected_sha256": expected,
            "ok": ok, "seconds": round(seconds, 6)}  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python3 -m lab.tcpcheck")
    sub = parser.add_subparsers(dest="role", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--port", type=int, required=True)
    common.add_argument("--bytes", type=int, help="stream length")
    common.add_argument("--seed", help="stream seed (any string)")
    common.add_argument("--expect-sha256", help="expected digest instead of N/seed")
    common.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="seconds for the whole run")  # fmt: skip
    p = sub.add_parser("serve", parents=[common], help="accept one connection")
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument(
        "--mode",
        choices=("recv", "send"),
        default="recv",
        help="recv: read and reply the digest; send: send --bytes",
    )
    for role in ("send", "recv"):
        p = sub.add_parser(role, parents=[common], help=f"client that {role}s")
        p.add_argument("--host", required=True)
    p = sub.add_parser("digest", help="print the digest of a stream")
    p.add_argument("--bytes", type=int, required=True)
    p.add_argument("--seed", required=True)
    return parser


def main(argv_: list[str] | None = None) -> int:
    """Run the CLI; print one JSON line; return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv_)
    if args.role == "digest":
        print(
            json.dumps({"bytes": args.bytes, "sha256": digest(args.bytes, args.seed)})
        )
        return 0
    needs_stream = args.role == "send" or (args.role == "serve" and args.mode == "send")
    if needs_stream and (args.bytes is None or args.seed is None):
        parser.error(f"{args.role} needs --bytes and --seed")
    mode = getattr(args, "mode", args.role)
    dl = _Deadline(args.timeout)
    try:
        result = {"serve": serve, "send": send, "recv": recv}[args.role](args, dl)
    except (CheckError, OSError) as exc:
        reason = "timeout" if isinstance(exc, socket.timeout) else str(exc)
        result = {"ok": False, "error": reason}
    out = {"role": args.role, "mode": mode, **result}
    print(json.dumps(out, sort_keys=True), flush=True)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
