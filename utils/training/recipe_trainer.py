"""ModelScope's OFATrainer with two of the toolkit's recipe settings, through its own extension points (a subclass
overriding ``train_step`` and ``train``; the trainer's ``train_data_collator``):

* ``accumulate`` N: one trainer iteration is one optimizer step over N micro-batches. The dataloader draws
  ``batch_size x N`` samples per iteration (so OFATrainer's schedule length, the iteration count, logging,
  checkpoints and ``eval_interval`` all count optimizer steps) and :class:`MicroBatchCollator` collates them as N
  batches of ``batch_size``; :meth:`RecipeTrainer.train_step` runs the criterion on each and backpropagates it
  before the next (one micro-batch's activations in memory at a time), the step itself is the OptimizerHook's
  (``utils.patches.train_step.TrainStepProcessor``). ModelScope's own ``cumulative_iters`` is not used: its
  LrSchedulerHook would step every micro-batch.
* ``scst.fresh_optimizer``: SCST from a ``-p`` checkpoint of a cross-entropy run takes its weights only
  (:meth:`RecipeTrainer.train` with ``load_all_state=False``): the optimizer, the schedule and the step count
  start anew. A checkpoint of an SCST run (an interrupted one) resumes whole. The stage a checkpoint was
  trained in is in its trainer state (:class:`StageHook`).

* A resumed epoch skips the batches trained before its checkpoint by index (:class:`SkipTrainedBatches`), not by
  loading each one and throwing it away as ModelScope's ``train_loop`` does.

The criterion is told the optimizer steps done (``criterion.steps``, for ``drop_worst_after``): OFATrainer calls
it without ``update_num``.
"""
from __future__ import annotations

import logging
from typing import Optional

from modelscope.trainers.hooks.hook import Hook
from modelscope.trainers.multi_modal.ofa.ofa_trainer import OFATrainer

logger = logging.getLogger(__name__)


class MicroBatches(list):
    """The collated micro-batches of one optimizer step."""


class MicroBatchCollator:
    """Collate the ``batch_size x N`` samples of an iteration as micro-batches of ``size`` samples (the last
    of an epoch may be smaller, or fewer)."""

    def __init__(self, collate, size: int):
        self.collate, self.size = collate, size

    def __call__(self, samples):
        return MicroBatches(self.collate(samples[i:i + self.size]) for i in range(0, len(samples), self.size))


class _SkipFirst:
    """A batch sampler without its first ``n`` batches (drawn, so the order of the rest is unchanged)."""

    def __init__(self, batch_sampler, n: int):
        self.batch_sampler, self.n = batch_sampler, n

    def __iter__(self):
        batches = iter(self.batch_sampler)
        for _ in zip(range(self.n), batches):
            pass
        yield from batches

    def __len__(self):
        return max(0, len(self.batch_sampler) - self.n)


class SkipTrainedBatches:
    """The train dataloader as ModelScope's ``train_loop`` sees it. Resuming in the middle of an epoch, that loop
    skips the batches trained before the checkpoint (``if i < self.inner_iter: continue``), but only after the
    dataloader has loaded each one: every image read, decoded and preprocessed, then thrown away (at 186k rows and
    batch 4, resuming late in an epoch loads up to 46k batches first). Here the epoch's order is drawn from the same
    batch sampler and the trained batches are skipped by index: the loop gets a placeholder (None) for each, which
    it skips without looking, then the batches it would have got. Epochs that start at batch 0 are the loader's own."""

    def __init__(self, loader, trainer):
        self.loader, self.trainer = loader, trainer

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):  # dataset, sampler, batch_size, ...: the loader's
        if name == 'loader':  # (not set yet: a copy being built)
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self):
        from torch.utils.data import DataLoader
        skip = min(self.trainer.inner_iter, len(self.loader))
        loader = self.loader
        if skip <= 0 or loader.batch_sampler is None:
            yield from loader
            return
        rest = DataLoader(loader.dataset, batch_sampler=_SkipFirst(loader.batch_sampler, skip),
                          num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                          timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                          multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
                          prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers,
                          pin_memory_device=loader.pin_memory_device)
        logger.info('resuming at batch %d of the epoch: the %d trained batches are skipped without loading them',
                    skip + 1, skip)
        for _ in range(skip):
            yield None
        yield from rest


class StageHook(Hook):
    """Records the stage a run trains in into its checkpoints' trainer state (nothing else)."""

    def __init__(self, stage: str):
        self.stage = stage

    def state_dict(self):
        return {'stage': self.stage}


def checkpoint_stage(prefix: str) -> Optional[str]:
    """The stage the checkpoint ``prefix`` (``work_dir/iter_N``) was trained in; None when its trainer state does
    not say (a checkpoint written before stages were recorded: a cross-entropy run)."""
    import torch

    from utils.core.checkpoint_files import TRAINER_STATE
    from utils.core.checkpoint_files import trainer_state_loading
    with trainer_state_loading():
        meta = torch.load(prefix + TRAINER_STATE, map_location='cpu', weights_only=True, mmap=True).get('meta', {})
    for key, value in meta.items():
        if StageHook.__name__ in str(key) and isinstance(value, dict):
            return value.get('stage')
    return None


class RecipeTrainer(OFATrainer):
    """OFATrainer whose iteration may be several micro-batches, and whose SCST start from a CE checkpoint can
    take the weights only (module docstring)."""

    fresh_optimizer = False  # set by build_trainer: stage scst with scst.fresh_optimizer

    def train_step(self, model, inputs):
        if hasattr(self.criterion, 'steps'):
            self.criterion.steps = self.iter  # optimizer steps done (one per iteration)
        if not isinstance(inputs, MicroBatches):
            return super().train_step(model, inputs)
        for batch in inputs[:-1]:
            super().train_step(model, batch)
            self.step_processor.add_micro_batch(self)
        return super().train_step(model, inputs[-1])  # backward and step: the OptimizerHook's

    def train(self, checkpoint_path=None, load_all_state=True, *args, **kwargs):
        if checkpoint_path is not None and self.fresh_optimizer and checkpoint_stage(checkpoint_path) != 'scst':
            logger.info('SCST from %s, a cross-entropy checkpoint: its weights only (scst.fresh_optimizer); the '
                        'optimizer, schedule and step count start anew', checkpoint_path)
            load_all_state = False
        try:
            return super().train(checkpoint_path, load_all_state, *args, **kwargs)
        except ValueError as e:
            if 'parameter group' not in str(e):
                raise
            from utils.core.errors import CheckpointError
            raise CheckpointError(f'checkpoint {checkpoint_path}: its optimizer state holds other parameters than '
                                  'this run trains (a different "freeze" or stage); train with the same freeze, or '
                                  'start SCST with scst.fresh_optimizer true') from None

    def train_loop(self, data_loader):
        return super().train_loop(SkipTrainedBatches(data_loader, self))

    def output_weights(self):
        """A context in which the model holds the weights ``output/`` gets (``ema``: the average), or None: the
        trained weights (utils/patches/checkpoints.py)."""
        from utils.training.ema import ema_hook
        hook = ema_hook(self)
        return hook.swapped_in(self) if hook is not None and hook.average is not None else None
