"""Training stages: two configurations of one trainer path (:func:`utils.training.trainer.build_trainer`).

A stage says what the train dataset yields and which criterion the trainer runs; trainer assembly,
checkpoints, validation and the best checkpoint are the same for every stage.

* ``ce``: cross-entropy on the references (ModelScope's label-smoothed criterion, as OFATrainer builds it, told
  the optimizer steps done for ``drop_worst_after``: :func:`utils.training.criteria.cross_entropy`); the parts
  ``freeze`` names are frozen.
* ``scst``: self-critical sequence training on a CIDEr-D reward (:class:`utils.training.criteria.ScstCriterion`),
  started from a model dir this toolkit trained with ``ce`` (``model_name``: its ``output/`` or
  ``output_best/``). The samples carry their row's index (``id``, which ModelScope's OFA collate passes
  through as ``batch['id']``), by which the criterion finds the train references of the sample's image and style.
  As OFA's stage 2 by default: dropout off (``scst.dropout``), the embeddings frozen beside ``freeze``
  (``scst.freeze``; the style rows train), a fresh optimizer for a ``-p`` CE checkpoint (``scst.fresh_optimizer``,
  :mod:`utils.training.recipe_trainer`).
"""
from __future__ import annotations

import logging
from typing import Dict, List

from utils.data.dataset import StylishCaptionDataset

logger = logging.getLogger(__name__)


class Stage:
    name = ''

    def dataset(self, rows: List[dict], preprocessor) -> StylishCaptionDataset:
        return StylishCaptionDataset(rows, preprocessor)

    def install(self, trainer, conf, rows: List[dict]) -> None:
        """Adapt a built trainer to the stage (its criterion)."""

    def freeze(self, conf) -> List[str]:
        """The parts frozen in this stage."""
        return list(conf.train.freeze)


class CrossEntropy(Stage):
    name = 'ce'

    def install(self, trainer, conf, rows):
        from utils.training.criteria import cross_entropy
        trainer.criterion = cross_entropy(trainer.criterion.args)


class Scst(Stage):
    name = 'scst'

    def dataset(self, rows, preprocessor):
        return StylishCaptionDataset(rows, preprocessor, with_ids=True)

    def freeze(self, conf):
        return list(dict.fromkeys([*conf.train.freeze, *conf.scst.freeze]))

    def install(self, trainer, conf, rows):
        from utils.patches.generation import speed_up
        from utils.training.cider import CiderD
        from utils.training.criteria import ScstCriterion

        groups: Dict[tuple, List[str]] = {}
        for row in rows:  # the references of each (image, style) pair of the train split
            refs = groups.setdefault((row['image'], row['style']), [])
            refs.extend(r for r in row['references'] if r not in refs)
        cider = CiderD.cached(conf.run.work_dir, list(groups.values()))
        model = trainer.unwrap_module(trainer.model)
        criterion = ScstCriterion(conf, model.tokenizer, [groups[(r['image'], r['style'])] for r in rows], cider)
        speed_up(model, criterion.generator, mask_image_tokens=conf.generation.mask_image_tokens)  # candidates: the decoder's key/value cache, the vectorised blocker
        criterion.log_buffer = trainer.log_buffer
        trainer.criterion = criterion
        logger.info('SCST: %d candidates per sample (%s), CIDEr-D reward against %d reference sets', conf.scst.candidates,
                    conf.scst.search, len(groups))
        if not conf.scst.dropout:
            from utils.training.freeze import dropout_off
            logger.info('SCST: dropout off (%d dropout layers of the model set to 0; scst.dropout)', dropout_off(model))


STAGES = {stage.name: stage for stage in (CrossEntropy(), Scst())}
