"""Validation during training: caption the val split with the model being trained, score it, keep the best.

Every ``eval_interval`` iterations and at the end of every epoch (``eval_every_epoch``), :class:`ValidationHook`
captions the val rows with the toolkit's batched generator (:class:`utils.captioning.captioner.Captioner` wrapped around
the trainer's live model: the conf's beam settings and precision, nothing reloaded from disk), scores the
captions with pycocoevalcap (:func:`utils.evaluation.scoring.score`; SPICE only with ``val_spice``), logs the figures and
appends one line to ``work_dir/val_metrics.jsonl``::

    {"iteration": 120, "epoch": 3, "metrics": {"CIDEr": .., "Bleu_4": .., "METEOR": .., "ROUGE_L": .., ...,
     "style_accuracy_top1": .., "style_accuracy_top5": ..}, "seconds": 4.2, "best": true,
     "per_style": {"Happy": {"rows": 12, "CIDEr_mean_of_captions": .., "style_accuracy_top1": .., ...}, ...},
     "per_style_note": "...", "style_confusions": [{"target": "Happy", "predicted": "Sweet", "count": 3, ...}]}

``iteration`` counts the training iterations done, ``epoch`` is the (1-based) epoch the validation ran in,
``seconds`` the time the validation took. When ``best_metric`` improves, :class:`~utils.training.best.BestModel`
replaces ``work_dir/output_best``. The style figures come from the style classifier of the train split (the one
``finetune.py eval`` uses, :mod:`utils.evaluation.style_classifier`, trained once and cached in work_dir); the
per-style ones are :mod:`utils.evaluation.per_style`'s. With TensorBoard on, the ``metrics`` also go to
``val/{name}`` (:mod:`utils.training.tensorboard`).

Under torchrun each rank captions its own shard of the val rows (rows ``rank::world_size``); rank 0 gathers
the captions back into the original order, scores them and writes; the other ranks wait for it.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import List, Optional

from modelscope.trainers.hooks.hook import Hook
from modelscope.trainers.hooks.priority import Priority

from utils.core import distributed
from utils.core.conf import VAL_METRICS
from utils.core.layout import VAL_METRICS_FILE
from utils.evaluation.curves import draw_curves  # never raises: a plot never stops a run

logger = logging.getLogger(__name__)
LOGGED = ('CIDEr', 'Bleu_4', 'METEOR', 'ROUGE_L', 'style_accuracy_top1')  # the figures of the log line


class LiveCaptioner:
    """The toolkit's batched generator around the model a trainer is training (its ``OfaForAllTasks``).

    The first use installs a generator with the conf's beam settings (and the KV-cache repairs of
    :mod:`utils.patches.generation`) on the live model; each call captions in eval mode and puts the model back
    in the mode it was in."""

    def __init__(self, conf, style_map):
        self.conf, self.style_map = conf, style_map
        self.captioner = None

    def caption(self, trainer, items: List[dict]) -> List[str]:
        from utils.captioning.captioner import Captioner

        model = trainer.unwrap_module(trainer.model)
        was_training = model.training  # (building the Captioner puts the model in eval mode)
        if self.captioner is None or self.captioner.model is not model:
            self.captioner = Captioner(
                model, self.conf.generation, precision=self.conf.run.precision,
                device=str(next(model.parameters()).device), style_map=self.style_map,
                model_cfg=self.conf.model.model_cfg)
        try:
            return self.captioner.caption(items, batch_size=self.conf.run.batch_size, progress=distributed.is_main())
        finally:
            model.train(was_training)


def gather_in_order(mine: List[str], n: int) -> Optional[List[str]]:
    """Rank 0: every rank's captions of its shard (rows ``rank::world``), back in row order; other ranks: None."""
    if not distributed.launched() or distributed.world_size() == 1:
        return mine
    import torch.distributed as dist
    world = distributed.world_size()
    shards = [None] * world if distributed.is_main() else None
    dist.gather_object(mine, shards, dst=0)
    if not distributed.is_main():
        return None
    captions: List[Optional[str]] = [None] * n
    for rank, shard in enumerate(shards):
        captions[rank::world] = shard
    return captions


def shard(rows: List[dict]) -> List[dict]:
    """This rank's share of the val rows under torchrun (all of them otherwise)."""
    if not distributed.launched():
        return rows
    return rows[distributed.rank()::distributed.world_size()]


class ValidationHook(Hook):
    """Validates at the conf's interval and epoch ends, writes ``val_metrics.jsonl`` and keeps ``output_best``.

    Runs after ModelScope's own hooks of an iteration (checkpointing, logging), so a checkpoint saved at
    the same iteration is never delayed by validation."""

    PRIORITY = Priority.LOWEST

    def __init__(self, conf, rows: List[dict], style_map, resuming: bool, tensorboard=None):
        from utils.training.best import BestModel

        self.conf, self.rows = conf, rows
        self.captioner = LiveCaptioner(conf, style_map)
        self.best = BestModel(conf.run.work_dir, conf.validation.best_metric)
        self.resuming = resuming
        self.last_validated = None  # iteration of the last validation (an epoch end may coincide with the interval)
        self.path = os.path.join(conf.run.work_dir, VAL_METRICS_FILE)
        self.meteor = None  # rank 0's METEOR process, kept for all the validations of the run
        self.tensorboard = tensorboard  # a utils.training.tensorboard.TensorboardHook (rank 0), or None
        self.style_judge = None  # rank 0: (classifier or None, status, the val references' verdicts), made once

    def before_run(self, trainer):
        if not distributed.is_main():
            return
        if self.resuming:
            self.best.load()
        else:  # a fresh run: an earlier run's figures and best model are not this run's
            self.best.forget()
            if os.path.isfile(self.path):
                aside = os.path.join(self.conf.run.work_dir, f'val_metrics_{time.strftime("%Y%m%d_%H%M%S")}.jsonl')
                os.replace(self.path, aside)
                logger.info('an earlier run\'s %s moved to %s', VAL_METRICS_FILE, aside)

    def after_train_iter(self, trainer):
        done = trainer.iter + 1  # trainer.iter counts from 0 and is incremented after this hook
        if self.conf.validation.eval_interval and done % self.conf.validation.eval_interval == 0:
            self.validate(trainer, done, trainer.epoch + 1)

    def after_train_epoch(self, trainer):
        if self.conf.validation.eval_every_epoch:
            self.validate(trainer, trainer.iter, trainer.epoch + 1)

    def after_run(self, trainer):
        self.close()
        if distributed.is_main():
            draw_curves(self.conf.run.work_dir)

    def close(self) -> None:
        if self.meteor is not None:
            from utils.evaluation.scoring import stop_meteor
            stop_meteor(self.meteor)
            self.meteor = None

    def validate(self, trainer, iteration: int, epoch: int) -> Optional[dict]:
        """Caption (each rank its shard), score on rank 0, record; returns rank 0's record."""
        if iteration == self.last_validated:
            return None
        self.last_validated = iteration
        start = time.perf_counter()
        mine = shard(self.rows)
        from utils.training.ema import averaged_weights  # ema: the averaged weights are validated and kept as best
        with averaged_weights(trainer):
            captions = self.captioner.caption(trainer, [{'style': r['style'], 'image': r['image']} for r in mine])
        captions = gather_in_order(captions, len(self.rows))
        if captions is None:  # not rank 0: rank 0 scores and writes
            distributed.barrier()
            return None
        from utils.evaluation.scoring import score, start_meteor
        if self.meteor is None:
            self.meteor = start_meteor()
        scores = score(captions, [r['references'] for r in self.rows], spice=self.conf.validation.val_spice,
                       meteor=self.meteor, cider_per_caption=True)
        metrics = {k: v for k, v in scores.items() if k in VAL_METRICS and v is not None}
        styles = self.style_figures(captions, scores['CIDEr_per_caption'])
        accuracy = {k: styles.pop(k) for k in ('style_accuracy_top1', 'style_accuracy_top5')}
        metrics.update({k: v for k, v in accuracy.items() if v is not None})
        with averaged_weights(trainer):
            improved = self.best.offer(metrics[self.conf.validation.best_metric], iteration, epoch, trainer)
        record = {'iteration': iteration, 'epoch': epoch, 'metrics': metrics,
                  'seconds': round(time.perf_counter() - start, 3), 'n_samples': len(self.rows),
                  'best': improved, **styles}
        if self.tensorboard is not None:
            self.tensorboard.add_validation(metrics)
        with open(self.path, 'a', encoding='utf-8') as f:
            f.write(json.dumps(record) + '\n')
        logger.info('validation at iteration %d (epoch %d, %d val rows, %.1f s): %s%s', iteration, epoch,
                    len(self.rows), record['seconds'],
                    ', '.join(f'{k} {100 * metrics[k]:.1f}' for k in LOGGED if k in metrics),
                    f'; new best {self.conf.validation.best_metric} -> output_best' if improved else
                    f'; best {self.conf.validation.best_metric} {100 * self.best.value:.1f} at iteration {self.best.iteration}')
        for cap, row in list(zip(captions, self.rows))[:3]:
            logger.info('  %-12s -> %s', row['style'], cap)
        if len(record['per_style']) > 1:
            from utils.evaluation.table import weakest_styles_text
            logger.info('  styles learnt least: %s', weakest_styles_text(record['per_style']))
        draw_curves(self.conf.run.work_dir)
        distributed.barrier()
        return record

    def style_figures(self, captions: List[str], cider: List[float]) -> dict:
        """Rank 0: the style accuracy of the captions and the per-style figures (``per_style``, ``per_style_note``,
        ``style_confusions``). The classifier and its verdicts on the val references are made at the first
        validation; when it cannot be had, the accuracy figures are None and the status says why."""
        from utils.evaluation.per_style import per_style_figures
        from utils.evaluation.style_classifier import classifier_for_conf, judge, style_figures
        styles = [r['style'] for r in self.rows]
        refs = [r['references'] for r in self.rows]
        if self.style_judge is None:
            try:
                clf, status = classifier_for_conf(self.conf)
            except Exception as exc:  # noqa: BLE001 - the style figures must never stop a run
                clf, status = None, f'style accuracy unavailable: {type(exc).__name__}: {exc}'
            if clf is None:
                logger.warning('validation: %s', status)
            self.style_judge = (clf, status, None)
        clf, status, ref_hits = self.style_judge
        verdicts = judge(clf, styles, captions, refs, ref_hits) if clf is not None else None
        if verdicts is not None:
            self.style_judge = (clf, status, verdicts[1])
        figures, _ = style_figures(clf, styles, captions, refs, status, verdicts=verdicts)
        out = {k: figures[k] for k in ('style_accuracy_top1', 'style_accuracy_top5')}
        out.update(per_style_figures(styles, cider, *(verdicts if verdicts is not None else (None, None))))
        if clf is None:
            out['style_status'] = status
        return out

