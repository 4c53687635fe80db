"""Small helpers the end-to-end tests share."""

import time


def wait_for(predicate, timeout_s=10.0, step_s=0.1):
    """Poll ``predicate`` until it returns something truthy; returns that,
    or the last (falsy) value after ``timeout_s``. An OSError (a control
    socket not there yet) counts as not yet."""
    deadline = time.monotonic() + timeout_s
    value = None
    while True:
        try:
            value = predicate()
        except OSError:
            value = None
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(step_s)


def fastfwd_routes(lab):
    """The routes fastfwd holds in the host namespace (proto 251), sorted."""
    out = lab.run(lab.host_ns, "ip", "route", "show", "proto", "251").stdout
    return sorted(line.split()[0] for line in out.splitlines())


def answers(lab, ip, ns=None):
    """Whether ``ip`` answers one ping from the host namespace (or ``ns``)."""
    res = lab.run(ns or lab.host_ns, "ping", "-c1", "-W2", str(ip), check=False)
    return res.returncode == 0


def pid_of(tunnel, side, name):
    """The pid of process ``name`` ("control", "reader0", ...) of a side,
    as its ``status`` lists it."""
    procs = tunnel.status(side)["processes"]
    return next(p["pid"] for p in procs if p["name"] == name)
