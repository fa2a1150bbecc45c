"""Finding checkpoints: the newest readable, undamaged one for ``-p latest``. Writing them so that a kill never
leaves a half-written one, with their checksums, and listing them: utils/patches/checkpoints.py."""
from __future__ import annotations

import logging
import os
from typing import Optional

from utils.core.checksums import checkpoint_problem
from utils.core.errors import CheckpointError
from utils.core.checkpoint_files import CKPT_NAME, TRAINER_STATE, checkpoints_in

logger = logging.getLogger(__name__)
__all__ = ['CKPT_NAME', 'TRAINER_STATE', 'checkpoints_in', 'readable', 'damage', 'resolve_checkpoint']


def readable(prefix: str) -> Optional[str]:
    """None if both files of a checkpoint load, else why not. Cheap: the files are memory-mapped
    (``torch.load(mmap=True)``), so the zip directory and the pickled structure are read and checked, but
    not the weights and optimizer state themselves (several GB for OFA-large with AdamW state)."""
    import torch

    from utils.core.checkpoint_files import trainer_state_loading
    from utils.core.errors import first_line
    try:
        torch.load(prefix + '.pth', map_location='cpu', weights_only=True, mmap=True)
        with trainer_state_loading():
            torch.load(prefix + TRAINER_STATE, map_location='cpu', weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - a damaged file raises many kinds
        return first_line(e) or type(e).__name__
    return None


def damage(prefix: str) -> Optional[str]:
    """None if the files of checkpoint prefix match its checksum file iter_N.sha256 (or it has none: older
    checkpoints are accepted unverified), else what does not match. Reads both files once."""
    return checkpoint_problem(prefix, TRAINER_STATE)


def resolve_checkpoint(arg: Optional[str], work_dir: str) -> Optional[str]:
    """A checkpoint prefix (work_dir/iter_N) from a prefix, its .pth file, or "latest" (the newest
    readable checkpoint in work_dir that matches its checksum; unreadable or damaged newer ones are named and
    skipped)."""
    if arg is None:
        return None
    if arg == 'latest':
        for _, prefix in checkpoints_in(work_dir):
            problem = readable(prefix)
            if problem is not None:
                logger.warning('skipping unreadable checkpoint %s: %s', prefix, problem)
                continue
            problem = damage(prefix)
            if problem is not None:
                logger.warning('skipping damaged checkpoint %s: %s', prefix, problem)
                continue
            logger.info('newest readable checkpoint: %s', prefix)
            return prefix
        raise CheckpointError(f'-p latest: no readable, undamaged checkpoint (iter_N.pth + iter_N_trainer_state.pth) in {work_dir}')
    prefix = arg[:-4] if arg.endswith('.pth') else arg
    if not os.path.isfile(prefix + '.pth'):
        raise CheckpointError(f'checkpoint {arg}: {prefix}.pth does not exist')
    if not os.path.isfile(prefix + TRAINER_STATE):
        raise CheckpointError(f'checkpoint {arg} is not a CheckpointHook checkpoint: '
                              f'{prefix}{TRAINER_STATE} does not exist')
    problem = readable(prefix)
    if problem is not None:
        raise CheckpointError(f'checkpoint {arg} cannot be loaded: {problem}')
    problem = damage(prefix)
    if problem is not None:
        raise CheckpointError(f'checkpoint {arg} is damaged: {problem}')
    return prefix
