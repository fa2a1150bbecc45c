"""The offline demo's data set, generated deterministically in Personality-Captions format.

Each image shows one coloured shape on a noisy background; each style has its own phrasing. A caption
is therefore fully determined by what the image shows and by the requested style, so a model that
learned the task captions held-out images in the requested style, naming the right colour and shape.
"""
from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

COLOURS = {'red': (220, 30, 30), 'green': (30, 170, 40), 'blue': (30, 60, 220), 'yellow': (235, 210, 20)}
SHAPES = ('circle', 'cross', 'triangle')  # outlines that differ even at the model's 1/16 patch grid
# style -> (template used for "comment", template used for "additional_comments")
STYLES = {
    'Happy': ('what a lovely {c} {s}', 'such a lovely {c} {s}'),
    'Sarcastic': ('oh great another {c} {s} how original', 'wow another {c} {s} how original'),
    'Romantic': ('this {c} {s} reminds me of you my love', 'the {c} {s} reminds me of you my love'),
    'Anxious': ('i am so worried about that {c} {s}', 'i am worried about this {c} {s}'),
}
SPLITS = {'train': 320, 'val': 16, 'test': 32}  # images per split
STYLES_PER_TRAIN_IMAGE = 2
IMAGE_SIZE = 96


def caption(style: str, colour: str, shape: str, alt: bool = False) -> str:
    return STYLES[style][int(alt)].format(c=colour, s=shape)


def draw_shape(rng: random.Random, fill: tuple, shape: str, *, size: int = IMAGE_SIZE, background=(150, 255),
               clutter: int = 30, clutter_range=(100, 255), radius=(0.32, 0.42), jitter: int = 16) -> Image.Image:
    """One shape (circle, square, cross, triangle) of colour ``fill`` on a noisy background of grey levels in
    ``background``, with ``clutter`` random points, a radius drawn in ``radius`` x size and the centre moved by up
    to size // ``jitter``. The defaults are the demo's."""
    img = Image.new('RGB', (size, size), tuple(rng.randint(*background) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(clutter):  # background clutter, so the model has to look at the shape
        x, y = rng.randrange(size), rng.randrange(size)
        draw.point((x, y), fill=tuple(rng.randint(*clutter_range) for _ in range(3)))
    # big, roughly centred shapes: the outline must survive the model's coarse (1/16) image patches
    r = rng.randint(int(size * radius[0]), int(size * radius[1]))
    jitter = size // jitter
    cx, cy = size // 2 + rng.randint(-jitter, jitter), size // 2 + rng.randint(-jitter, jitter)
    if shape == 'circle':
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == 'square':
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == 'cross':
        w = r // 3
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def build_demo_data(dataset_path: str, img_addr: str, seed: int = 0, sizes: dict = SPLITS) -> None:
    """Write images to img_addr and {train,val,test}.json + personalities.txt to dataset_path."""
    rng = random.Random(seed)
    ds, imgs = Path(dataset_path), Path(img_addr)
    ds.mkdir(parents=True, exist_ok=True)
    imgs.mkdir(parents=True, exist_ok=True)
    styles = list(STYLES)
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    for split, n_images in sizes.items():
        rows = []
        for i in range(n_images):
            colour, shape = combos[i % len(combos)]
            image_hash = f'{split}{i:04d}'
            draw_shape(rng, COLOURS[colour], shape).save(imgs / f'{image_hash}.jpg', quality=92)
            chosen = rng.sample(styles, STYLES_PER_TRAIN_IMAGE) if split == 'train' else [styles[i % len(styles)]]
            for style in chosen:
                row = {'personality': style, 'comment': caption(style, colour, shape), 'image_hash': image_hash}
                if split != 'train':
                    row['additional_comments'] = [caption(style, colour, shape, alt=True)]
                rows.append(row)
        (ds / f'{split}.json').write_text(json.dumps(rows, indent=1), encoding='utf-8')
    (ds / 'personalities.txt').write_text('\n'.join(styles) + '\n', encoding='utf-8')
    logger.info('demo data set written: %s (images in %s)', ds.resolve(), imgs.resolve())


def style_followed(style: str, text: str) -> bool:
    """Does a caption use the phrasing of `style` (either of its templates), whatever the shape?"""
    words = text.lower().split()
    for template in STYLES[style]:
        pattern = template.split()
        if len(words) == len(pattern) and all(p in ('{c}', '{s}') or p == w for p, w in zip(pattern, words)):
            return True
    return False


def content_correct(colour: str, shape: str, text: str) -> bool:
    words = text.lower().split()
    return colour in words and shape in words


def ensure_demo_assets(model_dir: str, dataset_path: str, img_addr: str, image_size: int = 64) -> None:
    """Build the demo data set and tiny model where they are missing (deterministic, offline). The log names
    the absolute folders: a conf's relative paths are read from the current directory, so the demo conf run
    from another directory builds a second demo there."""
    from utils.demo.tiny_model import build_tiny_ofa

    relative = [p for p in (model_dir, dataset_path, img_addr) if not os.path.isabs(p)]
    where = f" (the conf's relative paths are read from the current directory, {os.getcwd()})" if relative else ''
    if not all((Path(dataset_path) / f'{s}.json').is_file() for s in SPLITS):
        logger.info('demo: building its data set in %s, images in %s%s', os.path.abspath(dataset_path),
                    os.path.abspath(img_addr), where)
        build_demo_data(dataset_path, img_addr)
    if not (Path(model_dir) / 'configuration.json').is_file():
        logger.info('demo: building its tiny model in %s%s', os.path.abspath(model_dir), where)
        texts = [caption(st, c, s, alt) for st in STYLES for c in COLOURS for s in SHAPES for alt in (False, True)]
        build_tiny_ofa(model_dir, texts, image_size=image_size)
