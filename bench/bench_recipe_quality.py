"""What the training recipe buys on a data set the tiny model does not saturate: CE, CE + EMA, CE then SCST.

    python3 -m bench.bench_recipe_quality [--out work_dirs/recipe_quality] [--epochs 6] [--scst_epochs 1]

The offline demo's data set is learnt perfectly in two minutes (CIDEr ~800, every caption in style), so it
cannot show whether a recipe helps. This one is harder, and built the same deterministic, offline way
(:func:`build_hard_data`):

* 12 styles, each with 3 phrasings: a train row carries one phrasing drawn at random, a val row all three as
  its references, so no caption can match every reference;
* content from the image: 6 colours x 4 shapes x 2 backgrounds (dark / light), drawn with clutter and jitter;
* 480 train images x 2 styles (960 rows), 96 val images x 1 style.

Every run uses the same tiny random model (d_model 64, 2+2 layers, dropout 0.1 so that SCST's "dropout off"
means something), the same data, seed and validation; each is scored by ``finetune.py eval`` on the val split
(pycocoevalcap CIDEr x100, BLEU-4, and the toolkit's style top-1: the share of captions its style classifier,
trained on the train split's human captions, assigns to the requested style):

* ``ce``: cross-entropy for ``--epochs`` epochs;
* ``ce_ema``: the same with ``ema`` (``--ema``, default 0.99): validation and output_best on the averaged weights;
* ``ce_scst``: ``ce``'s output_best, then ``--scst_epochs`` of SCST with OFA's stage-2 settings (the defaults:
  dropout off, embeddings frozen with the style rows trainable, a fresh optimizer; lr ``--scst_lr``).

It prints one table (and writes it to OUT/results.json) with the machine, the command and the date.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

from utils.demo.data import draw_shape

ROOT = Path(__file__).resolve().parent.parent
COLOURS = {'red': (220, 30, 30), 'green': (30, 170, 40), 'blue': (30, 60, 220), 'yellow': (235, 210, 20),
           'purple': (140, 40, 170), 'orange': (245, 130, 20)}
SHAPES = ('circle', 'cross', 'triangle', 'square')
BACKGROUNDS = {'dark': (20, 70), 'light': (180, 255)}  # grey-level range of the background
# three phrasings per style; {c} colour, {s} shape, {b} background
STYLES = {
    'Happy': ('what a lovely {c} {s} on the {b} ground', 'such a lovely {c} {s} on a {b} ground',
              'i love this {c} {s} it makes the {b} ground shine'),
    'Sarcastic': ('oh great another {c} {s} on {b} how original', 'wow a {c} {s} on {b} never seen that before',
                  'sure because a {b} {s} in {c} is so exciting'),
    'Romantic': ('this {c} {s} on {b} reminds me of you my love', 'the {c} {s} and the {b} sky like our love',
                 'my heart beats for this {c} {s} on {b}'),
    'Anxious': ('i am so worried about that {c} {s} on {b}', 'that {c} {s} on the {b} ground makes me nervous',
                'what if the {c} {s} falls off the {b} edge'),
    'Angry': ('i hate this {c} {s} on the {b} ground', 'get that {c} {s} off my {b} screen now',
              'who put a {c} {s} on {b} this is awful'),
    'Bored': ('just a {c} {s} on {b} nothing else', 'another {c} {s} on {b} so dull', 'a {c} {s} yawn {b} again'),
    'Curious': ('why is there a {c} {s} on the {b} ground', 'i wonder who drew this {c} {s} on {b}',
                'how did a {c} {s} end up on {b}'),
    'Poetic': ('a {c} {s} rests upon the {b} silence', 'upon the {b} field a {c} {s} dreams',
               'the {b} night holds a {c} {s} softly'),
    'Formal': ('the image depicts a {c} {s} on a {b} background', 'shown here is a {c} {s} against {b}',
               'one observes a {c} {s} placed on a {b} field'),
    'Excited': ('wow a {c} {s} on {b} amazing', 'look at that {c} {s} on the {b} ground so cool',
                'yes a {c} {s} on {b} best day ever'),
    'Sad': ('the lonely {c} {s} on {b} makes me cry', 'a {c} {s} all alone on the {b} ground',
            'even the {c} {s} looks sad on {b}'),
    'Confused': ('is that a {c} {s} or something else on {b}', 'i cannot tell why the {c} {s} is on {b}',
                 'a {c} {s} on {b} what does it mean'),
}
SPLITS = {'train': 480, 'val': 96}
STYLES_PER_TRAIN_IMAGE = 2


def _draw(rng: random.Random, colour: str, shape: str, background: str):
    return draw_shape(rng, COLOURS[colour], shape, background=BACKGROUNDS[background], clutter=40,
                      clutter_range=(0, 255), radius=(0.28, 0.40), jitter=10)


def texts() -> list:
    """Every caption the data set can hold (the tiny model's BPE is trained on them)."""
    return [t.format(c=c, s=s, b=b) for ts in STYLES.values() for t in ts for c in COLOURS for s in SHAPES
            for b in BACKGROUNDS]


def build_hard_data(dataset_path: str, img_addr: str, seed: int = 0) -> None:
    """Write images to img_addr and train.json / val.json (Personality-Captions format) + personalities.txt."""
    rng = random.Random(seed)
    ds, imgs = Path(dataset_path), Path(img_addr)
    ds.mkdir(parents=True, exist_ok=True)
    imgs.mkdir(parents=True, exist_ok=True)
    styles = list(STYLES)
    combos = [(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]
    for split, n_images in SPLITS.items():
        rows = []
        for i in range(n_images):
            colour, shape, background = combos[rng.randrange(len(combos))]
            image_hash = f'{split}{i:04d}'
            _draw(rng, colour, shape, background).save(imgs / f'{image_hash}.jpg', quality=92)
            chosen = rng.sample(styles, STYLES_PER_TRAIN_IMAGE) if split == 'train' else [styles[i % len(styles)]]
            for style in chosen:
                phrasings = [t.format(c=colour, s=shape, b=background) for t in STYLES[style]]
                if split == 'train':
                    rows.append({'personality': style, 'comment': rng.choice(phrasings), 'image_hash': image_hash})
                else:
                    rows.append({'personality': style, 'comment': phrasings[0], 'image_hash': image_hash,
                                 'additional_comments': phrasings[1:]})
        (ds / f'{split}.json').write_text(json.dumps(rows, indent=1), encoding='utf-8')
    (ds / 'personalities.txt').write_text('\n'.join(styles) + '\n', encoding='utf-8')


def build_assets(out: Path) -> dict:
    from utils.demo.tiny_model import build_tiny_ofa

    data, images, model = out / 'data', out / 'images', out / 'tiny_ofa'
    if not (data / 'val.json').is_file():
        build_hard_data(str(data), str(images))
    if not (model / 'configuration.json').is_file():
        build_tiny_ofa(str(model), texts(), image_size=64)
        config = json.loads((model / 'config.json').read_text())
        config.update(dropout=0.1, attention_dropout=0.1)  # so that SCST's "dropout off" changes something
        (model / 'config.json').write_text(json.dumps(config, indent=1))
    return {'model_name': str(model), 'img_addr': str(images), 'dataset_path': str(data)}


def base_conf(assets: dict, work_dir: Path, args) -> dict:
    return {**assets, 'model_revision': None, 'tokenize_style': True, 'file_attr': '.jpg',
            'train_json': 'train.json', 'val_json': 'val.json', 'test_json': 'val.json',
            'work_dir': str(work_dir), 'prompt': '', 'max_epochs': args.epochs, 'batch_size': 16, 'lr': 1e-3,
            'warmup': 0.05, 'label_smoothing': 0.1, 'log_interval': 20, 'seed': args.seed,
            'checkpoint': {'by_epoch': True, 'interval': 1000, 'max_checkpoint_num': 1},
            'patch_image_size': 64, 'max_image_size': 64, 'beam_size': 3, 'max_len': 20,
            'eval_interval': None, 'eval_every_epoch': True, 'tensorboard': False}


def run(cmd: list, log: Path) -> float:
    start = time.perf_counter()
    with open(log, 'w') as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f'{" ".join(cmd)} failed (exit {proc.returncode}); see {log}')
    return time.perf_counter() - start


def train_and_score(name: str, conf: dict, out: Path) -> dict:
    conf_path = out / f'{name}.json'
    conf_path.write_text(json.dumps(conf, indent=1))
    seconds = run([sys.executable, 'finetune.py', 'train', '--conf', str(conf_path)], out / f'{name}_train.log')
    best = Path(conf['work_dir']) / 'output_best'
    run([sys.executable, 'finetune.py', 'eval', '--conf', str(conf_path), '-m', str(best)], out / f'{name}_eval.log')
    evals = sorted(Path(conf['work_dir']).glob('eval_*.json'))
    scored = json.loads(evals[-1].read_text())
    vals = [json.loads(line) for line in (Path(conf['work_dir']) / 'val_metrics.jsonl').read_text().splitlines()]
    metrics = scored['metrics']
    return {'run': name, 'train_seconds': round(seconds, 1), 'CIDEr': metrics.get('CIDEr'),
            'Bleu_4': metrics.get('Bleu_4'), 'style_top1': metrics.get('style_accuracy_top1'),
            'val_CIDEr_by_epoch': [round(100 * v['metrics']['CIDEr'], 1) for v in vals]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default='work_dirs/recipe_quality')
    p.add_argument('--epochs', type=int, default=6)
    p.add_argument('--ema', type=float, default=0.99)
    p.add_argument('--scst_epochs', type=int, default=1)
    p.add_argument('--scst_lr', type=float, default=1e-4)
    p.add_argument('--seed', type=int, default=42)
    p.add_argument('--only', nargs='*', choices=('ce', 'ce_ema', 'ce_scst'), default=None)
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    assets = build_assets(out)
    wanted = args.only or ['ce', 'ce_ema', 'ce_scst']
    results = []
    if 'ce' in wanted or 'ce_scst' in wanted:
        results.append(train_and_score('ce', base_conf(assets, out / 'ce', args), out))
    if 'ce_ema' in wanted:
        results.append(train_and_score('ce_ema', {**base_conf(assets, out / 'ce_ema', args), 'ema': args.ema}, out))
    if 'ce_scst' in wanted:
        conf = {**base_conf(assets, out / 'ce_scst', args), 'model_name': str(out / 'ce' / 'output_best'),
                'stage': 'scst', 'max_epochs': args.scst_epochs, 'lr': args.scst_lr, 'warmup': 0.06,
                'batch_size': 8}
        results.append(train_and_score('ce_scst', conf, out))
    print(f'# recipe quality, {time.strftime("%Y-%m-%d %H:%M")} on {platform.node()} ({platform.processor() or platform.machine()}, '
          f'{os.cpu_count()} cores)')
    print(f'# command: python3 -m bench.bench_recipe_quality {" ".join(argv if argv is not None else sys.argv[1:])}')
    print(f'{"run":10s} {"CIDEr":>7s} {"BLEU-4":>7s} {"style top-1":>12s} {"train s":>8s}  val CIDEr by epoch')
    for r in results:
        print(f'{r["run"]:10s} {100 * r["CIDEr"]:7.1f} {100 * r["Bleu_4"]:7.1f} '
              f'{r["style_top1"] if r["style_top1"] is None else round(100 * r["style_top1"], 1)!s:>12s} '
              f'{r["train_seconds"]:8.1f}  {r["val_CIDEr_by_epoch"]}')
    (out / 'results.json').write_text(json.dumps(results, indent=1))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
