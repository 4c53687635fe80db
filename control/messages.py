"""The msgpack messages between the control process, the supervisor and
the workers.

This module is the only part of ``control`` the data plane imports, so it
imports nothing else from the project. Every message is a map with an
``op`` key naming a command; the other keys are its arguments. Channels are
``SOCK_SEQPACKET`` socketpairs: one message per datagram, never split.
"""

import msgpack

# control -> worker
# addrs: [[host, port], ...] (may be empty), framing: str, frame_seg: int
# (readers: send OFFLOAD frames as UDP_SEGMENT runs of this size; 0: don't)
SET_PEER = "set_peer"
SET_LOGLEVEL = "set_loglevel"  # level: str
STOP = "stop"
# writers, host side: the expose socket travels as SCM_RIGHTS with this
# message (none when it closes); read: this writer serves it (queue 0).
SET_EXPOSE = "set_expose"  # read: bool
# sessions: [[accessor_ip, host, port, local_ip], ...], exposed: ["a.b.c.d/n", ...],
# host_ip: str, pong: bool
SET_SESSIONS = "set_sessions"

# worker -> control
FRAME = "frame"  # src: [host, port] or None, data: bytes (a non-IP datagram)
CONTROL_BODY = "control_body"  # body: bytes (VM side: a whole control body)
UNKNOWN_SOURCE = "unknown_source"  # src: [host, port] sent IP packets (throttled)
# src: [host, port], data: bytes, local: the address it was sent to ("" if
# unknown); a datagram on the expose port that is not a session's packet
EXPOSE_FRAME = "expose_frame"

# supervisor <-> control
CHILD_STARTED = (
    "child_started"  # role: str ("control" too), queue: int, pid: int, restarts: int
)
READY = "ready"  # control finished its set-up
FATAL = "fatal"  # reason: str; control could not set up and will exit
SHUTDOWN = "shutdown"  # supervisor asks control to undo everything and exit

MAX_MESSAGE_BYTES = 65536 + 1024


def pack(op, **fields):
    """Encode one message; ``fields`` must be msgpack-serialisable."""
    fields["op"] = op
    return msgpack.packb(fields, use_bin_type=True)


def unpack(data):
    """Decode one message into a dict; raises ValueError on garbage."""
    try:
        msg = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ValueError(f"undecodable control message: {exc}") from exc
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
        raise ValueError("control message without an op")
    return msg


def peers_to_wire(addrs):
    return [[a[0], int(a[1])] for a in addrs]


def peers_from_wire(value):
    return [(str(a[0]), int(a[1])) for a in value or ()]


def peer_to_wire(addr):
    """An ``(ip, port)`` tuple or None as a msgpack-friendly value."""
    return None if addr is None else [addr[0], int(addr[1])]


def peer_from_wire(value):
    return None if value is None else (str(value[0]), int(value[1]))
