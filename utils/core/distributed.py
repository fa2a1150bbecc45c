"""Data-parallel training under ``torchrun`` (ModelScope's ``pytorch`` launcher): NCCL on GPUs, gloo on CPUs.

    torchrun --nproc_per_node 8 finetune.py train --conf my.json

Each rank trains on its own shard of the train split (torch's DistributedSampler, built by ModelScope's
trainer once the data-parallel group exists) and rank 0 alone writes checkpoints, ``output/`` and logs.

Two things the stock path gets wrong, mended in :mod:`utils.patches.train_step`:

* ``OFATrainer.train_step`` runs the criterion on ``model.module``, around DDP's forward, so DDP never
  arms its gradient all-reduce: every rank silently trains its own model on its shard, and rank 0 saves
  only its own. :class:`~utils.patches.train_step.TrainStepProcessor` averages the gradients over the ranks before each optimizer
  step, which is what DDP would have done.
* ModelScope never calls ``DistributedSampler.set_epoch``: every epoch would visit the shard in the same
  order. :class:`~utils.patches.train_step.TorchrunHook` calls it at the start of each epoch.
"""
from __future__ import annotations

import os

HOOK_TYPE = 'StylishTorchrunHook'  # registered by utils.patches.train_step


def launched() -> bool:
    """True in a process started by torchrun (or any launcher that sets the same environment)."""
    return 'LOCAL_RANK' in os.environ and 'WORLD_SIZE' in os.environ


def rank() -> int:
    return int(os.environ.get('RANK', 0))


def local_rank() -> int:
    return int(os.environ.get('LOCAL_RANK', 0))


def world_size() -> int:
    return int(os.environ.get('WORLD_SIZE', 1))


def is_main() -> bool:
    """Rank 0, or no launcher: the process that writes logs, outputs and summaries."""
    return rank() == 0


def init() -> str:
    """Join the process group torchrun set up; returns the backend. As ModelScope's ``init_dist('pytorch')``
    on GPUs (one GPU per local rank, NCCL); gloo where there is no GPU."""
    import torch
    import torch.distributed as dist
    if dist.is_initialized():
        return dist.get_backend()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        dist.init_process_group(backend='nccl')
    else:
        dist.init_process_group(backend='gloo')
    return dist.get_backend()


def barrier() -> None:
    if not launched():
        return
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()


def finish() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
