"""The local control socket: a root-only Unix socket for ``status`` and
``config`` requests.

One JSON object per line each way. Replies carry ``ok``; a failed request
also carries a stable ``code`` that scripts can branch on, and an ``error``
message for people. The socket file is created mode 0600 in a directory
that only root may enter, so loopback tricks cannot reach it.
"""

import asyncio
import json
import logging
import os
import socket

from fastfwd.errors import TransportError

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1 << 20


async def serve(path, handler):
    """Listen on ``path``; ``handler(request) -> reply`` is a coroutine."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    claim(path)  # again: another instance may have started since the check
    remove(path)  # left by a process that died

    async def on_client(reader, writer):
        try:
            line = await reader.readline()
            if not line:
                return
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("not an object")
            except ValueError as exc:
                reply = {
                    "ok": False,
                    "code": "bad_request",
                    "error": f"bad request: {exc}",
                }
            else:
                try:
                    reply = await handler(request)
                except Exception as exc:
                    log.exception("request failed op=%s", request.get("op"))
                    reply = {
                        "ok": False,
                        "code": "internal",
                        "error": f"request failed: {exc}",
                    }
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    old = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(
            on_client, path, limit=MAX_REQUEST_BYTES
        )
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return server


def claim(path):
    """Raise TransportError if a running instance answers at ``path``:
    taking its socket over would leave that instance unreachable."""
    if in_use(path):
        raise TransportError(
            f"control socket {path} is in use by a running fastfwd "
            "(another instance? give this one its own --socket)"
        )


def in_use(path):
    """Whether a running instance answers at ``path`` (a file left by one
    that died does not)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def inode(path):
    """The identity of the socket file at ``path``, for :func:`remove_own`
    (inode numbers are reused, so with the time the file was made)."""
    st = os.stat(path)
    return (st.st_ino, st.st_ctime_ns)


def remove_own(path, ino):
    """Remove ``path`` only if it is still the socket file ``ino`` (not one
    another instance bound since)."""
    try:
        if inode(path) == ino:
            os.unlink(path)
    except FileNotFoundError:
        pass


def remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def request(path, payload, timeout_s=10.0):
    """Send one request to a running instance; returns its reply (a dict).

    Raises OSError when nothing listens at ``path``.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        s.connect(path)
        s.sendall(json.dumps(payload).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)
