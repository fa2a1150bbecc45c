"""Every place where the toolkit changes how ModelScope's own code behaves (a function or method of its replaced
or wrapped, or its global state changed), with the reason, in one package.

Written for ModelScope 1.40.2 (requirements.txt). Importing this package checks the installed ModelScope
once: another version, or a ModelScope where something a patch relies on is gone, gets one warning per
patch naming what differs (see :func:`check_modelscope`), never a silent wrong result.

| patch | module | why |
|---|---|---|
| hub check skipped for local model dirs | ``hub_check`` | ``EpochBasedTrainer.__init__`` asks the hub whether a *local* dir is the latest version: ~20 s of retries offline |
| decoder key/value cache | ``generation`` | the OFA ``SequenceGenerator`` drops the cache the decoder returns and re-decodes the whole prefix at every step |
| cross-attention keys/values once per image, one reorder a step, position biases for the new position only | ``generation`` | the stock search reorders the whole cache (cross-attention and encoder output included, the same for every beam of an image) at every step, twice |
| ``<code_k>``/``<bin_k>`` rows sliced off the output projection (``mask_image_tokens``) | ``generation`` | an undertrained or pretrain model emits image-code tokens as words (``code7477 code7477``) |
| the beam search loop for a covered call: one buffer for the vocabulary-sized work, candidates per row first, one row per sentence at the first step | ``beam_search`` (installed by ``generation``) | the stock loop makes ~10 passes per step over ``rows x vocabulary`` floats (NaN check, a copy and write-back around the n-gram blocker, ``lprobs + scores``), each into a new tensor |
| vectorised no-repeat-n-gram blocker | ``generation`` | the stock blocker loops over every hypothesis in Python (and copies tokens to the host on a GPU) |
| atomic checkpoints, ``output.partial``, pipeline/preprocessor type in the saved ``configuration.json`` | ``checkpoints`` | a kill mid-save left half-written files; ``CheckpointHook`` rewrites ``pipeline.type`` to the task at every save |
| checksummed checkpoints and ``output/``; ``output/`` a copy, not a hard link | ``checkpoints`` | nothing recorded what a checkpoint held (a damaged one resumed silently); damage to the newest checkpoint was damage to ``output/`` |
| ``max_checkpoint_num`` counted on disk (the hook's own pruning turned off) | ``checkpoints`` | ``CheckpointHook`` prunes only the files of its own run: resumes piled up checkpoints |
| trainer-state loading allow-list | ``checkpoints`` | torch 2.11's ``weights_only=True`` refuses the numpy RNG state in ModelScope's trainer state: ``-p`` could not resume |
| autocast on the forward the criterion runs | ``train_step`` | ModelScope's fp16 hook wraps ``OfaForAllTasks.forward``, which the OFA criterion never calls |
| gradient averaging, buffer broadcast, ``set_epoch`` under torchrun | ``train_step`` | ``OFATrainer.train_step`` calls the model around DDP's forward: gradients were never all-reduced; no sampler reshuffle per epoch |
| ModelScope's console handler at warnings (everything with ``verbose``) | ``console`` | the global ``modelscope`` logger prints its config dump, hook table and a line per iteration on the console |
| the run's ``work_dir/{time}.log`` handler detached after training | ``console`` | the trainer attaches it to the global ``modelscope`` logger and never removes it: later work in the process wrote into that run's log |

The toolkit's other adaptations of ModelScope go through ModelScope's own extension points (a subclass
overriding a method, a registry, a public attribute, the cfg) and live with what they extend; they change
nothing outside the toolkit's own objects:

| change | where | why it stays there |
|---|---|---|
| the rows' field names are the toolkit's (``column_map``), whatever a model's ``dataset.column_map`` says | ``utils/captioning/preprocessor.py``, ``OfaStylishICPreprocessor.__init__`` | an attribute of the subclass's own instances: ModelScope's OFA recipe writes ``column_map`` (e.g. text -> caption) into configuration.json, which would rename the toolkit's rows |
| the prompt built per sample from its style; pixels from the image cache | same module, ``_build_infer_sample`` and ``patch_image`` overrides | methods of the subclass |
| ``OfaPreprocessor`` whose inner preprocessor is the stylish one (built without ``OfaPreprocessor.__init__``); ``save_pretrained`` also writes ``style_map.json`` | same module, ``OfaPreprocessorForStylishIC`` | a subclass, registered under its own name (``PREPROCESSORS``) |
| ModelScope's ``prepare_model`` skipped (``self._model_prepare = True``) | ``utils/captioning/pipeline.py``, ``StylishImageCaptioningPipeline.__init__`` | set on the subclass's own instance, registered under its own name (``PIPELINES``): the Captioner has already put the model on its device, in eval mode |
| a new ``SequenceGenerator`` (the conf's beam settings) as a loaded model's ``generator`` | ``utils/captioning/captioner.py``, ``Captioner.set_generation`` | the Captioner's own model instance; ``generation.speed_up`` then repairs that generator |
| the SCST criterion instead of OFATrainer's (``trainer.criterion``, sharing ``trainer.log_buffer``) | ``utils/training/stages.py``, ``Scst.install`` | the trainer's public attributes, on one trainer |
| the training configuration (task, pipeline type, optimizer, criterion, hooks, ``output_sub_dir``) | ``utils/training/trainer.py``, ``make_cfg_modify_fn`` | ModelScope's own ``cfg_modify_fn`` argument: configuration, not a change to its code |
| transformers' "does not inherit GenerationMixin" notice filtered out; the ``fairseq`` logger at warnings | ``utils/core/logs.py``, ``setup_logging`` | not ModelScope's code: a filter and a level on those libraries' named loggers, set with the console by every command, including those that never import ModelScope (``utils.core`` is below this package) |
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


def _defines(path: str, attr: str) -> Callable[[], bool]:
    """The class itself defines attr (not only a base class: the patch relies on that override)."""
    def check() -> bool:
        import importlib
        module_name, _, obj_name = path.rpartition('.')
        return attr in vars(getattr(importlib.import_module(module_name), obj_name))
    return check


def _suffix_is(suffix: str) -> Callable[[], bool]:
    """ModelScope names trainer-state files as utils/core/checkpoint_files.py (no ModelScope import) expects."""
    def check() -> bool:
        from modelscope.trainers.hooks.checkpoint.checkpoint_processor import CheckpointProcessor
        return CheckpointProcessor.TRAINER_STATE_SUFFIX == suffix
    return check


def _modelscope_logger() -> logging.Logger:
    from modelscope.utils.logger import get_logger
    return get_logger()


# patch -> what in ModelScope it relies on (each a check that must hold)
RELIES_ON: Dict[str, Dict[str, Callable[[], bool]]] = {
    'hub_check': {
        'modelscope.trainers.trainer.check_local_model_is_latest':
            _has('modelscope.trainers.trainer.check_local_model_is_latest', '__call__'),
    },
    'generation': {
        'SequenceGenerator.repeat_ngram_blocker (set in __init__), NGramRepeatBlock._no_repeat_ngram':
            _has('modelscope.models.multi_modal.ofa.generate.ngram_repeat_block.NGramRepeatBlock', '_no_repeat_ngram'),
        'SequenceGenerator._generate (the stock path, for calls beam_search does not cover) and finalize_hypos '
        '(which records beam_search\'s finished hypotheses)':
            _has('modelscope.models.multi_modal.ofa.generate.sequence_generator.SequenceGenerator', '_generate',
                 'finalize_hypos'),
        'search.BeamSearch (the search beam_search reproduces)':
            _has('modelscope.models.multi_modal.ofa.generate.search', 'BeamSearch'),
    },
    'checkpoints': {
        'CheckpointProcessor.prepare_output, save_checkpoints, save_model_state, save_trainer_state, link, '
        'remove_checkpoints':
            _has('modelscope.trainers.hooks.checkpoint.checkpoint_processor.CheckpointProcessor',
                 'prepare_output', 'save_checkpoints', 'save_model_state', 'save_trainer_state', 'link',
                 'remove_checkpoints'),
        'CheckpointHook._remove_obsolete_checkpoints (pruning by its max_checkpoint_num, turned off)':
            _has('modelscope.trainers.hooks.CheckpointHook', '_remove_obsolete_checkpoints'),
        'CheckpointProcessor.TRAINER_STATE_SUFFIX == "_trainer_state.pth" (utils/core/checkpoint_files.py)':
            _suffix_is('_trainer_state.pth'),
    },
    'console': {
        'modelscope.utils.logger.get_logger, returning the global "modelscope" logger':
            lambda: _modelscope_logger().name == 'modelscope',
        'the console StreamHandler of the "modelscope" logger':
            lambda: any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                        for h in _modelscope_logger().handlers),
    },
    'train_step': {
        'OptimizerProcessor.backward, initialize_optimizer':
            _has('modelscope.trainers.hooks.optimizer.base.OptimizerProcessor', 'backward', 'initialize_optimizer'),
        'OFATrainer.train_step':
            _defines('modelscope.trainers.multi_modal.ofa.ofa_trainer.OFATrainer', 'train_step'),
        'DDPHook.wrap_module':
            _has('modelscope.trainers.hooks.distributed.ddp_hook.DDPHook', 'wrap_module'),
        'CheckpointHook._create_training_state, saving each hook\'s state_dict (EMA, the stage: utils/training)':
            _has('modelscope.trainers.hooks.CheckpointHook', '_create_training_state'),
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
