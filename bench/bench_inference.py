"""Inference benchmark: pre_inference.py's batched Captioner vs ModelScope's stock image-captioning
pipeline, called image by image and with the pipeline's own batch_size. Same model, images and
generation settings (beam 5, max_len 16, no-repeat 3), warm, in one run on one machine.

    python3 -m bench.bench_inference [--images 64] [--batch 16] [--size 64] [--device cpu|cuda]

Prints seconds per caption of each path (best of --repeat warm passes) and the ratios. The model is a
tiny randomly initialised OFA (d_model 64, 2+2 layers, ResNet-18-style stem) built locally: nothing is
downloaded.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_assets(root: str, n_images: int, size: int):
    from utils.core.conf import DEFAULT_PROMPT
    from utils.demo.data import COLOURS, SHAPES, STYLES, build_demo_data, caption
    from utils.data.styles import StyleMap
    from utils.demo.tiny_model import build_tiny_ofa

    build_demo_data(f'{root}/data', f'{root}/images', sizes={'test': n_images})
    texts = [caption(st, c, s) for st in STYLES for c in COLOURS for s in SHAPES]
    model_dir = build_tiny_ofa(f'{root}/model', texts, image_size=size)
    StyleMap.build(list(STYLES), True, DEFAULT_PROMPT).save(model_dir)
    images = [f'{root}/images/test{i:04d}.jpg' for i in range(n_images)]
    return model_dir, images, list(STYLES)


def timed(fn, repeat: int) -> float:
    """Best of ``repeat`` timed passes, after one untimed warm-up pass."""
    fn()
    best = float('inf')
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--images', type=int, default=64)
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--size', type=int, default=64, help='patch_image_size of the tiny model')
    p.add_argument('--device', default=None)
    p.add_argument('--repeat', type=int, default=3, help='timed passes per path (the best is kept)')
    args = p.parse_args(argv)

    from utils.core.device import pick_device
    from utils.core.logs import setup_logging
    setup_logging()
    import torch
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks

    from utils.captioning.captioner import Captioner
    from utils.core.conf import GenerationConf

    with tempfile.TemporaryDirectory() as root:
        model_dir, images, styles = build_assets(root, args.images, args.size)
        device = pick_device(args.device)
        pipe = pipeline(Tasks.image_captioning, model=model_dir, device='gpu' if device == 'cuda' else 'cpu')
        captioner = Captioner(model_dir, GenerationConf(beam_size=5, max_len=16, no_repeat_ngram_size=3), device=device)
        items = [{'image': img, 'style': styles[i % len(styles)]} for i, img in enumerate(images)]

        n = len(images)
        per_image = timed(lambda: [pipe(img) for img in images], args.repeat) / n
        stock_batched = timed(lambda: pipe(images, batch_size=args.batch), args.repeat) / n
        ours = timed(lambda: captioner.caption(items, batch_size=args.batch, progress=False), args.repeat) / n

    print(f'machine: {platform.node()} {platform.processor() or platform.machine()}, '
          f'{os.cpu_count()} cpus, torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}')
    print(f'tiny OFA, {n} images at {args.size}px, beam 5, max_len 16, no-repeat 3, batch {args.batch}')
    print(f'{"path":40s} {"s/caption":>10s} {"captions/s":>11s}')
    for name, t in [('stock pipeline, image by image', per_image),
                    (f'stock pipeline, batch_size={args.batch}', stock_batched),
                    (f'pre_inference Captioner, batch {args.batch}', ours)]:
        print(f'{name:40s} {t:10.4f} {1 / t:11.1f}')
    print(f'ratio vs stock image by image: {per_image / ours:.2f}x; vs stock batched: {stock_batched / ours:.2f}x')
    return 0


if __name__ == '__main__':
    sys.exit(main())
