"""Trainer assembly: ModelScope's OFATrainer with the toolkit's preprocessors, dataset, ModelScope cfg and hooks.

A stage (:mod:`utils.training.stages`) is one configuration of this path: it picks the criterion and the
stage-specific cfg; validation and the best checkpoint (:mod:`utils.training.validation`) are the same for
every stage. The recipe's settings (``accumulate``, ``freeze``, ``ema``, ``drop_worst_*``) are installed here
too (:func:`install_recipe`; :mod:`utils.training.recipe_trainer`, :mod:`~utils.training.freeze`,
:mod:`~utils.training.ema`).
"""
from __future__ import annotations

import logging
from typing import List

from utils.core import distributed
from utils.core.layout import OUTPUT_DIR
from utils.core.conf import Conf

logger = logging.getLogger(__name__)


def model_dir_of(conf: Conf) -> str:
    """The local dir of conf.model.model_name: the dir itself, or the hub snapshot (downloaded if needed)."""
    if conf.model.is_local:
        return conf.model.model_name
    from modelscope.hub.snapshot_download import snapshot_download
    return snapshot_download(conf.model.model_name, revision=conf.model.model_revision)


def make_cfg_modify_fn(conf: Conf):
    """The training section of the ModelScope configuration, from the conf (nothing else sets it)."""
    import torch

    def cfg_modify_fn(cfg):
        cfg.task = 'image-captioning'  # a pretrain checkpoint becomes a captioning model
        cfg.pipeline = {'type': 'image-captioning'}
        for key, value in conf.model.model_cfg.items():
            if value is not None:
                cfg.model[key] = value
        cfg.model['beam_search'] = {'beam_size': conf.generation.beam_size, 'max_len_b': conf.generation.max_len, 'min_len': 1,
                                    'no_repeat_ngram_size': conf.generation.no_repeat_ngram_size}
        cfg.train = {
            'work_dir': conf.run.work_dir,
            'max_epochs': conf.train.max_epochs,
            # one iteration = one optimizer step = `accumulate` micro-batches of batch_size (recipe_trainer)
            'dataloader': {'batch_size_per_gpu': conf.run.batch_size * conf.train.accumulate,
                           'workers_per_gpu': conf.run.num_workers,
                           'shuffle': True, 'pin_memory': torch.cuda.is_available(),
                           'persistent_workers': conf.run.num_workers > 0},
            # fused: torch's one-kernel AdamW (same update rule as the default per-parameter loop, ~3x faster)
            'optimizer': {'type': 'AdamW', 'lr': conf.train.lr, 'weight_decay': conf.train.weight_decay, 'fused': True},
            'lr_scheduler': {'name': 'polynomial_decay', 'warmup_proportion': conf.train.warmup, 'lr_end': 1e-7},
            'lr_scheduler_hook': {'type': 'LrSchedulerHook', 'by_epoch': False},
            'optimizer_hook': {'type': 'OptimizerHook', 'grad_clip': {'max_norm': 1.0, 'norm_type': 2},
                               'loss_keys': 'loss'},
            'criterion': {'name': 'AdjustLabelSmoothedCrossEntropyCriterion',
                          'label_smoothing': conf.train.label_smoothing, 'ignore_prefix_size': 0,
                          'ignore_eos': False, 'report_accuracy': False, 'sentence_avg': False,
                          'drop_worst_ratio': conf.train.drop_worst_ratio,
                          'drop_worst_after': conf.train.drop_worst_after, 'use_rdrop': False,
                          'reg_alpha': 1.0, 'sample_patch_num': 196, 'constraint_range': None},
            'hooks': [
                {'type': 'CheckpointHook', 'by_epoch': conf.train.checkpoint.by_epoch,
                 'interval': conf.train.checkpoint.interval, 'max_checkpoint_num': conf.train.checkpoint.max_checkpoint_num,
                 'output_sub_dir': OUTPUT_DIR},
                {'type': 'TextLoggerHook', 'interval': conf.train.log_interval},
                {'type': 'IterTimerHook'},
            ],
        }
        if distributed.launched():
            cfg.train['hooks'].append({'type': distributed.HOOK_TYPE})
        cfg.evaluation = {'dataloader': {'batch_size_per_gpu': conf.run.batch_size,
                                         'workers_per_gpu': conf.run.num_workers}, 'metrics': []}
        return cfg
    return cfg_modify_fn


def build_trainer(conf: Conf, rows: List[dict], style_map, model_dir: str):
    from utils.captioning.preprocessor import OfaPreprocessorForStylishIC
    from utils.patches.checkpoints import use_atomic_checkpoints
    from utils.patches.hub_check import no_hub_check_for_local_model
    from utils.training.stages import STAGES

    preprocessor = {
        split: OfaPreprocessorForStylishIC(model_dir, mode=mode, style_map=style_map,
                                           model_cfg=conf.model.model_cfg, no_collate=True)
        for split, mode in (('train', 'train'), ('val', 'eval'))
    }
    if conf.train.image_cache:
        from utils.data.image_cache import ImageCache
        train = preprocessor['train'].preprocess
        images = [r['image'] for r in rows]
        if not distributed.is_main():  # rank 0 builds the cache; the others open it once it is complete
            distributed.barrier()
        cache = ImageCache.open_or_build(conf.train.image_cache, images, train.patch_image_size,
                                         workers=max(1, conf.run.num_workers))
        if distributed.is_main():
            distributed.barrier()
        train.use_image_cache(cache)
    stage = STAGES[conf.train.stage]
    dataset = stage.dataset(rows, preprocessor['train'])
    from utils.patches.train_step import TrainStepHook  # also registers distributed.HOOK_TYPE
    from utils.patches.console import modelscope_console
    from utils.training.progress import ProgressHook
    from utils.training.recipe_trainer import MicroBatchCollator, RecipeTrainer
    modelscope_console(conf.run.verbose)
    with no_hub_check_for_local_model(conf.model.is_local):
        trainer = RecipeTrainer(model=conf.model.model_name, model_revision=conf.model.model_revision,
                                cfg_modify_fn=make_cfg_modify_fn(conf), train_dataset=dataset,
                                preprocessor=preprocessor, work_dir=conf.run.work_dir, seed=conf.run.seed)
    use_atomic_checkpoints(trainer)
    if conf.train.accumulate > 1:
        trainer.train_data_collator = MicroBatchCollator(trainer.train_data_collator, conf.run.batch_size)
    if distributed.is_main():
        trainer.register_hook(ProgressHook(conf.train.log_interval, accumulate=conf.train.accumulate,
                                           batch_size=conf.run.batch_size))
    stage.install(trainer, conf, rows)
    frozen = install_recipe(trainer, conf, stage, style_map)
    trainer.register_hook(TrainStepHook(conf.run.precision, conf.train.accumulate,
                                        before_step=[frozen.mask_gradients] if frozen.rows is not None else [],
                                        after_step=[frozen.restore_rows] if frozen.rows is not None else []))
    return trainer


def install_recipe(trainer, conf: Conf, stage, style_map):
    """The stage's frozen parts (logged with the count of parameters that train), the EMA of the weights, the stage
    recorded in the checkpoints, SCST's fresh optimizer. Returns the :class:`~utils.training.freeze.Freeze`."""
    from utils.training.freeze import apply_freeze, style_token_ids
    from utils.training.recipe_trainer import StageHook

    model = trainer.unwrap_module(trainer.model)
    frozen = apply_freeze(model.model, stage.freeze(conf), style_token_ids(model.tokenizer, style_map),
                          trainer.optimizers[0])  # OFATrainer built it over every parameter; train() installs it
    logger.info('%s', frozen.describe())
    if conf.train.accumulate > 1:
        logger.info('accumulate %d: %d micro-batches of %d per optimizer step (effective batch %d%s); steps drive '
                    'the schedule, logs, checkpoints and eval_interval', conf.train.accumulate, conf.train.accumulate,
                    conf.run.batch_size, conf.run.batch_size * conf.train.accumulate,
                    f' x {distributed.world_size()} ranks' if distributed.launched() else '')
    if conf.train.ema is not None:
        from utils.training.ema import EmaHook
        trainer.register_hook(EmaHook(conf.train.ema))
    trainer.register_hook(StageHook(stage.name))
    trainer.fresh_optimizer = stage.name == 'scst' and conf.scst.fresh_optimizer
    return frozen
