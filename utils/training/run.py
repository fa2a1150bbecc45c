"""``finetune.py train``: build the trainer for the conf's stage, train, write the run summary."""
from __future__ import annotations

import logging
import os
from typing import List, Optional

from utils import distributed
from utils.conf import OUTPUT_DIR, Conf
from utils.training import trainer as assembly

logger = logging.getLogger('finetune')  # the name users see on finetune.py train's log lines


def train(conf: Conf, checkpoint: Optional[str], stamp: str, rows: List[dict], stats, style_map,
          val_rows: Optional[List[dict]] = None) -> dict:
    """Train the conf's stage on rows; with val_rows, validate and keep work_dir/output_best as it goes."""
    from utils.patches.checkpoints import trainer_state_loading
    from utils.runtime import unique_path, write_json_atomic
    from utils.training.validation import ValidationHook

    model_dir = assembly.model_dir_of(conf)
    trainer = assembly.build_trainer(conf, rows, style_map, model_dir)
    validation = None
    if val_rows and (conf.eval_interval or conf.eval_every_epoch):
        validation = ValidationHook(conf, val_rows, style_map, resuming=checkpoint is not None)
        trainer.register_hook(validation)
    try:
        with trainer_state_loading():
            trainer.train(checkpoint)
    finally:
        if validation is not None:
            validation.close()
        assembly.detach_file_logs(conf.work_dir)
    output = os.path.join(conf.work_dir, OUTPUT_DIR)
    summary = {'mode': 'train', 'time': stamp, 'checkpoint': checkpoint, 'output': output,
               'conf': conf.to_dict(), 'data': {'train': stats.to_dict()}, 'styles': len(style_map.tokens),
               'iterations': trainer.iter}
    if validation is not None and validation.best.value is not None:
        summary['best'] = {'metric': conf.best_metric, 'value': validation.best.value,
                           'iteration': validation.best.iteration, 'output': validation.best.dir}
    if distributed.launched():
        summary['world_size'] = distributed.world_size()
        if not distributed.is_main():
            return summary  # rank 0 writes the summary and reports
    logger.info('trained model: %s', output)
    if conf.demo:
        summary['demo'] = demo_report(conf, output)
    write_json_atomic(unique_path(conf.work_dir, 'train', stamp), summary)
    return summary


def demo_report(conf: Conf, output: str) -> dict:
    """Demo only: caption every held-out test image in every style; how often is the style followed?"""
    from utils.captioner import Captioner
    from utils.data import load_split
    from utils.demo_data import COLOURS, SHAPES, STYLES, content_correct, style_followed

    rows, _ = load_split(conf, 'test')
    images = sorted({r['image'] for r in rows})
    items = [{'image': img, 'style': s} for img in images for s in STYLES]
    captioner = Captioner(output, beam_size=conf.beam_size, max_len=conf.max_len,
                          no_repeat_ngram_size=conf.no_repeat_ngram_size, precision=conf.precision)
    caps = captioner.caption(items, batch_size=32)
    truth = {r['image']: r['text'] for r in rows}
    followed = content = 0
    for item, cap in zip(items, caps):
        followed += style_followed(item['style'], cap)
        words = truth[item['image']].split()  # every template ends "... {colour} {shape} ..."
        colour = next(w for w in words if w in COLOURS)
        shape = next(w for w in words if w in SHAPES)
        content += content_correct(colour, shape, cap)
    for item, cap in list(zip(items, caps))[:8]:
        logger.info('  %-10s %-28s -> %s', item['style'], os.path.basename(item['image']), cap)
    report = {'captions': len(items), 'style_followed': followed, 'content_correct': content}
    logger.info('demo: %d/%d held-out captions follow the requested style, %d/%d name the right colour '
                'and shape', followed, len(items), content, len(items))
    return report
