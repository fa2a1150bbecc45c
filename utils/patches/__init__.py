"""Every place where the toolkit changes ModelScope's behaviour, with the reason, in one package.

Written for ModelScope 1.40.2 (requirements.txt). Importing this package checks the installed ModelScope
once: another version, or a ModelScope where something a patch relies on is gone, gets one warning per
patch naming what differs (see :func:`check_modelscope`), never a silent wrong result.

| patch | module | why |
|---|---|---|
| hub check skipped for local model dirs | ``hub_check`` | ``EpochBasedTrainer.__init__`` asks the hub whether a *local* dir is the latest version: ~20 s of retries offline |
| decoder key/value cache | ``generation`` | the OFA ``SequenceGenerator`` drops the cache the decoder returns and re-decodes the whole prefix at every step |
| vectorised no-repeat-n-gram blocker | ``generation`` | the stock blocker loops over every hypothesis in Python (and copies tokens to the host on a GPU) |
| atomic checkpoints, ``output.partial``, pipeline/preprocessor type in the saved ``configuration.json`` | ``checkpoints`` | a kill mid-save left half-written files; ``CheckpointHook`` rewrites ``pipeline.type`` to the task at every save |
| trainer-state loading allow-list | ``checkpoints`` | torch 2.11's ``weights_only=True`` refuses the numpy RNG state in ModelScope's trainer state: ``-p`` could not resume |
| autocast on the forward the criterion runs | ``train_step`` | ModelScope's fp16 hook wraps ``OfaForAllTasks.forward``, which the OFA criterion never calls |
| gradient averaging, buffer broadcast, ``set_epoch`` under torchrun | ``train_step`` | ``OFATrainer.train_step`` calls the model around DDP's forward: gradients were never all-reduced; no sampler reshuffle per epoch |

Two more changes live with the class they extend: the stylish preprocessor owns its column names
(``preprocessors/stylish_ic.py``: a model's ``dataset.column_map`` renamed the toolkit's rows), and the SCST
stage replaces ``trainer.criterion`` (``utils/training/stages.py``).
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional

logger = logging.getLogger(__name__)

MODELSCOPE_VERSION = '1.40.2'  # the version every patch here was written and tested against


def _has(path: str, *attrs: str) -> Callable[[], bool]:
    def check() -> bool:
        import importlib
        module_name, _, obj_name = path.rpartition('.')
        obj = getattr(importlib.import_module(module_name), obj_name)
        return all(hasattr(obj, a) for a in attrs)
    return check


# patch -> what in ModelScope it relies on (each a check that must hold)
RELIES_ON: Dict[str, Dict[str, Callable[[], bool]]] = {
    'hub_check': {
        'modelscope.trainers.trainer.check_local_model_is_latest':
            _has('modelscope.trainers.trainer.check_local_model_is_latest', '__call__'),
    },
    'generation': {
        'SequenceGenerator.repeat_ngram_blocker (set in __init__), NGramRepeatBlock._no_repeat_ngram':
            _has('modelscope.models.multi_modal.ofa.generate.ngram_repeat_block.NGramRepeatBlock', '_no_repeat_ngram'),
        'OFA decoder reorder_incremental_state_scripting':
            _has('modelscope.models.multi_modal.ofa.modeling_ofa.OFADecoder', 'reorder_incremental_state_scripting'),
    },
    'checkpoints': {
        'CheckpointProcessor.prepare_output, save_model_state, save_trainer_state, link':
            _has('modelscope.trainers.hooks.checkpoint.checkpoint_processor.CheckpointProcessor',
                 'prepare_output', 'save_model_state', 'save_trainer_state', 'link'),
    },
    'train_step': {
        'OptimizerProcessor.backward, initialize_optimizer':
            _has('modelscope.trainers.hooks.optimizer.base.OptimizerProcessor', 'backward', 'initialize_optimizer'),
        'OFATrainer.train_step':
            _has('modelscope.trainers.multi_modal.ofa.ofa_trainer.OFATrainer', 'train_step'),
        'DDPHook.wrap_module':
            _has('modelscope.trainers.hooks.distributed.ddp_hook.DDPHook', 'wrap_module'),
    },
}

_found: Optional[List[str]] = None  # the warnings of the check, once it has run


def check_modelscope(force: bool = False) -> List[str]:
    """Warn (once per process) where the installed ModelScope differs from what the patches were written
    for; returns the warnings. Nothing is raised: a differing version may still be fine, and says so."""
    global _found
    if _found is not None and not force:
        return _found
    import modelscope
    problems = []
    installed = getattr(modelscope, '__version__', '?')
    if installed != MODELSCOPE_VERSION:
        problems.append(f'ModelScope {installed} is installed; the toolkit\'s patches (utils/patches) were '
                        f'written for {MODELSCOPE_VERSION} (requirements.txt): results may differ')
    for patch, checks in RELIES_ON.items():
        for what, holds in checks.items():
            try:
                ok = holds()
            except (ImportError, AttributeError):
                ok = False
            if not ok:
                problems.append(f'utils/patches/{patch}.py relies on {what}, which this ModelScope ({installed}) '
                                'lacks: install the version in requirements.txt')
    for message in problems:
        logger.warning('%s', message)
    _found = problems
    return problems


check_modelscope()
