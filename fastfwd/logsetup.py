"""Logging set-up shared by every fastfwd process.

Each line carries the process's role (supervisor, control, reader0, ...) and
pid, so that the interleaved output of one process tree stays readable.
"""

import logging
import os
import sys

FORMAT = "%(asctime)s fastfwd[%(role)s:%(process)d] %(levelname)s %(name)s: %(message)s"


class _RoleFilter(logging.Filter):
    def __init__(self, role):
        super().__init__()
        self.role = role

    def filter(self, record):
        record.role = self.role
        return True


def setup(role, level="INFO"):
    """Send this process's logs to stderr, tagged with ``role``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RoleFilter(role))
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)
    # pyroute2 is chatty at INFO about things that are not problems here.
    logging.getLogger("pyroute2").setLevel(logging.WARNING)
    # watchfiles logs every batch of events at INFO; with a log file beside
    # a watched file, each line would report the last one's write.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)


def set_level(level):
    """Change the level of every fastfwd logger at run time."""
    value = logging.getLevelName(str(level).upper())
    if not isinstance(value, int):
        value = logging.INFO
    logging.getLogger().setLevel(value)


def env_level(default="INFO"):
    return os.environ.get("FASTFWD_LOGLEVEL", default)
