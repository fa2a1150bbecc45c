"""An exponential moving average of the weights (``ema``: the decay; fairseq/OFA ``--store-ema``).

:class:`EmaHook` keeps, beside the trained weights, ``average = decay * average + (1 - decay) * weights`` after
every optimizer step, starting from the weights the run starts with. The average is part of the trainer state
(``iter_N_trainer_state.pth``, through the hook's ``state_dict``), so ``-p latest`` continues it. Validation,
``output_best/`` and ``output/`` hold the averaged weights (:func:`averaged_weights` puts them into the model
for the time they are read); ``iter_N.pth`` holds the trained ones, from which training resumes.

Parameters that do not train (``freeze``) are their own average and are not kept twice. Buffers (BatchNorm
statistics) are the model's own.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Dict, List, Optional

import torch
from modelscope.trainers.hooks.hook import Hook
from modelscope.trainers.hooks.priority import Priority

logger = logging.getLogger(__name__)


def _tracked(model: torch.nn.Module) -> Dict[str, torch.nn.Parameter]:
    """The parameters the average follows: those that train, one per storage (OFA's output projection shares the
    token embedding's storage under another parameter object)."""
    seen, out = set(), {}
    for name, p in model.named_parameters():
        key = p.untyped_storage().data_ptr()
        if p.requires_grad and key not in seen:
            seen.add(key)
            out[name] = p
    return out


class EmaHook(Hook):
    """The average of the weights after each optimizer step. Runs after the OptimizerHook (ABOVE_NORMAL) and before
    checkpoints (LOW) and validation (LOWEST) of the same iteration."""

    PRIORITY = Priority.NORMAL

    def __init__(self, decay: float):
        self.decay = decay
        self.average: Optional[Dict[str, torch.Tensor]] = None
        self.loaded = False

    def _params(self, trainer) -> Dict[str, torch.nn.Parameter]:
        return _tracked(trainer.unwrap_module(trainer.model))

    def before_run(self, trainer):
        if self.average is None:  # not loaded from a checkpoint's trainer state (LoadCheckpointHook runs first)
            if trainer.iter > 0:
                logger.warning('the checkpoint holds no average of the weights: the EMA starts from its weights')
            self.average = {n: p.detach().clone() for n, p in self._params(trainer).items()}
        else:  # a checkpoint's average (loaded on the CPU), beside the weights it averages
            params = self._params(trainer)
            self.average = {n: t.to(params[n].device) if n in params else t for n, t in self.average.items()}
        logger.info('EMA of the weights, decay %g: %d tensors averaged%s', self.decay, len(self.average),
                    ' (continued from the checkpoint)' if self.loaded else '')

    @torch.no_grad()
    def after_train_iter(self, trainer):
        params = self._params(trainer)
        names = [n for n in params if n in self.average]
        torch._foreach_lerp_([self.average[n] for n in names], [params[n].detach() for n in names], 1.0 - self.decay)

    def state_dict(self):
        return {'decay': self.decay, 'average': self.average}

    def load_state_dict(self, state_dict):
        average = (state_dict or {}).get('average')
        if average:
            self.average = {n: t.clone() for n, t in average.items()}
            self.loaded = True

    @contextlib.contextmanager
    def swapped_in(self, trainer):
        """The model holds the averaged weights inside the block, its trained weights again after it."""
        params = self._params(trainer)
        names: List[str] = [n for n in params if n in self.average]
        with torch.no_grad():
            trained = [params[n].detach().clone() for n in names]
            for n in names:
                params[n].copy_(self.average[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, t in zip(names, trained):
                    params[n].copy_(t)


def ema_hook(trainer) -> Optional[EmaHook]:
    found = [h for h in getattr(trainer, 'hooks', ()) if isinstance(h, EmaHook)]
    return found[0] if found else None


@contextlib.contextmanager
def averaged_weights(trainer):
    """The trainer's model holds its EMA weights inside the block (nothing changes when ``ema`` is off)."""
    hook = ema_hook(trainer)
    if hook is None or hook.average is None:
        yield
        return
    with hook.swapped_in(trainer):
        yield
