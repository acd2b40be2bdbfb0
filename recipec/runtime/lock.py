"""One run per store: an exclusive `flock` on `STORE/lock`, held for the whole run.

`flock` belongs to the open file, so the kernel drops it when the process dies however it dies
(SIGKILL included): a crashed run never leaves a stale lock behind. The file holds the pid of the
holder, only so that the second run can say who holds it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from recipec.diagnostics import RecipecError


class StoreInUse(RecipecError):
    def __init__(self, root: Path, pid: int | None):
        self.root = root
        self.pid = pid
        holder = f"pid {pid}" if pid is not None else "pid unknown"
        super().__init__(f"store {root} is in use by another recipec run ({holder})")


class StoreLock:
    """`with StoreLock(root):` holds the store; re-entering from the same holder is a no-op."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.path = self.root / "lock"
        self._fd: int | None = None
        self._depth = 0

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            self._depth += 1
            return
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise StoreInUse(self.root, pid) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        self._depth = 1

    def release(self) -> None:
        if self._fd is None:
            return
        self._depth -= 1
        if self._depth > 0:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # so a reader never blames a pid that has let go
        finally:
            os.close(fd)  # closing drops the flock

    def __enter__(self) -> "StoreLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None
