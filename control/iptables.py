"""iptables rules of the VM side, in the backend Docker uses.

Every rule fastfwd adds carries the comment ``fastfwd:<tun>``, so the rules
of a killed run can be found and purged at the next start, and rules of the
user's or Docker's are never touched. Rules are added only when ``-C`` says
they are missing, so a command that arrives twice leaves one rule.
"""

import logging
import shutil
import subprocess

log = logging.getLogger(__name__)

WAIT_S = "5"


class IptablesError(Exception):
    pass


def detect_backend():
    """The iptables binary whose tables hold Docker's chains.

    Docker may run with either the legacy or the nft backend; rules added to
    the other one would be invisible to its chains. Falls back to plain
    ``iptables`` when no Docker chain is found. The legacy binary is only
    asked when legacy tables exist already, because asking creates them.
    """
    for binary in ("iptables-nft", "iptables-legacy"):
        if shutil.which(binary) is None:
            continue
        if binary == "iptables-legacy" and not _legacy_tables_exist():
            continue
        res = subprocess.run(
            [binary, "-w", WAIT_S, "-S"], capture_output=True, text=True
        )
        if res.returncode == 0 and "-N DOCKER" in res.stdout:
            return binary
    if shutil.which("iptables") is None:
        raise IptablesError("iptables is not installed (apt-get install iptables)")
    return "iptables"


class Iptables:
    """Marked rules in one backend; safe to call again with the same rule."""

    def __init__(self, binary, mark):
        self.binary = binary
        self.mark = mark

    def _run(self, *args, check=True):
        res = subprocess.run(
            [self.binary, "-w", WAIT_S, *args], capture_output=True, text=True
        )
        if check and res.returncode != 0:
            raise IptablesError(
                f"{self.binary} {' '.join(args)} failed: {res.stderr.strip() or res.returncode}"
            )
        return res

    def _spec(self, rule):
        return [*rule, "-m", "comment", "--comment", self.mark]

    def has_chain(self, table, chain):
        return self._run("-t", table, "-S", chain, check=False).returncode == 0

    def exists(self, table, chain, rule):
        return (
            self._run(
                "-t", table, "-C", chain, *self._spec(rule), check=False
            ).returncode
            == 0
        )

    def insert(self, table, chain, rule, position=1):
        """Insert ``rule`` at ``position`` unless it is already there."""
        if self.exists(table, chain, rule):
            return False
        self._run("-t", table, "-I", chain, str(position), *self._spec(rule))
        return True

    def delete(self, table, chain, rule):
        """Delete every copy of ``rule``; returns how many were removed."""
        removed = 0
        while self.exists(table, chain, rule):
            self._run("-t", table, "-D", chain, *self._spec(rule))
            removed += 1
        return removed

    def marked(self, table):
        """``-S`` lines of ``table`` that carry this instance's mark."""
        res = self._run("-t", table, "-S", check=False)
        return [line for line in res.stdout.splitlines() if _has_mark(line, self.mark)]

    def purge(self, tables=("filter", "raw", "mangle", "nat")):
        """Remove every rule with this mark, from any chain; returns a count."""
        count = 0
        for table in tables:
            for line in self.marked(table):
                if not line.startswith("-A "):
                    continue
                args = line.split()[1:]
                args = _unquote(args)
                res = self._run("-t", table, "-D", *args, check=False)
                count += res.returncode == 0
        return count


def _legacy_tables_exist():
    try:
        with open("/proc/net/ip_tables_names", encoding="ascii") as f:
            return bool(f.read().strip())
    except OSError:
        return False


def _has_mark(line, mark):
    return f"--comment {mark}" in line or f'--comment "{mark}"' in line


def _unquote(args):
    return [a[1:-1] if len(a) >= 2 and a[0] == a[-1] == '"' else a for a in args]
