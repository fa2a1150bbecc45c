"""Cost of the training recipe's parts relative to a cross-entropy step: one SCST step, one validation pass.

    python3 -m bench.bench_training_recipe [--size 64] [--batch 16] [--steps 10] [--val 64] [--candidates 5]

On a tiny random OFA model (the demo's shape) and the demo's data: the mean time of a cross-entropy step
(criterion forward + backward + optimizer step, as OFATrainer runs it), of a SCST step (generation of the
candidates + CIDEr-D rewards + teacher-forced re-scoring + backward + step), and of one validation pass
(captioning the val rows + scoring them with pycocoevalcap).
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time


def step_seconds(trainer, batches) -> float:
    """Mean seconds of one training step (criterion, backward, optimizer step) over the batches, after one
    untimed warm-up step."""
    model = trainer.unwrap_module(trainer.model)
    model.train()

    def step(batch):
        loss, _, _ = trainer.criterion(model, batch)
        loss.backward()
        trainer.optimizers[0].step()
        trainer.optimizers[0].zero_grad()
    step(batches[0])
    start = time.perf_counter()
    for batch in batches[1:]:
        step(batch)
    return (time.perf_counter() - start) / (len(batches) - 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--size', type=int, default=64, help='image side')
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--steps', type=int, default=10, help='timed steps per criterion')
    p.add_argument('--val', type=int, default=64, help='val rows captioned and scored')
    p.add_argument('--candidates', type=int, default=5, help='SCST candidates per sample')
    p.add_argument('--beam', type=int, default=3, help='beam size of validation')
    args = p.parse_args(argv)

    from utils.core.logs import setup_logging
    setup_logging()
    import copy

    import torch

    from utils.core.conf import conf_from_dict
    from utils.core.conf_checks import validate
    from utils.data.rows import load_split
    from utils.demo.data import COLOURS, SHAPES, STYLES, build_demo_data, caption
    from utils.evaluation.scoring import score, start_meteor, stop_meteor
    from utils.data.styles import StyleMap
    from utils.demo.tiny_model import build_tiny_ofa
    from utils.training import trainer as assembly
    from utils.training.validation import LiveCaptioner

    root = tempfile.mkdtemp(prefix='bench_recipe_')
    n_train = args.batch * (args.steps + 1)
    build_demo_data(f'{root}/data', f'{root}/images', sizes={'train': n_train, 'val': args.val, 'test': 4})
    texts = [caption(st, c, s, alt) for st in STYLES for c in COLOURS for s in SHAPES for alt in (False, True)]
    model_dir = build_tiny_ofa(f'{root}/model', texts, image_size=args.size)
    style_map = StyleMap.build(list(STYLES), True, ' what does the image describe? write a {} reply.')
    style_map.save(model_dir)  # the scst stage starts from a model dir with a style map

    def conf(name, **extra):
        return validate(conf_from_dict({
            'model_name': model_dir, 'tokenize_style': True, 'img_addr': f'{root}/images',
            'dataset_path': f'{root}/data', 'file_attr': '.jpg', 'train_json': 'train.json', 'val_json': 'val.json',
            'test_json': 'test.json', 'work_dir': f'{root}/work_{name}', 'batch_size': args.batch, 'max_epochs': 1,
            'patch_image_size': args.size, 'max_image_size': args.size, 'beam_size': args.beam, 'max_len': 16,
            'lr': 1e-5, **extra}))

    ce = conf('ce')
    rows, _ = load_split(ce, 'train')
    val_rows, _ = load_split(ce, 'val')
    results = {}
    for name, c in (('ce', ce), ('scst', conf('scst', stage='scst', scst={'candidates': args.candidates}))):
        trainer = assembly.build_trainer(c, rows, style_map, model_dir)
        batches = [trainer.train_data_collator([trainer.train_dataset[i] for i in range(k, k + args.batch)])
                   for k in range(0, n_train, args.batch)]
        results[name] = step_seconds(trainer, [copy.deepcopy(b) for b in batches])
        if name == 'ce':
            captioner = LiveCaptioner(c, style_map)
            items = [{'style': r['style'], 'image': r['image']} for r in val_rows]
            captioner.caption(trainer, items[:args.batch])  # warm-up (builds the generator)
            start = time.perf_counter()
            captions = captioner.caption(trainer, items)
            results['val_caption'] = time.perf_counter() - start
            refs = [r['references'] for r in val_rows]
            start = time.perf_counter()
            meteor = start_meteor()  # the first validation of a run starts METEOR (a Java process) ...
            score(captions, refs, spice=False, meteor=meteor)
            results['val_score_first'] = time.perf_counter() - start
            start = time.perf_counter()
            score(captions, refs, spice=False, meteor=meteor)  # ... the later ones reuse it
            results['val_score'] = time.perf_counter() - start
            stop_meteor(meteor)

    ce_step = results['ce']
    print(f'machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, '
          f'threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}')
    print(f'tiny OFA (d_model 64, 2+2 layers) at {args.size}px, batch {args.batch}, {args.steps} timed steps; '
          f'SCST {args.candidates} beam candidates, max_len 16; validation {len(val_rows)} rows, beam {args.beam}')
    print(f'{"what":50s} {"seconds":>9s} {"x CE step":>10s}')
    table = [('CE step (forward, backward, AdamW step)', ce_step),
             (f'SCST step ({args.candidates} candidates)', results['scst']),
             (f'validation: caption {len(val_rows)} val rows', results['val_caption']),
             ('validation: score (BLEU, METEOR, ROUGE-L, CIDEr)', results['val_score']),
             ('validation pass, total', results['val_caption'] + results['val_score']),
             ('first validation of a run: score + METEOR start', results['val_score_first'])]
    for what, seconds in table:
        print(f'{what:50s} {seconds:9.3f} {seconds / ce_step:9.1f}x')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
