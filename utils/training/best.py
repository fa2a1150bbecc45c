"""``work_dir/output_best``: the model of the best validation so far, and ``work_dir/best.json``: its score.

``output_best/`` is a complete ModelScope model dir (configuration.json, config.json, weights, vocab,
style_map.json) that ``Model.from_pretrained``, ``pre_inference.py -m``, ``finetune.py eval -m`` and the
backup take as they take ``output/``. It is written whole in a sibling dir and swapped in with one
rename (``renameat2(RENAME_EXCHANGE)`` where the kernel has it), so a reader or a kill never meets half a
model. ``output_best/best.json`` (``{"metric", "value", "iteration", "epoch"}``) goes in with the weights it
describes; a resumed run (``-p``) reads it back, so a later, worse validation never replaces a better model.

ModelScope's own ``BestCkptSaverHook`` is not used: it needs an ``EvaluationHook`` over ModelScope metrics
(none fit captioning), parses the value back out of file names, and users report it leaving ``output_best``
without weights (ModelScope issue 699).
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
from typing import Optional

from utils.core.layout import BEST_DIR
from utils.core.io import write_json_atomic

logger = logging.getLogger(__name__)
BEST_FILE = 'best.json'  # inside output_best/
_RENAME_EXCHANGE = 2


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one step (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def swap_in(new_dir: str, dest: str) -> None:
    """Make new_dir's content appear at dest in one rename; the old dest is removed afterwards."""
    if os.path.isdir(dest) and _exchange(new_dir, dest):
        shutil.rmtree(new_dir)  # now holds the old content
        return
    old = dest + '.old'
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(dest):
        os.replace(dest, old)
    os.replace(new_dir, dest)
    shutil.rmtree(old, ignore_errors=True)


def recover(dest: str) -> None:
    """After a kill between the two renames of the fallback path: put the old model back."""
    old = dest + '.old'
    if not os.path.isdir(dest) and os.path.isdir(old):
        os.replace(old, dest)


class BestModel:
    """The best value of ``metric`` so far, and the model dir that scored it."""

    def __init__(self, work_dir: str, metric: str):
        self.work_dir, self.metric = work_dir, metric
        self.dir = os.path.join(work_dir, BEST_DIR)
        self.file = os.path.join(self.dir, BEST_FILE)
        self.value: Optional[float] = None
        self.iteration: Optional[int] = None

    def load(self) -> None:
        """Resuming: the best so far, if a best.json of the same metric and its model dir are there."""
        recover(self.dir)
        try:
            with open(self.file, encoding='utf-8') as f:
                saved = json.load(f)
        except (OSError, json.JSONDecodeError):
            return
        if saved.get('metric') != self.metric:
            logger.warning('%s is for %s, not best_metric %s: starting a new best', self.file, saved.get('metric'),
                           self.metric)
            return
        self.value, self.iteration = saved['value'], saved['iteration']
        logger.info('best %s so far: %.4f at iteration %d (%s)', self.metric, self.value, self.iteration, self.dir)

    def forget(self) -> None:
        """A fresh run: nothing is best yet (an earlier run's output_best stays until this run has one)."""
        recover(self.dir)
        self.value = self.iteration = None

    def offer(self, value: float, iteration: int, epoch: int, trainer) -> bool:
        """Keep the trainer's current model if ``value`` beats the best so far; True if it did."""
        if self.value is not None and not value > self.value:
            return False
        from utils.patches.checkpoints import save_model_dir
        tmp = self.dir + '.tmp'
        shutil.rmtree(tmp, ignore_errors=True)
        save_model_dir(trainer, tmp)
        write_json_atomic(os.path.join(tmp, BEST_FILE),
                          {'metric': self.metric, 'value': value, 'iteration': iteration, 'epoch': epoch})
        swap_in(tmp, self.dir)
        self.value, self.iteration = value, iteration
        return True
