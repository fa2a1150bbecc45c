"""TensorBoard event files of a training run, to watch it live: ``tensorboard --logdir work_dir``.

Each run (a fresh start or a ``-p`` resume) writes its own folder, ``work_dir/tensorboard/{time}/``, through
``torch.utils.tensorboard.SummaryWriter`` (the writer ModelScope's own ``TensorboardHook`` uses; it needs the
``tensorboard`` package), so TensorBoard shows the runs of a work_dir side by side, a resume continuing the
step count where its checkpoint left it. Scalars, all against the **optimizer step** (a trainer
iteration is one optimizer step, with ``accumulate`` N too: :mod:`utils.training.recipe_trainer` draws the N
micro-batches of a step in one iteration):

- ``train/loss`` and every other figure the criterion puts in ModelScope's ``trainer.log_buffer``
  (SCST's ``train/reward`` and ``train/baseline``), averaged over the micro-batches of the steps since the
  last point; timings are left out;
- ``train/lr``: the learning rate (first parameter group) the last step was taken with;
- ``val/{metric}``: each validation's figures (CIDEr, BLEU, ..., style accuracy), written by
  :class:`utils.training.validation.ValidationHook` through :meth:`TensorboardHook.add_validation`.

A point is written every ``log_interval`` optimizer steps and at the end of each epoch. Only rank 0 writes
(under torchrun the loss in the log buffer is already averaged over the ranks by ``OFATrainer.train_step``;
SCST's reward is rank 0's). Without the ``tensorboard`` package the run goes on without event files, with a
warning saying how to install it.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Dict, Optional

from modelscope.trainers.hooks.hook import Hook
from modelscope.trainers.hooks.priority import Priority

logger = logging.getLogger(__name__)

TENSORBOARD_DIR = 'tensorboard'  # work_dir/tensorboard/{time}/: one folder of event files per run
NOT_LOGGED = {'iter_time', 'data_load_time', 'time', 'data_time', 'eta', 'memory', 'lr'}  # timings; lr is read apart
FLUSH_SECS = 10  # how stale a live view may be


def log_dir(work_dir: str, stamp: str) -> str:
    return os.path.join(work_dir, TENSORBOARD_DIR, stamp)


def _number(value) -> Optional[float]:
    try:
        value = float(value)  # floats, 0-d numpy arrays and one-element tensors
    except (TypeError, ValueError, RuntimeError):
        return None
    return value if math.isfinite(value) else None


class TensorboardHook(Hook):
    """Writes the training figures against the optimizer step; :meth:`add_validation` adds a validation's.

    Runs after the optimizer and learning-rate hooks of an iteration and before validation (which is
    ``Priority.LOWEST``), so a validation's point has the step of the iteration it follows."""

    PRIORITY = Priority.VERY_LOW

    def __init__(self, directory: str, log_interval: int = 1):
        self.directory = directory
        self.log_interval = max(1, int(log_interval))
        self.writer = None
        self.step = 0          # optimizer steps done
        self.lr = None         # the learning rate of the step running
        self.seen: Dict[str, int] = {}  # log_buffer.val_history entries already counted, per key
        self.sums: Dict[str, list] = {}  # key -> [sum, count] since the last point

    def before_run(self, trainer):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            logger.warning('no TensorBoard event files: %s (pip install tensorboard==2.21.0, or set the conf key '
                           '"tensorboard" to false)', exc)
            return
        os.makedirs(self.directory, exist_ok=True)
        self.writer = SummaryWriter(self.directory, flush_secs=FLUSH_SECS)
        logger.info('TensorBoard event files: %s (watch with: tensorboard --logdir %s)', self.directory,
                    os.path.dirname(os.path.dirname(self.directory)))

    def before_train_epoch(self, trainer):
        self.seen = {}  # ModelScope's logger hooks clear the log buffer at each epoch start

    def before_train_iter(self, trainer):
        optimizer = getattr(trainer, 'optimizer', None)
        if optimizer is not None and hasattr(optimizer, 'param_groups'):
            self.lr = _number(optimizer.param_groups[0]['lr'])

    def after_train_iter(self, trainer):
        self._collect(trainer)
        self.step = trainer.iter + 1  # steps done: trainer.iter counts from 0 and is incremented after the hooks
        if self.step % self.log_interval == 0:
            self._write_train()

    def after_train_epoch(self, trainer):
        if self.sums:
            self._write_train()

    def after_run(self, trainer):
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def add_validation(self, metrics: Dict[str, float]) -> None:
        """One point per validation figure, ``val/{name}``, at the current optimizer step."""
        if self.writer is None:
            return
        for name, value in metrics.items():
            value = _number(value)
            if value is not None:
                self.writer.add_scalar(f'val/{name}', value, self.step)
        self.writer.flush()

    def _collect(self, trainer) -> None:
        """Add the log buffer's entries new since the last call to the running sums."""
        history = getattr(getattr(trainer, 'log_buffer', None), 'val_history', None) or {}
        for key, values in history.items():
            start = self.seen.get(key, 0)
            if start > len(values):  # the buffer was cleared
                start = 0
            for value in values[start:]:
                value = _number(value)
                if value is not None and key not in NOT_LOGGED:
                    entry = self.sums.setdefault(key, [0.0, 0])
                    entry[0] += value
                    entry[1] += 1
            self.seen[key] = len(values)

    def _write_train(self) -> None:
        if self.writer is not None:
            for key, (total, count) in sorted(self.sums.items()):
                self.writer.add_scalar(f'train/{key}', total / count, self.step)
            if self.lr is not None:
                self.writer.add_scalar('train/lr', self.lr, self.step)
        self.sums = {}
