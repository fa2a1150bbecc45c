"""One training run per work_dir."""
from __future__ import annotations

import fcntl
import os

from utils.core.errors import WorkDirInUse
from utils.core.layout import LOCK_FILE


class WorkDirLock:
    """One training run per work_dir: an exclusive flock on work_dir/.train.lock. The kernel drops the
    lock when the process ends, however it ends, so a killed run never leaves it stuck."""

    def __init__(self, work_dir: str):
        self.path = os.path.join(work_dir, LOCK_FILE)
        self.fd = None

    def __enter__(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors='replace').strip() or '?'
            os.close(fd)
            raise WorkDirInUse(f'work_dir {os.path.dirname(self.path)} is in use by another training run '
                               f'(pid {holder}); wait for it to end or choose another work_dir') from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
