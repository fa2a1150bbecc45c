"""One training run per work_dir, and the sweep of what a killed run of it left behind."""
from __future__ import annotations

import fcntl
import logging
import os
import re
from typing import List

from utils.core.io import remove_path
from utils.core.errors import WorkDirInUse
from utils.core.layout import BEST_DIR, LOCK_FILE, OUTPUT_DIR

logger = logging.getLogger(__name__)

# The temporaries only a training run writes in its work_dir (so only the holder of the lock does), by writer:
# checkpoints (utils/patches/checkpoints.py): iter_N.pth.tmp, iter_N_trainer_state.pth.tmp, iter_N.sha256.tmp,
# output.partial/ (a fresh output/ being assembled), output/*.tmp (weights, weights.sha256, style_map.json);
# output_best (utils/training/best.py): output_best.tmp/, and output_best.old/ once output_best/ is back;
# the run summary train_{time}.json.tmp and SCST's cider_df_{digest}.json.tmp (utils/core/io.py's atomic writes).
TRAINING_TEMPORARIES = (r'.+\.pth\.tmp', r'.+\.sha256\.tmp', r'train_.+\.json\.tmp', r'cider_df_.+\.json\.tmp',
                        re.escape(OUTPUT_DIR + '.partial'), re.escape(BEST_DIR + '.tmp'))


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

    def sweep(self) -> List[str]:
        """Remove the temporaries an interrupted training run left in work_dir (killed, out of disk, crashed):
        :data:`TRAINING_TEMPORARIES`. Only the holder of the lock may: they are no other running process's.
        Logs and returns what it removed (paths relative to work_dir)."""
        if self.fd is None:
            raise RuntimeError('sweep() needs the work_dir lock held')
        work_dir = os.path.dirname(self.path)
        found = [name for name in sorted(os.listdir(work_dir))
                 if any(re.fullmatch(p, name) for p in TRAINING_TEMPORARIES)]
        if os.path.isdir(os.path.join(work_dir, BEST_DIR)) and os.path.isdir(os.path.join(work_dir, BEST_DIR + '.old')):
            found.append(BEST_DIR + '.old')  # (without output_best/, utils/training/best.py puts it back)
        output = os.path.join(work_dir, OUTPUT_DIR)
        if os.path.isdir(output):
            found += [f'{OUTPUT_DIR}/{name}' for name in sorted(os.listdir(output)) if name.endswith('.tmp')]
        removed = []
        for rel in found:
            if remove_path(os.path.join(work_dir, rel)):
                removed.append(rel)
        if removed:
            logger.info('removed %d temporaries of an interrupted run from %s: %s', len(removed), work_dir,
                        ', '.join(removed))
        return removed
