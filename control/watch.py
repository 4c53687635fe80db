"""Following the configuration file, however it is changed.

Editors save in different ways: appending, rewriting in place, writing a
temporary file and renaming it over the original, deleting and re-creating,
or swapping a symlink. Watching the file's inode would miss most of these,
so the watcher (watchfiles, inotify on Linux) watches the *directories* of
the path and of its symlink target, and reacts to any event that names
either. Bursts are debounced; a change is reported only when the content
actually differs from what was last reported.
"""

import asyncio
import hashlib
import logging
import os

import watchfiles

log = logging.getLogger(__name__)

DEBOUNCE_MS = 200


def _targets(path):
    path = os.path.abspath(path)
    real = os.path.realpath(path)
    return {os.path.dirname(path), os.path.dirname(real)}, {path, real}


def digest(path):
    """sha256 of the file's content, or None if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


async def run_watch(path, on_change, stop_event=None, what="configuration file"):
    """Call ``await on_change()`` each time the content at ``path`` changes.

    Runs until cancelled (or ``stop_event`` is set). A missing file is
    reported once as a warning, naming it as ``what``; the caller keeps its
    running configuration.
    """
    last = digest(path)
    missing_warned = False
    while True:
        dirs, names = _targets(path)
        watched = sorted(d for d in dirs if os.path.isdir(d))
        if not watched:
            await asyncio.sleep(1.0)
            continue
        async for changes in watchfiles.awatch(
            *watched,
            debounce=DEBOUNCE_MS,
            step=50,
            recursive=False,
            stop_event=stop_event,
        ):
            if not {os.path.abspath(p) for _, p in changes} & names:
                continue
            current = digest(path)
            if current is None:
                if not missing_warned:
                    log.warning(
                        "%s missing, running configuration kept path=%s", what, path
                    )
                    missing_warned = True
                continue
            missing_warned = False
            if current != last:
                last = current
                await on_change()
            if _targets(path) != (dirs, names):
                break  # a symlink now points elsewhere: watch its new home
        else:
            return
