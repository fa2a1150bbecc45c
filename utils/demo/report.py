"""The demo's own check: caption every held-out test image in every style, and count how often the caption
follows the style and names the image's colour and shape (the demo's captions are templates)."""
from __future__ import annotations

import logging
import os

from utils.core.conf import Conf

logger = logging.getLogger('finetune')  # the name users see on finetune.py train's log lines


def demo_report(conf: Conf, output: str) -> dict:
    """Demo only: caption every held-out test image in every style; how often is the style followed?"""
    from utils.captioning.captioner import Captioner
    from utils.data.rows import load_split
    from utils.demo.data import COLOURS, SHAPES, STYLES, content_correct, style_followed

    rows, _ = load_split(conf, 'test')
    images = sorted({r['image'] for r in rows})
    items = [{'image': img, 'style': s} for img in images for s in STYLES]
    captioner = Captioner(output, conf.generation, precision=conf.run.precision)
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
