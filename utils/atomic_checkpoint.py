"""Checkpoints that survive a kill: every file is written under a temporary name, renamed when complete."""
from __future__ import annotations

import os
import shutil

from modelscope.trainers.hooks.checkpoint.checkpoint_processor import CheckpointProcessor


class AtomicCheckpointProcessor(CheckpointProcessor):
    """ModelScope's CheckpointProcessor, except that no file appears under its final name before it is
    complete: a kill while a checkpoint is written leaves at most a ``*.tmp`` file behind. The trainer
    state is written before the weights, so a checkpoint is complete once ``iter_N.pth`` exists."""

    def save_trainer_state(self, trainer, model, train_state_file, meta, save_optimizers):
        tmp = train_state_file + '.tmp'
        super().save_trainer_state(trainer, model, tmp, meta, save_optimizers)
        os.replace(tmp, train_state_file)

    def save_model_state(self, model, model_file):
        tmp = model_file + '.tmp'
        super().save_model_state(model, tmp)
        os.replace(tmp, model_file)

    def link(self, model, src_file, output_dir):
        """output/pytorch_model.bin is swapped in one rename, never missing or half-copied."""
        dest = os.path.join(output_dir, self._bin_file(model))
        tmp = dest + '.tmp'
        if os.path.lexists(tmp):
            os.unlink(tmp)
        try:
            os.link(src_file, tmp)
        except OSError:
            shutil.copyfile(src_file, tmp)
        os.replace(tmp, dest)


def use_atomic_checkpoints(trainer) -> None:
    from modelscope.trainers.hooks import CheckpointHook
    for hook in trainer.hooks:
        if isinstance(hook, CheckpointHook):
            hook.set_processor(AtomicCheckpointProcessor())
