"""Training data-path benchmark: finetune.py's trainer (stylish preprocessor; with and without the image
cache; with dataloader workers) vs the stock OFATrainer with the stock OfaPreprocessor, on the same tiny
model, the same realistic JPEGs (500x375, as YFCC images typically are) and the same training settings.

    python3 -m bench.bench_train [--images 256] [--batch 16] [--epochs 2] [--size 64] [--workers 2]

Prints training samples/s of each path (wall time of trainer.train(), after an untimed warm-up run) and
the ratio to the stock path. Nothing is downloaded: the model is a tiny random OFA built locally.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def realistic_images(folder: str, n: int):
    from PIL import Image, ImageDraw
    from utils.demo.data import COLOURS, SHAPES, STYLES, caption
    rng = random.Random(0)
    os.makedirs(folder, exist_ok=True)
    rows = []
    for i in range(n):
        img = Image.effect_noise((500, 375), 60).convert('RGB')
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        ImageDraw.Draw(img).ellipse((150, 80, 350, 280), fill=COLOURS[colour])
        img.save(f'{folder}/img{i:05d}.jpg', quality=90)
        style = rng.choice(list(STYLES))
        rows.append({'personality': style, 'comment': caption(style, colour, shape), 'image_hash': f'img{i:05d}'})
    return rows


def stock_trainer(conf, rows):
    """The stock path: OFATrainer with ModelScope's own OfaPreprocessor wrapping a plain dataset of
    {image, text} rows, torch's default AdamW; conf's training settings otherwise (finetune.py's)."""
    import torch
    from modelscope.trainers.multi_modal.ofa.ofa_trainer import OFATrainer

    from utils.training import trainer as assembly
    from utils.patches.hub_check import no_hub_check_for_local_model

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return {'image': rows[i]['image'], 'text': rows[i]['text']}

    def stock_modify(cfg):
        cfg = assembly.make_cfg_modify_fn(conf)(cfg)
        cfg.train.optimizer.pop('fused')  # the stock optimizer: torch's default AdamW implementation
        cfg.dataset = {'column_map': {'text': 'text'}}
        return cfg
    with no_hub_check_for_local_model(True):
        return OFATrainer(model=conf.model.model_name, cfg_modify_fn=stock_modify, work_dir=conf.run.work_dir,
                          train_dataset=Rows(), seed=42)


def timed_train(trainer) -> float:
    t = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--images', type=int, default=256)
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--epochs', type=int, default=2)
    p.add_argument('--size', type=int, default=64)
    p.add_argument('--workers', type=int, default=2)
    args = p.parse_args(argv)

    from utils.core.logs import setup_logging
    setup_logging()
    import torch

    from utils.training import trainer as assembly
    from utils.core.conf import conf_from_dict
    from utils.core.conf_checks import validate
    from utils.data.rows import read_split
    from utils.demo.data import COLOURS, SHAPES, STYLES, caption
    from utils.data.styles import StyleMap
    from utils.demo.tiny_model import build_tiny_ofa

    root = tempfile.mkdtemp(prefix='bench_train_')
    rows = realistic_images(f'{root}/images', args.images)
    os.makedirs(f'{root}/data')
    for split in ('train', 'val', 'test'):
        with open(f'{root}/data/{split}.json', 'w') as f:
            json.dump(rows, f)
    texts = [caption(st, c, s) for st in STYLES for c in COLOURS for s in SHAPES]
    model_dir = build_tiny_ofa(f'{root}/model', texts, image_size=args.size)

    def conf(name, **extra):
        return validate(conf_from_dict({
            'model_name': model_dir, 'tokenize_style': True, 'img_addr': f'{root}/images',
            'dataset_path': f'{root}/data', 'file_attr': '.jpg', 'train_json': 'train.json', 'val_json': 'val.json',
            'test_json': 'test.json', 'work_dir': f'{root}/work_{name}', 'batch_size': args.batch,
            'max_epochs': args.epochs, 'log_interval': 1000, 'patch_image_size': args.size,
            'max_image_size': args.size, 'checkpoint': {'by_epoch': True, 'interval': 1000}, **extra}))

    base = conf('stock')
    train_rows, _ = read_split(base.data.split_path('train'), base.data.img_addr, base.data.file_attr, 'train')
    style_map = StyleMap.build(list(STYLES), True, base.model.prompt_template)
    results = {}

    # warm-up: the first training in a process pays one-off costs (thread pools, allocator); untimed
    timed_train(assembly.build_trainer(conf('warmup', max_epochs=1), train_rows, style_map, model_dir))
    results['stock OFATrainer + OfaPreprocessor, workers 0'] = timed_train(stock_trainer(base, train_rows))

    for name, extra in [('finetune.py, workers 0', {}),
                        ('finetune.py + image cache, workers 0', {'image_cache': f'{root}/cache'}),
                        (f'finetune.py + image cache, workers {args.workers}',
                         {'image_cache': f'{root}/cache', 'num_workers': args.workers})]:
        c = conf(name.replace(' ', '_').replace(',', '').replace('+', ''), **extra)
        trainer = assembly.build_trainer(c, train_rows, style_map, model_dir)  # builds the cache if asked
        results[name] = timed_train(trainer)

    samples = args.images * args.epochs
    stock_rate = samples / results['stock OFATrainer + OfaPreprocessor, workers 0']
    print(f'machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, '
          f'threads {torch.get_num_threads()}')
    print(f'tiny OFA at {args.size}px, {args.images} JPEGs of 500x375, batch {args.batch}, {args.epochs} epochs '
          '(the image cache is built before timing starts)')
    print(f'{"path":48s} {"samples/s":>10s} {"vs stock":>9s}')
    for name, seconds in results.items():
        rate = samples / seconds
        print(f'{name:48s} {rate:10.1f} {rate / stock_rate:8.2f}x')
    return 0


if __name__ == '__main__':
    sys.exit(main())
