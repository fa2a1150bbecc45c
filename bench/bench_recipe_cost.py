"""Cost of a training step with the recipe's settings (accumulate, freeze, ema) relative to a plain step.

    python3 -m bench.bench_recipe_cost [--size 64] [--batch 16] [--accumulate 4] [--steps 8] [--d-model 64]
                                       [--layers 2] [--text-vocab N]

Same model, same samples per optimizer step: every variant trains through the toolkit's own trainer
(build_trainer, the real OFATrainer's train()), one epoch of ``steps + 1`` optimizer steps of ``batch`` samples on
the demo's data; the first step is a warm-up. Timed per optimizer step, from the step's first hook to its last
(criterion forward, backward, the optimizer step and the recipe's work around it: micro-batches, the frozen rows'
gradient mask and restore, the EMA update), not the data loading.

Variants: plain; ``accumulate N`` (N micro-batches of batch/N); ``freeze`` the embeddings and the image backbone
(OFA's SCST setting: the style rows of the token matrix train, masked and restored at each step); ``ema 0.999``;
all three together.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time


def timing_hooks():
    """Two ModelScope hooks around everything of an iteration but the data loading: seconds per optimizer step."""
    from modelscope.trainers.hooks.hook import Hook
    from modelscope.trainers.hooks.priority import Priority

    seconds = []

    class Start(Hook):
        PRIORITY = Priority.HIGHEST

        def before_train_iter(self, trainer):
            self.t0 = time.perf_counter()

    start = Start()

    class Stop(Hook):
        PRIORITY = Priority.LOWEST

        def after_train_iter(self, trainer):
            seconds.append(time.perf_counter() - start.t0)

    return [start, Stop()], seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--size', type=int, default=64, help='image side')
    p.add_argument('--batch', type=int, default=16, help='samples per optimizer step')
    p.add_argument('--accumulate', type=int, default=4, help='micro-batches per step in the accumulate variant')
    p.add_argument('--steps', type=int, default=8, help='timed optimizer steps per variant')
    p.add_argument('--d-model', type=int, default=64)
    p.add_argument('--layers', type=int, default=2)
    p.add_argument('--resnet', default='resnet18')
    p.add_argument('--text-vocab', type=int, default=None, help='pad the BPE vocabulary to this size (real OFA: 50265)')
    args = p.parse_args(argv)
    if args.batch % args.accumulate:
        p.error('--batch must be a multiple of --accumulate')

    from utils.core.logs import setup_logging
    setup_logging()
    import torch

    from utils.core.conf import conf_from_dict
    from utils.core.conf_checks import validate
    from utils.data.rows import load_split
    from utils.data.styles import StyleMap
    from utils.demo.data import COLOURS, SHAPES, STYLES, build_demo_data, caption
    from utils.demo.tiny_model import build_tiny_ofa
    from utils.training import trainer as assembly

    root = tempfile.mkdtemp(prefix='bench_recipe_cost_')
    n_train = args.batch * (args.steps + 1)
    build_demo_data(f'{root}/data', f'{root}/images', sizes={'train': n_train, 'val': 4, 'test': 4})
    texts = [caption(st, c, s, alt) for st in STYLES for c in COLOURS for s in SHAPES for alt in (False, True)]
    model_dir = build_tiny_ofa(f'{root}/model', texts, image_size=args.size, d_model=args.d_model,
                               layers=args.layers, resnet_type=args.resnet, text_vocab_size=args.text_vocab)
    style_map = StyleMap.build(list(STYLES), True, ' what does the image describe? write a {} reply.')

    def conf(name, **extra):
        return validate(conf_from_dict({
            'model_name': model_dir, 'tokenize_style': True, 'img_addr': f'{root}/images',
            'dataset_path': f'{root}/data', 'file_attr': '.jpg', 'train_json': 'train.json', 'val_json': 'val.json',
            'test_json': 'test.json', 'work_dir': f'{root}/work_{name}', 'batch_size': args.batch, 'max_epochs': 1,
            'patch_image_size': args.size, 'max_image_size': args.size, 'lr': 1e-4, 'warmup': 0.0,
            'max_train_samples': n_train, 'log_interval': 1000, 'tensorboard': False,
            'checkpoint': {'by_epoch': True, 'interval': 1000, 'max_checkpoint_num': 1}, **extra}))

    freeze = ['encoder_embeddings', 'decoder_embeddings', 'image_backbone']
    variants = [
        ('plain step', {}),
        (f'accumulate {args.accumulate} (micro-batches of {args.batch // args.accumulate})',
         {'batch_size': args.batch // args.accumulate, 'accumulate': args.accumulate}),
        ('freeze embeddings + image_backbone (style rows train)', {'freeze': freeze}),
        ('ema 0.999', {'ema': 0.999}),
        ('all three', {'batch_size': args.batch // args.accumulate, 'accumulate': args.accumulate,
                       'freeze': freeze, 'ema': 0.999}),
    ]
    rows = None
    results = []
    for i, (name, extra) in enumerate(variants):
        c = conf(str(i), **extra)
        if rows is None:
            rows, _ = load_split(c, 'train')
        torch.manual_seed(0)
        trainer = assembly.build_trainer(c, rows, style_map, model_dir)
        hooks, seconds = timing_hooks()
        for hook in hooks:
            trainer.register_hook(hook)
        trainer.train()
        timed = seconds[1:]
        results.append((name, sum(timed) / len(timed), len(timed)))
    plain = results[0][1]
    print(f'date: {time.strftime("%Y-%m-%d %H:%M:%S %Z")}')
    print(f'command: python3 -m bench.bench_recipe_cost {" ".join(argv if argv is not None else sys.argv[1:])}')
    print(f'machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, '
          f'threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}')
    print(f'tiny OFA (d_model {args.d_model}, {args.layers}+{args.layers} layers, {args.resnet}, vocab '
          f'{args.text_vocab or "demo BPE"} + 9192) at {args.size}px, {args.batch} samples per optimizer step, '
          f'{args.steps} timed steps per variant (after one warm-up)')
    print(f'{"variant":58s} {"s/step":>8s} {"x plain":>8s}')
    for name, mean, _ in results:
        print(f'{name:58s} {mean:8.3f} {mean / plain:7.2f}x')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
