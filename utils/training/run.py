"""``finetune.py train``: build the trainer for the conf's stage, train, and return the run summary (the entry
point writes it to work_dir/train_{time}.json)."""
from __future__ import annotations

import logging
import os
from typing import List, Optional

from utils.core import distributed
from utils.core.layout import OUTPUT_DIR
from utils.core.conf import Conf
from utils.training import trainer as assembly

logger = logging.getLogger('finetune')  # the name users see on finetune.py train's log lines


def train(conf: Conf, checkpoint: Optional[str], stamp: str, rows: List[dict], stats, style_map,
          val_rows: Optional[List[dict]] = None) -> dict:
    """Train the conf's stage on rows; with val_rows, validate and keep work_dir/output_best as it goes.
    Returns the run summary (the resolved conf, data counts, iterations, the best validation)."""
    from utils.core.checkpoint_files import trainer_state_loading
    from utils.patches.console import detach_file_logs
    from utils.training.validation import ValidationHook

    model_dir = assembly.model_dir_of(conf)
    trainer = assembly.build_trainer(conf, rows, style_map, model_dir)
    tensorboard = None
    if conf.train.tensorboard and distributed.is_main():  # rank 0 writes the event files
        from utils.training.tensorboard import TensorboardHook, log_dir
        # one iteration is one optimizer step, accumulate included (recipe_trainer): points are per step
        tensorboard = TensorboardHook(log_dir(conf.run.work_dir, stamp), log_interval=conf.train.log_interval)
        trainer.register_hook(tensorboard)
    validation = None
    if val_rows and (conf.validation.eval_interval or conf.validation.eval_every_epoch):
        validation = ValidationHook(conf, val_rows, style_map, resuming=checkpoint is not None, tensorboard=tensorboard)
        trainer.register_hook(validation)
    try:
        with trainer_state_loading():
            trainer.train(checkpoint)
    finally:
        if validation is not None:
            validation.close()
        if tensorboard is not None:
            tensorboard.close()
        detach_file_logs(conf.run.work_dir)
    output = os.path.join(conf.run.work_dir, OUTPUT_DIR)
    summary = {'mode': 'train', 'time': stamp, 'checkpoint': checkpoint, 'output': output,
               'conf': conf.to_dict(), 'data': {'train': stats.to_dict()}, 'styles': len(style_map.tokens),
               'iterations': trainer.iter}
    if tensorboard is not None:
        summary['tensorboard'] = tensorboard.directory
    if validation is not None and validation.best.value is not None:
        summary['best'] = {'metric': conf.validation.best_metric, 'value': validation.best.value,
                           'iteration': validation.best.iteration, 'output': validation.best.dir}
    if distributed.launched():
        summary['world_size'] = distributed.world_size()
        if not distributed.is_main():
            return summary  # rank 0 reports
    logger.info('trained model: %s', output)
    return summary
