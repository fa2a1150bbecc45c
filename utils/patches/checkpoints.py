"""Checkpoints that survive a kill, and that load with ``torch.load(weights_only=True)``.

* :class:`AtomicCheckpointProcessor` (ModelScope's ``CheckpointProcessor``): every file is written under a
  temporary name and renamed when complete; a fresh ``output/`` is assembled in ``output.partial``; the
  saved ``configuration.json`` names the toolkit's pipeline and preprocessor (ModelScope rewrites
  ``pipeline.type`` to the task at every save).
* :func:`trainer_state_loading`: ModelScope's trainer state holds numpy RNG state, which torch 2.11's
  default ``weights_only=True`` refuses; the numpy types it needs are allow-listed.
"""
from __future__ import annotations

import contextlib
import copy
import os
import shutil

from modelscope.trainers.hooks.checkpoint.checkpoint_processor import CheckpointProcessor


class AtomicCheckpointProcessor(CheckpointProcessor):
    """ModelScope's CheckpointProcessor, except that nothing appears under its final name before it is
    complete: a kill while a checkpoint is written leaves at most a ``*.tmp`` file behind. The trainer
    state is written before the weights, so a checkpoint is complete once ``iter_N.pth`` exists.

    The output model dir of a fresh run is assembled in ``output.partial`` and renamed to ``output`` when
    the first checkpoint's weights are in it: ``output/`` is never a model dir without weights."""

    staging = None  # (partial dir, output dir) until the first checkpoint

    def prepare_output(self, trainer, output_dir):
        if os.path.isfile(os.path.join(output_dir, self._bin_file(trainer.unwrap_module(trainer.model)))):
            return super().prepare_output(trainer, output_dir)  # resuming: keep serving the last weights
        partial = output_dir.rstrip('/') + '.partial'
        shutil.rmtree(partial, ignore_errors=True)
        super().prepare_output(trainer, partial)
        self.staging = (partial, output_dir)

    def copy_files_and_dump_config(self, trainer, output_dir, config, bin_file):
        """The output's configuration.json names the toolkit's pipeline and preprocessor, so that ModelScope's
        ``pipeline()`` captions with a style: ModelScope's ``prepare_output`` has just reset ``pipeline.type`` to
        the task, and a hub model names the stock preprocessor. The file is dumped once, with these values in
        it; the trainer's own cfg is left as it is."""
        from utils.core.layout import STYLISH_IC_PIPELINE, STYLISH_IC_PREPROCESSOR
        config = copy.deepcopy(config)
        config['pipeline'] = {'type': STYLISH_IC_PIPELINE}
        config['preprocessor'] = {'type': STYLISH_IC_PREPROCESSOR}
        CheckpointProcessor.copy_files_and_dump_config(trainer, output_dir, config, bin_file)

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
        if self.staging:
            partial, output_dir = self.staging
            self._link(model, src_file, partial)
            if os.path.isdir(output_dir):  # a weightless leftover of an older run
                shutil.rmtree(output_dir)
            os.replace(partial, output_dir)
            self.staging = None
            return
        self._link(model, src_file, output_dir)

    def _link(self, model, src_file, output_dir):
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


def save_model_dir(trainer, output_dir: str) -> None:
    """A complete model dir of the trainer's current weights in output_dir (a new dir: the caller swaps it in
    whole), laid out as CheckpointHook lays out ``output/``: configuration.json, config, vocab, style map, weights."""
    processor = AtomicCheckpointProcessor()
    model = trainer.unwrap_module(trainer.model)
    CheckpointProcessor.prepare_output(processor, trainer, output_dir)
    processor.save_model_state(model, os.path.join(output_dir, processor._bin_file(model)))


@contextlib.contextmanager
def trainer_state_loading():
    """Let ``torch.load(weights_only=True)`` read ModelScope trainer-state files, which hold numpy RNG
    state. Allow-lists the numpy types needed instead of turning weights_only off."""
    import numpy as np
    import torch
    from numpy._core.multiarray import _reconstruct

    allowed = [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    with torch.serialization.safe_globals(allowed):
        yield
