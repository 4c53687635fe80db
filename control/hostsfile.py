"""Names for containers, taken from the host's hosts files (host side).

A ``hosts FILE SUFFIX...`` line publishes the entries of FILE whose names
end in one of the suffixes, on a label boundary: ``dev.test`` takes
``dev.test`` and ``a.dev.test``, never ``fakedev.test``. A loopback address
becomes the host's tunnel IP, the one address of the host that containers
can reach. The result is the upstream's pair of control commands:
``dns SUFFIX...`` (serve these suffixes) and one ``host IP NAME...`` per
address.

Every push carries the complete table: the VM side (fastfwd's and the
upstream's alike) replaces its names with the ``host`` commands of each
body that has any ``dns`` or ``host`` command, so a name removed from a file
stops resolving at the next push. Suffixes are not replaced that way (the
upstream VM side adds one ``dns`` redirect per suffix and removes it only on
``-SUFFIX``), so a suffix dropped from the configuration is sent as
``-SUFFIX`` in every later push of this process; a VM side that missed one
push still drops it at the next.

Owned by the host control process's event loop: the watchers are tasks of
that loop and the files are read on it (hosts files are small).
"""

import asyncio
import ipaddress
import logging
import os
import re

from control import watch
from fastfwd import frames

log = logging.getLogger(__name__)

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
MAX_NAME_CHARS = 253
# Room left in a control body for the ``connect`` pairs pushed with names.
NAMES_BUDGET_BYTES = frames.MAX_CONTROL_BODY_BYTES - 8192


def valid_name(name):
    """Whether ``name`` (lowercase, no trailing dot) is a DNS host name that
    the upstream's control body can carry."""
    if not name or len(name) > MAX_NAME_CHARS:
        return False
    return all(_LABEL.fullmatch(label) for label in name.split("."))


def matches_suffix(name, suffix):
    """Whether ``name`` is ``suffix`` or ends in ``.suffix``.

    Both are compared without case and without a trailing dot.
    """
    name, suffix = name.rstrip(".").lower(), suffix.strip(".").lower()
    return name == suffix or name.endswith("." + suffix)


def parse_hosts(text):
    """``(IPv4Address, [name, ...])`` for each usable line of a hosts file.

    Comments and blank lines are skipped, names are lowercased, and names
    that are no valid host name are left out.
    """
    out = []
    for raw in text.splitlines():
        fields = raw.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        try:
            ip = ipaddress.ip_address(fields[0])
        except ValueError:
            continue
        # LIMIT: IPv6 entries are skipped; the upstream's ``host`` command
        # and the VM side's name server carry IPv4 (A and PTR) only.
        if ip.version != 4:
            continue
        names = [n.rstrip(".").lower() for n in fields[1:]]
        out.append((ip, [n for n in names if valid_name(n)]))
    return out


def select(entries, suffixes, host_ip):
    """The entries to publish: ``{name: IPv4Address}`` in file order.

    Only names under one of ``suffixes`` are kept; the first line that
    names a host wins, as in the C library's lookup; a loopback address
    becomes ``host_ip``.
    """
    chosen = {}
    for ip, names in entries:
        if ip.is_loopback:
            ip = host_ip
        for name in names:
            if name not in chosen and any(matches_suffix(name, s) for s in suffixes):
                chosen[name] = ip
    return chosen


def host_commands(chosen):
    """One ``host IP NAME...`` command per address, in order of first use."""
    by_ip = {}
    for name, ip in chosen.items():
        by_ip.setdefault(ip, []).append(name)
    return [("host", str(ip), *names) for ip, names in by_ip.items()]


class HostsNames:
    """The names the host publishes, kept in step with its hosts files.

    ``on_change`` is called (without arguments) when an edited hosts file
    changes the commands; the caller then pushes :meth:`commands`.
    """

    def __init__(self, config_path, on_change):
        # Relative paths are relative to the configuration file.
        self.base_dir = (
            os.path.dirname(os.path.abspath(config_path))
            if config_path
            else os.getcwd()
        )
        self.on_change = on_change
        self.sources = ()  # HostsSource, deduplicated, in file order
        self.host_ip = None
        self.retired = set()  # suffixes served earlier in this run, not now
        self.watchers = {}  # absolute path -> task
        self._commands = []
        self.dropped_warned = 0

    def path(self, source):
        return os.path.join(self.base_dir, os.path.expanduser(source.path))

    def suffixes(self):
        out = []
        for source in self.sources:
            out += [s for s in source.suffixes if s not in out]
        return out

    def configure(self, sources, host_ip):
        """Follow the ``hosts`` lines ``sources``; re-read every file.

        Returns whether the commands to push changed.
        """
        old = set(self.suffixes())
        self.sources = tuple(dict.fromkeys(sources))
        self.host_ip = host_ip
        new = set(self.suffixes())
        self.retired = (self.retired | (old - new)) - new
        wanted = {os.path.abspath(self.path(s)) for s in self.sources}
        for path in list(self.watchers.keys() - wanted):
            self.watchers.pop(path).cancel()
        loop = asyncio.get_running_loop()
        for path in wanted - self.watchers.keys():
            self.watchers[path] = loop.create_task(
                watch.run_watch(path, self.on_file_changed, what="hosts file")
            )
        return self.refresh()

    async def on_file_changed(self):
        # LIMIT: a push lost on the way is repaired only by the next push
        # (an edit, a configuration change, a new peer); the VM side's
        # hello carries a digest of its pairs, not of its names.
        if self.refresh():
            log.info("hosts file changed names=%d", self.count())
            self.on_change()

    def refresh(self):
        """Read the files again; returns whether the commands changed."""
        chosen = {}
        for source in self.sources:
            path = self.path(source)
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    text = f.read()
            except OSError as exc:
                log.warning(
                    "hosts file unreadable path=%s reason=%s", path, exc.strerror
                )
                continue
            for name, ip in select(
                parse_hosts(text), source.suffixes, self.host_ip
            ).items():
                chosen.setdefault(name, ip)
        commands = self._build(chosen)
        changed = commands != self._commands
        self._commands = commands
        return changed

    def _build(self, chosen):
        suffixes = self.suffixes()
        if not suffixes and not self.retired:
            return []
        commands = [("dns", *(f"-{s}" for s in sorted(self.retired)), *suffixes)]
        used = len(frames.encode_commands(commands))
        published, dropped = [], 0
        # Small groups first: one address with thousands of names must not
        # crowd out every other address.
        for command in sorted(host_commands(chosen), key=len):
            ip, names = command[1], command[2:]
            room = NAMES_BUDGET_BYTES - used - len(f",host {ip}")
            kept = []
            for name in names:
                if room - (len(name) + 1) < 0:
                    break
                room -= len(name) + 1
                kept.append(name)
            dropped += len(names) - len(kept)
            if kept:
                published.append(("host", ip, *kept))
                used += len(" ".join(published[-1])) + 1
        if dropped and self.dropped_warned != dropped:
            # LIMIT: a control body holds at most 64 KiB (16-bit length on
            # the wire); names past that budget are not published.
            self.dropped_warned = dropped
            log.warning(
                "hosts entries not published, control body full names=%d", dropped
            )
        hosts = published
        return commands + hosts

    def commands(self):
        """The ``dns`` and ``host`` commands that describe the wanted names."""
        return list(self._commands)

    def count(self):
        return sum(len(c) - 2 for c in self._commands if c[0] == "host")

    def statistics(self):
        return {"suffixes": self.suffixes(), "names": self.count()}

    def close(self):
        for task in self.watchers.values():
            task.cancel()
        self.watchers.clear()
