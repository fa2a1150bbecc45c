"""GPU benchmark: OFA-tiny and OFA-base sized models (random weights, real shapes and vocabulary size),
training samples/s and peak memory per precision vs the stock OFATrainer, the projected time of one
Personality-Captions epoch, achieved TFLOP/s, and captioning captions/s vs the stock batched pipeline.

    python3 -m bench.bench_gpu [--sizes tiny,base] [--precisions fp32,bf16] [--batch 64] [--steps 30]

Sizes: tiny = d_model 256, 4+4 layers, 4 heads, ResNet-50 stem, 256 px; base = 768, 6+6, 12 heads,
ResNet-101 stem, 384 px; both with OFA's vocabulary size (50265 + 8192 + 1000). Training data are
synthetic 500x375 JPEGs; finetune.py's paths use the image cache and --workers dataloader workers, the
stock path OFATrainer + ModelScope's OfaPreprocessor in fp32 with the same workers. Samples/s are timed
over --steps iterations after --warmup iterations (CUDA synchronised). FLOPs are counted once per
configuration with torch's FlopCounterMode over one training iteration (forward + backward).

Runs on a CPU too (for a smoke test: --sizes tiny --batch 2 --steps 2 --warmup 1 --caption_images 4 --caption_batch 2
--workers 0); the
figures that matter come from a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EPOCH_SAMPLES = 186_858  # Personality-Captions train split
SIZES = {
    'tiny': dict(d_model=256, layers=4, heads=4, resnet_type='resnet50', image_size=256),
    'base': dict(d_model=768, layers=6, heads=12, resnet_type='resnet101', image_size=384),
}


def sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timing_hook(warmup: int, count_flops: bool):
    """A ModelScope hook: wall time of the iterations after ``warmup``, and the FLOPs of one iteration."""
    from modelscope.trainers.hooks.hook import Hook
    from modelscope.trainers.hooks.priority import Priority

    class Timing(Hook):
        PRIORITY = Priority.LOWEST

        def __init__(self):
            self.iters, self.start, self.end, self.flops, self._counter = 0, None, None, None, None

        def before_train_iter(self, trainer):
            if self.iters == warmup:
                sync()
                self.start = time.perf_counter()
            if count_flops and self.iters == 0:
                from torch.utils.flop_counter import FlopCounterMode
                self._counter = FlopCounterMode(display=False)
                self._counter.__enter__()

        def after_train_iter(self, trainer):  # LOWEST: after OptimizerHook's backward and step
            if self._counter is not None:
                self._counter.__exit__(None, None, None)
                self.flops, self._counter = self._counter.get_total_flops(), None
            self.iters += 1
            sync()
            self.end = time.perf_counter()

    return Timing()


def measure(trainer, batch: int, warmup: int, count_flops: bool = False) -> dict:
    import torch
    hook = timing_hook(warmup, count_flops)
    trainer.register_hook(hook)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    timed = hook.iters - warmup
    rate = batch * timed / (hook.end - hook.start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float('nan')
    return {'samples_s': rate, 'peak_gib': peak, 'flops_per_iter': hook.flops}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--sizes', default='tiny,base')
    p.add_argument('--precisions', default='fp32,bf16')
    p.add_argument('--batch', type=int, default=64, help='training batch size per GPU')
    p.add_argument('--steps', type=int, default=30, help='timed training iterations')
    p.add_argument('--warmup', type=int, default=5, help='untimed training iterations first')
    p.add_argument('--workers', type=int, default=8)
    p.add_argument('--caption_images', type=int, default=256)
    p.add_argument('--caption_batch', type=int, default=64)
    p.add_argument('--peak_tflops', type=float, default=989.0,
                   help='the device peak used for model FLOPs utilisation (H100/H200 dense bf16: 989)')
    p.add_argument('--skip_stock', action='store_true', help='leave out the stock paths')
    args = p.parse_args(argv)
    if args.warmup < 1:
        p.error('--warmup must be at least 1 (the FLOPs are counted in the first, untimed, iteration)')

    from utils.core.logs import setup_logging
    setup_logging()
    import torch
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks

    from utils.training import trainer as assembly
    from bench.bench_train import realistic_images, stock_trainer
    from utils.captioning.captioner import Captioner
    from utils.core.conf import GenerationConf
    from utils.core.conf import DEFAULT_PROMPT, conf_from_dict
    from utils.core.conf_checks import validate
    from utils.data.rows import read_split
    from utils.demo.data import COLOURS, SHAPES, STYLES, caption
    from utils.data.styles import StyleMap
    from utils.demo.tiny_model import build_tiny_ofa

    root = tempfile.mkdtemp(prefix='bench_gpu_')
    n_rows = args.batch * (args.warmup + args.steps)
    rows = realistic_images(f'{root}/images', max(n_rows, args.caption_images))  # one distinct JPEG per row
    os.makedirs(f'{root}/data')
    for split in ('train', 'val', 'test'):
        with open(f'{root}/data/{split}.json', 'w') as f:
            json.dump(rows[:n_rows] if split == 'train' else rows[:args.caption_images], f)
    texts = [caption(st, c, s) for st in STYLES for c in COLOURS for s in SHAPES]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f'CPU ({os.cpu_count()} cores)'
    lines = [f'machine: {platform.node()}, {device}, torch {torch.__version__}',
             f'training: {n_rows} rows per run, batch {args.batch}, {args.warmup} warm-up + {args.steps} timed '
             f'iterations, {args.workers} workers; captioning: {args.caption_images} images, batch '
             f'{args.caption_batch}, beam 5, max_len 16, no-repeat 3']

    for size in args.sizes.split(','):
        shape = SIZES[size]
        model_dir = build_tiny_ofa(f'{root}/model_{size}', texts, d_model=shape['d_model'],
                                   layers=shape['layers'], heads=shape['heads'], resnet_type=shape['resnet_type'],
                                   image_size=shape['image_size'], text_vocab_size=50265)
        StyleMap.build(list(STYLES), True, DEFAULT_PROMPT).save(model_dir)  # for the Captioner

        def conf(name, **extra):
            return validate(conf_from_dict({
                'model_name': model_dir, 'tokenize_style': True, 'img_addr': f'{root}/images',
                'dataset_path': f'{root}/data', 'file_attr': '.jpg', 'train_json': 'train.json',
                'val_json': 'val.json', 'test_json': 'test.json', 'work_dir': f'{root}/work_{size}_{name}',
                'batch_size': args.batch, 'max_epochs': 1, 'log_interval': 1000, 'num_workers': args.workers,
                'patch_image_size': shape['image_size'], 'max_image_size': shape['image_size'],
                'checkpoint': {'by_epoch': True, 'interval': 1000}, **extra}))

        base = conf('stock')
        train_rows, _ = read_split(base.data.split_path('train'), base.data.img_addr, base.data.file_attr, 'train')
        style_map = StyleMap.build(list(STYLES), True, base.model.prompt_template)
        results = {}
        if not args.skip_stock:
            results['stock OFATrainer, fp32'] = measure(stock_trainer(base, train_rows), args.batch, args.warmup)
        for precision in args.precisions.split(','):
            c = conf(precision, precision=precision, image_cache=f'{root}/cache_{size}')
            trainer = assembly.build_trainer(c, train_rows, style_map, model_dir)
            results[f'finetune.py, {precision}'] = measure(trainer, args.batch, args.warmup, count_flops=True)

        lines.append(f'\n## OFA-{size} size ({shape}) — training')
        lines.append(f'{"path":28s} {"samples/s":>10s} {"vs stock":>9s} {"peak GiB":>9s} {"epoch (min)":>12s} '
                     f'{"GFLOP/sample":>13s} {"TFLOP/s":>8s} {"MFU":>6s}')
        stock_rate = results.get('stock OFATrainer, fp32', {}).get('samples_s')
        for name, r in results.items():
            ratio = f'{r["samples_s"] / stock_rate:8.2f}x' if stock_rate else '        -'
            tflops = r['flops_per_iter'] * r['samples_s'] / args.batch / 1e12 if r['flops_per_iter'] else None
            lines.append(f'{name:28s} {r["samples_s"]:10.1f} {ratio} {r["peak_gib"]:9.2f} '
                         f'{EPOCH_SAMPLES / r["samples_s"] / 60:12.1f} '
                         + (f'{r["flops_per_iter"] / args.batch / 1e9:13.1f} {tflops:8.2f} '
                            f'{100 * tflops / args.peak_tflops:5.1f}%' if tflops else ''))

        # captioning
        images = [r['image'] for r in train_rows[:args.caption_images]]
        styles = list(STYLES)
        items = [{'image': img, 'style': styles[i % len(styles)]} for i, img in enumerate(images)]
        cap_rates = {}
        if not args.skip_stock:
            pipe = pipeline(Tasks.image_captioning, model=model_dir,
                            device='gpu' if torch.cuda.is_available() else 'cpu')
            pipe(images[:args.caption_batch], batch_size=args.caption_batch)  # warm-up
            sync()
            t = time.perf_counter()
            pipe(images, batch_size=args.caption_batch)
            sync()
            cap_rates['stock pipeline, fp32'] = len(images) / (time.perf_counter() - t)
        for precision in args.precisions.split(','):
            captioner = Captioner(model_dir, GenerationConf(beam_size=5, max_len=16, no_repeat_ngram_size=3), precision=precision)
            captioner.caption(items[:args.caption_batch], batch_size=args.caption_batch, progress=False)
            sync()
            t = time.perf_counter()
            captioner.caption(items, batch_size=args.caption_batch, num_workers=min(args.workers, 8),
                              progress=False)
            sync()
            cap_rates[f'Captioner, {precision}'] = len(images) / (time.perf_counter() - t)
        lines.append(f'## OFA-{size} size — captioning')
        stock_cap = cap_rates.get('stock pipeline, fp32')
        for name, rate in cap_rates.items():
            ratio = f'{rate / stock_cap:.2f}x' if stock_cap else '-'
            lines.append(f'{name:28s} {rate:10.1f} captions/s {ratio:>8s}')

    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())
