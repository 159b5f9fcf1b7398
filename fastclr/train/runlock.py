"""One run per output folder: an exclusive ``flock`` on ``<out>/.lock``, which holds the owner's pid, host and start.

Two runs writing one folder would prune each other's checkpoints, delete each other's temporary files and interleave
their metric rows; the second one stops at once instead, naming the first. The kernel drops a flock when its process
dies, however it dies (kill -9 included), so a crashed run never leaves a lock behind: the file may stay, its lock
does not. The file is never deleted (deleting it would let two runs lock two different files of that name).
Under torchrun rank 0 takes the lock for the whole job.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path

LOCK_NAME = ".lock"


class OutputInUseError(OSError):
    """Another live run holds the output folder."""


class OutputLock:
    """``acquire()`` the folder for this process or raise :class:`OutputInUseError`; ``release()`` when done."""

    def __init__(self, out: str | Path) -> None:
        self.path = Path(out) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): run unlocked, as before
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 4096).decode(errors="replace")
            os.close(fd)
            raise OutputInUseError(
                f"{self.path.parent} is in use by another fastclr run ({describe_owner(owner)}); wait for it to "
                "end or stop it, or pick another --out"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        os.ftruncate(self._fd, 0)  # a later reader finds no owner
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def describe_owner(text: str) -> str:
    """``pid P on HOST, started T`` from a lock file's contents (empty while its owner is still writing them)."""
    try:
        owner = json.loads(text)
        return f"pid {owner['pid']} on {owner['host']}, started {owner['started']}"
    except (ValueError, TypeError, KeyError):
        return "owner not recorded yet"
