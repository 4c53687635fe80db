"""Sockets that live in one of the lab's namespaces, made from this process.

A socket belongs to the network namespace its creator was in when it was
made, and stays there. So the test process enters the namespace for the
duration of one ``socket()`` call and returns at once; only the calling
thread switches (setns affects one thread).
"""

import contextlib
import ctypes
import os
import socket

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd):
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def inside(ns):
    """Run the body with this thread inside namespace ``ns``."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def socket_in(ns, family=socket.AF_INET, kind=socket.SOCK_DGRAM, proto=0):
    """A new socket in namespace ``ns``; use and close it as usual."""
    with inside(ns):
        return socket.socket(family, kind, proto)
