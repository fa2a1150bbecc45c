"""What a person sees while training: a progress bar per epoch (loss, learning rate, eta) and the toolkit's
own log lines. ModelScope's console output (its config dump, hook table and per-iteration lines) goes to
its log file in work_dir only, unless the conf's ``verbose`` asks for it on the console too: that is a
change to ModelScope's global logger, :func:`utils.patches.console.modelscope_console`."""
from __future__ import annotations

import logging
import sys
import time

from modelscope.trainers.hooks.hook import Hook
from modelscope.trainers.hooks.priority import Priority
from tqdm import tqdm

logger = logging.getLogger(__name__)


class ProgressHook(Hook):
    """A tqdm bar per epoch with the loss and learning rate, on a terminal; elsewhere (a log file, CI) one
    log line every ``log_interval`` iterations with the same figures and the time left in the epoch.

    An iteration is an optimizer step; with ``accumulate`` > 1 (micro-batches of ``batch_size`` per step) the bar
    and the lines also show the micro-batches done."""

    PRIORITY = Priority.LOWEST

    def __init__(self, log_interval: int, terminal: bool = None, accumulate: int = 1, batch_size: int = 1):
        self.log_interval = log_interval
        self.accumulate, self.batch_size = accumulate, batch_size
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar = None
        self.started = None

    def before_train_epoch(self, trainer):
        total = trainer.iters_per_epoch
        self.started = (time.monotonic(), trainer.inner_iter)
        if self.terminal:
            self.bar = tqdm(total=total, initial=trainer.inner_iter, unit='step' if self.accumulate > 1 else 'it',
                            dynamic_ncols=True,
                            desc=f'epoch {trainer.epoch + 1}/{trainer.max_epochs}')

    def after_train_iter(self, trainer):
        outputs = getattr(trainer, 'train_outputs', None) or {}
        loss = outputs.get('loss')
        loss = float(loss.detach()) if hasattr(loss, 'detach') else loss
        lr = trainer.optimizer.param_groups[0]['lr'] if trainer.optimizer is not None else None
        figures = {'loss': f'{loss:.4f}' if loss is not None else '?', 'lr': f'{lr:.2e}' if lr is not None else '?'}
        if self.accumulate > 1:
            figures['batch'] = self.batches(trainer, trainer.inner_iter + 1)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(figures, refresh=False)
            return
        done = trainer.inner_iter + 1
        if done % self.log_interval and done != trainer.iters_per_epoch:
            return
        t0, i0 = self.started
        rate = (time.monotonic() - t0) / max(1, done - i0)
        eta = int(rate * (trainer.iters_per_epoch - done))
        step = 'step' if self.accumulate > 1 else 'iteration'
        batches = f' (batch {figures["batch"]})' if self.accumulate > 1 else ''
        logger.info('epoch %d/%d, %s %d/%d%s: loss %s, lr %s, %.2f s/it, epoch eta %d:%02d:%02d',
                    trainer.epoch + 1, trainer.max_epochs, step, done, trainer.iters_per_epoch, batches,
                    figures['loss'], figures['lr'], rate, eta // 3600, eta // 60 % 60, eta % 60)

    def batches(self, trainer, steps_done: int) -> str:
        """``done/total`` micro-batches of the epoch after steps_done optimizer steps."""
        sampler = getattr(getattr(trainer, 'train_dataloader', None), 'sampler', None)
        try:
            total = -(-len(sampler) // self.batch_size)
        except TypeError:
            total = trainer.iters_per_epoch * self.accumulate
        return f'{min(steps_done * self.accumulate, total)}/{total}'

    def after_train_epoch(self, trainer):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
