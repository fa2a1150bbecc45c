"""The checkpoints a work_dir holds (CheckpointHook's ``iter_N.pth`` + ``iter_N_trainer_state.pth`` and the
toolkit's ``iter_N.sha256``): listing and deleting them, and loading their trainer state. No ModelScope import:
``-p latest`` is resolved before, or beside, any heavy import."""
from __future__ import annotations

import contextlib
import os
import re
from typing import List, Tuple

from utils.core.checksums import checkpoint_sums_file

CKPT_NAME = re.compile(r'^(iter|epoch)_(\d+)\.pth$')
TRAINER_STATE = '_trainer_state.pth'  # iter_N_trainer_state.pth (ModelScope's CheckpointProcessor.TRAINER_STATE_SUFFIX)


def checkpoints_in(work_dir: str) -> List[Tuple[int, str]]:
    """(number, prefix) of the complete CheckpointHook checkpoints in work_dir, newest (last written) first."""
    found = []
    if os.path.isdir(work_dir):
        for name in os.listdir(work_dir):
            m = CKPT_NAME.match(name)
            prefix = os.path.join(work_dir, name[:-4])
            if m and os.path.isfile(prefix + TRAINER_STATE):
                with contextlib.suppress(OSError):  # removed meanwhile
                    found.append((os.path.getmtime(prefix + '.pth'), int(m[2]), prefix))
    return [(n, prefix) for _, n, prefix in sorted(found, reverse=True)]


def remove_checkpoint(prefix: str) -> None:
    """Delete checkpoint prefix: its weights first (so it is no longer complete), its trainer state, its checksums."""
    for path in (prefix + '.pth', prefix + TRAINER_STATE, checkpoint_sums_file(prefix)):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


@contextlib.contextmanager
def trainer_state_loading():
    """Let ``torch.load(weights_only=True)`` read ModelScope trainer-state files, which hold numpy RNG
    state. Allow-lists the numpy types needed instead of turning weights_only off."""
    import numpy as np
    import torch
    from numpy._core.multiarray import _reconstruct

    # re-entrant: torch's safe_globals removes its globals on exit, even those an enclosing block still needs
    already = torch.serialization.get_safe_globals()
    allowed = [g for g in (_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))) if g not in already]
    with torch.serialization.safe_globals(allowed):
        yield
