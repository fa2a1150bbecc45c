"""Checkpoints that survive a kill, and that load with ``torch.load(weights_only=True)``.

* :class:`AtomicCheckpointProcessor` (ModelScope's ``CheckpointProcessor``): every file is written under a
  temporary name and renamed when complete, with a checksum file (``iter_N.sha256``, ``output/weights.sha256``:
  utils/core/checksums.py); ``output/`` gets a copy of the newest weights (ModelScope hard-links them: damage to
  one was damage to both); a fresh ``output/`` is assembled in ``output.partial``; ``max_checkpoint_num`` counts
  the checkpoints on disk (ModelScope's hook forgets earlier runs' files); the saved ``configuration.json`` names
  the toolkit's pipeline and preprocessor (ModelScope rewrites ``pipeline.type`` to the task at every save).
  A trainer with an ``output_weights()`` that gives a context (``ema``: the averaged weights,
  utils/training/recipe_trainer.py) has those weights in ``output/``; ``iter_N.pth`` keeps the trained ones.
* :func:`trainer_state_loading` (defined in utils/core/checkpoint_files.py, which imports no ModelScope, so that
  ``-p latest`` is resolved beside the start-up's imports): ModelScope's trainer state holds numpy RNG state, which
  torch 2.11's default ``weights_only=True`` refuses; the numpy types it needs are allow-listed.
"""
from __future__ import annotations

import copy
import errno
import logging
import os
import shutil
from typing import Dict, List, Optional

from modelscope.trainers.hooks.checkpoint.checkpoint_processor import CheckpointProcessor

from utils.core.checksums import (checkpoint_sums_file, copy_hashed, replacement_entries, sha256_of, write_sums)
from utils.core.checkpoint_files import (CKPT_NAME, TRAINER_STATE, checkpoints_in, remove_checkpoint,  # noqa: F401
                                         trainer_state_loading)
from utils.core.layout import WEIGHTS_CHECKSUM_FILE

logger = logging.getLogger(__name__)


def prune_checkpoints(work_dir: str, keep: int, newest: str) -> List[str]:
    """Keep the ``keep`` newest complete checkpoints on disk in work_dir (``newest``, the one just written, always
    among them), of this run and of earlier runs and resumes alike; delete the others. Returns the deleted ones."""
    others = [p for _, p in checkpoints_in(work_dir) if p != newest]
    deleted = others[max(keep - 1, 0):]
    for prefix in deleted:
        logger.info('deleting checkpoint %s (max_checkpoint_num %d)', prefix, keep)
        remove_checkpoint(prefix)
    return deleted


class AtomicCheckpointProcessor(CheckpointProcessor):
    """ModelScope's CheckpointProcessor, except that nothing appears under its final name before it is
    complete: a kill while a checkpoint is written leaves at most a ``*.tmp`` file behind. The trainer
    state is written before the weights, so a checkpoint is complete once ``iter_N.pth`` exists; its checksum
    file ``iter_N.sha256`` (both files' sha256, taken from the files written) is in place before that.

    ``output/`` holds a copy of the newest checkpoint's weights, not a link (damage to a checkpoint is not damage
    to output/), with its ``weights.sha256``. The output model dir of a fresh run is assembled in
    ``output.partial`` and renamed to ``output`` when the first checkpoint's weights are in it: ``output/`` is never
    a model dir without weights.

    ``max_checkpoint_num`` (the hook's, which then prunes nothing itself: it only remembers its own run's files)
    counts the complete checkpoints on disk, across runs and resumes: after each save the oldest beyond it go."""

    staging = None  # (partial dir, output dir) until the first checkpoint

    def __init__(self, max_checkpoint_num: Optional[int] = None):
        self.max_checkpoint_num = max_checkpoint_num
        self.sha256: Dict[str, str] = {}  # file written -> the sha256 of its bytes

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

    def save_checkpoints(self, trainer, checkpoint_path_prefix, output_dir, meta=None, save_optimizers=True):
        self.trainer = trainer
        super().save_checkpoints(trainer, checkpoint_path_prefix, output_dir, meta, save_optimizers)
        self.sha256.clear()
        if self.max_checkpoint_num is not None:
            prune_checkpoints(os.path.dirname(checkpoint_path_prefix), self.max_checkpoint_num, checkpoint_path_prefix)

    def remove_checkpoints(self, trainer, checkpoint_path_prefix):
        remove_checkpoint(checkpoint_path_prefix)

    def save_trainer_state(self, trainer, model, train_state_file, meta, save_optimizers):
        tmp = train_state_file + '.tmp'
        super().save_trainer_state(trainer, model, tmp, meta, save_optimizers)
        self.sha256[train_state_file] = sha256_of(tmp)
        os.replace(tmp, train_state_file)

    def save_model_state(self, model, model_file):
        """The weights under a temporary name, then their checksum (a checkpoint's iter_N.sha256 with its trainer
        state's; a model dir's weights.sha256), then the final name."""
        tmp = model_file + '.tmp'
        super().save_model_state(model, tmp)
        sha = self.sha256[model_file] = sha256_of(tmp)
        name = os.path.basename(model_file)
        if CKPT_NAME.match(name):
            prefix = model_file[:-len('.pth')]
            entries = [(sha, name)]
            state = self.sha256.get(prefix + TRAINER_STATE)
            if state is not None:
                entries.append((state, os.path.basename(prefix + TRAINER_STATE)))
            write_sums(checkpoint_sums_file(prefix), entries)
        else:
            write_sums(os.path.join(os.path.dirname(model_file), WEIGHTS_CHECKSUM_FILE), [(sha, name)])
        os.replace(tmp, model_file)

    def link(self, model, src_file, output_dir):
        """output/'s weights: a copy of src_file (or of the trainer's ``output_weights()``), swapped in with one
        rename, never missing or half-copied."""
        swap = getattr(getattr(self, 'trainer', None), 'output_weights', lambda: None)()
        if swap is None:
            return self._link(model, src_file, output_dir)
        # the weights output/ holds, written beside the checkpoint (a *.pth.tmp: swept if a kill leaves it), copied
        other = os.path.splitext(src_file)[0] + '_output.pth.tmp'
        try:
            with swap:
                CheckpointProcessor.save_model_state(self, model, other)
            self.sha256[other] = sha256_of(other)
            self._link(model, other, output_dir)
        finally:
            if os.path.lexists(other):
                os.unlink(other)

    def _link(self, model, src_file, output_dir):
        if self.staging:
            partial, output_dir = self.staging
            self._copy(model, src_file, partial)
            if os.path.isdir(output_dir):  # a weightless leftover of an older run
                shutil.rmtree(output_dir)
            os.replace(partial, output_dir)
            self.staging = None
            return
        self._copy(model, src_file, output_dir)

    def _copy(self, model, src_file, output_dir):
        """Copy src_file's weights into output_dir, hashing the bytes written; they must be the checkpoint's (as
        its checksum says). weights.sha256 lists the old and the new hash while the file is renamed into place."""
        name = self._bin_file(model)
        dest = os.path.join(output_dir, name)
        tmp = dest + '.tmp'
        if os.path.lexists(tmp):
            os.unlink(tmp)
        sha = copy_hashed(src_file, tmp)
        expected = self.sha256.get(src_file)
        if expected is not None and sha != expected:
            os.unlink(tmp)
            raise OSError(errno.EIO, f'{src_file} changed while it was copied to {output_dir} (sha256 {sha}, '
                                     f'written as {expected})')
        sums = os.path.join(output_dir, WEIGHTS_CHECKSUM_FILE)
        had_sums = os.path.isfile(sums) and os.path.isfile(dest)
        if had_sums:  # the dir verifies before and after the rename
            write_sums(sums, replacement_entries(output_dir, sha, name))
        os.replace(tmp, dest)
        write_sums(sums, [(sha, name)])


def use_atomic_checkpoints(trainer) -> None:
    """Every CheckpointHook saves through :class:`AtomicCheckpointProcessor`, which takes over its
    ``max_checkpoint_num`` (counted on disk)."""
    from modelscope.trainers.hooks import CheckpointHook
    for hook in trainer.hooks:
        if isinstance(hook, CheckpointHook):
            hook.set_processor(AtomicCheckpointProcessor(hook.max_checkpoint_num))
            hook.max_checkpoint_num = None  # its own pruning knows only this run's checkpoints


def save_model_dir(trainer, output_dir: str) -> None:
    """A complete model dir of the trainer's current weights in output_dir (a new dir: the caller swaps it in
    whole), laid out as CheckpointHook lays out ``output/``: configuration.json, config, vocab, style map, weights
    and their weights.sha256."""
    processor = AtomicCheckpointProcessor()
    model = trainer.unwrap_module(trainer.model)
    CheckpointProcessor.prepare_output(processor, trainer, output_dir)
    processor.save_model_state(model, os.path.join(output_dir, processor._bin_file(model)))
