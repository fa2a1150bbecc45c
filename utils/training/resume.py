"""Finding checkpoints (the newest readable one for ``-p latest``) and one training run per work_dir.
Writing them so that a kill never leaves a half-written one: utils/patches/checkpoints.py."""
from __future__ import annotations

import logging
import os
import re
from typing import List, Optional, Tuple

from utils.core.errors import CheckpointError

logger = logging.getLogger(__name__)
CKPT_NAME = re.compile(r'^(iter|epoch)_(\d+)\.pth$')
TRAINER_STATE = '_trainer_state.pth'


def checkpoints_in(work_dir: str) -> List[Tuple[int, str]]:
    """(number, prefix) of the complete CheckpointHook checkpoints in work_dir, newest first."""
    found = []
    if os.path.isdir(work_dir):
        for name in os.listdir(work_dir):
            m = CKPT_NAME.match(name)
            prefix = os.path.join(work_dir, name[:-4])
            if m and os.path.isfile(prefix + TRAINER_STATE):
                found.append((os.path.getmtime(prefix + '.pth'), int(m[2]), prefix))
    return [(n, prefix) for _, n, prefix in sorted(found, reverse=True)]


def readable(prefix: str) -> Optional[str]:
    """None if both files of a checkpoint load, else why not. Cheap: the files are memory-mapped
    (``torch.load(mmap=True)``), so the zip directory and the pickled structure are read and checked, but
    not the weights and optimizer state themselves (several GB for OFA-large with AdamW state)."""
    import torch

    from utils.patches.checkpoints import trainer_state_loading
    from utils.core.errors import first_line
    try:
        torch.load(prefix + '.pth', map_location='cpu', weights_only=True, mmap=True)
        with trainer_state_loading():
            torch.load(prefix + TRAINER_STATE, map_location='cpu', weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - a damaged file raises many kinds
        return first_line(e) or type(e).__name__
    return None


def resolve_checkpoint(arg: Optional[str], work_dir: str) -> Optional[str]:
    """A checkpoint prefix (work_dir/iter_N) from a prefix, its .pth file, or "latest" (the newest
    readable checkpoint in work_dir; unreadable newer ones are named and skipped)."""
    if arg is None:
        return None
    if arg == 'latest':
        for _, prefix in checkpoints_in(work_dir):
            problem = readable(prefix)
            if problem is None:
                logger.info('newest readable checkpoint: %s', prefix)
                return prefix
            logger.warning('skipping unreadable checkpoint %s: %s', prefix, problem)
        raise CheckpointError(f'-p latest: no readable checkpoint (iter_N.pth + iter_N_trainer_state.pth) in {work_dir}')
    prefix = arg[:-4] if arg.endswith('.pth') else arg
    if not os.path.isfile(prefix + '.pth'):
        raise CheckpointError(f'checkpoint {arg}: {prefix}.pth does not exist')
    if not os.path.isfile(prefix + TRAINER_STATE):
        raise CheckpointError(f'checkpoint {arg} is not a CheckpointHook checkpoint: '
                              f'{prefix}{TRAINER_STATE} does not exist')
    problem = readable(prefix)
    if problem is not None:
        raise CheckpointError(f'checkpoint {arg} cannot be loaded: {problem}')
    return prefix
