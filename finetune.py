"""Fine-tune (train) or evaluate a style-conditioned OFA captioning model. One JSON conf drives both.

    python3 finetune.py train --conf conf_examples/demo.json [-p CKPT|latest] [-e N] [-b N] [-w N] ...
    python3 finetune.py eval  --conf conf_examples/demo.json [-p CKPT] [-b N] [-l metrics.csv]
    torchrun --nproc_per_node N finetune.py train --conf my.json    # data-parallel, one shard per rank
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import List, Optional

from utils.core.workdir import WorkDirLock
from utils.training.resume import resolve_checkpoint
from utils.core import distributed
from utils.core.layout import OUTPUT_DIR
from utils.core.conf import Conf, apply_overrides, read_conf
from utils.core.conf_checks import validate
from utils.core.flags import add_conf_flags, conf_overrides
from utils.core.errors import CheckpointError, UsageError

logger = logging.getLogger('finetune')


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    """The command's own flags; every conf key of the command's sections is a flag too (utils/core/flags.py
    add_conf_flags: its help is the key's help in utils/core/conf.py, with its default)."""
    parser = argparse.ArgumentParser(prog='finetune.py', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest='mode', required=True, metavar='{train,eval}')
    train = modes.add_parser('train', help='fine-tune with ModelScope\'s OFATrainer')
    evaluate = modes.add_parser('eval', help='caption the test split and score it')
    for p in (train, evaluate):
        p.add_argument('-c', '--conf', required=True, help='path to the JSON conf')
    train.add_argument('-p', '--checkpoint', metavar='CKPT',
                       help='resume from this CheckpointHook checkpoint (work_dir/iter_N or its iter_N.pth), or '
                            '"latest": the newest readable one in work_dir (default: a fresh run from model_name)')
    evaluate.add_argument('-p', '--checkpoint', metavar='CKPT',
                          help="score this CheckpointHook checkpoint's weights (work_dir/iter_N or its iter_N.pth), "
                               "loaded into -m's model dir (default: the model dir's own weights)")
    for p in (train, evaluate):
        p.add_argument('--debug', action='store_true', help='show the traceback of an error')
    evaluate.add_argument('-m', '--model', metavar='MODEL',
                          help='the model that captions: a model dir, e.g. work_dir/output_best, or a hub id '
                               "(default: work_dir/output; the conf's model_name is only recorded, as the base model)")
    evaluate.add_argument('-n', '--n_samples', type=int, metavar='N', help='score only the first N test rows (default: all)')
    evaluate.add_argument('-l', '--log_csv', metavar='FILE.csv', help='also append one row of metrics to this CSV file')
    evaluate.add_argument('--style_blind', action='store_true',
                          help='ablation: caption every row with the same neutral style input (the prompt with '
                               'an empty style slot); style accuracy then shows how much the model uses the style')
    add_conf_flags(train, 'train')
    add_conf_flags(evaluate, 'eval')
    return parser


# ---------------------------------------------------------------- train

def read_data(conf: Conf, mode: str, n_samples: Optional[int] = None, checks=None):
    """The rows a run needs (train split, or test split for eval), read before anything is written. ``checks``
    (utils/data/image_checks.py): the image verdicts remembered in work_dir; the run saves them once it may write."""
    from utils.data.rows import load_split
    if mode == 'train':
        return load_split(conf, 'train', limit=conf.train.max_train_samples, checks=checks)
    return load_split(conf, 'test', limit=n_samples, checks=checks)


def read_inputs(conf: Conf, mode: str, n_samples: Optional[int], checkpoint_arg: Optional[str], checks):
    """Everything a run reads before it starts: (checkpoint, rows, stats, style map, val rows, checks). Runs beside
    the start-up's imports (utils/core/beside.py), so what it returns travels light: the train rows packed
    (utils/data/packed.py), the image checks without the entries they remembered."""
    from utils.data.packed import PackedRows
    from utils.data.rows import load_val_rows
    checkpoint = resolve_checkpoint(checkpoint_arg, conf.run.work_dir)
    rows, stats = read_data(conf, mode, n_samples, checks)
    style_map = val_rows = None
    if mode == 'train':
        style_map = build_style_map(conf, rows, checkpoint)
        val_rows = load_val_rows(conf, style_map, checks)
        rows = PackedRows(rows)
    checks.forget()
    return checkpoint, rows, stats, style_map, val_rows, checks


def build_style_map(conf: Conf, rows: List[dict], checkpoint: Optional[str]):
    """The style map of this run: the one model_name carries when this toolkit trained it (extended with
    new styles, never renumbered), else a new one. Resuming, it must be the one the checkpoint was trained
    with (saved in work_dir/output): other styles, or another style order, would silently change what each
    token means."""
    from utils.data.rows import read_styles
    from utils.data.styles import StyleMap, training_style_map

    style_map = training_style_map(read_styles(conf.data.dataset_path, rows), conf.model.tokenize_style, conf.model.prompt,
                                   conf.model.prompt_template, conf.model.model_name if conf.model.is_local else None)
    saved = os.path.join(conf.run.work_dir, OUTPUT_DIR)
    if checkpoint is not None and os.path.isfile(os.path.join(saved, 'style_map.json')):
        before = StyleMap.load(saved)
        if before != style_map:
            changed = sorted(set(before.tokens.items()) ^ set(style_map.tokens.items()))[:3]
            what = 'tokenize_style or prompt' if not changed else ', '.join(f'{s!r}' for s, _ in changed)
            raise CheckpointError(f'resuming {checkpoint}: the styles differ from those it was trained with '
                            f'({saved}/style_map.json), e.g. {what}; resume with the same data and conf')
    logger.info('%d train rows, %d styles (%s in the prompt)', len(rows), len(style_map.tokens),
                'style tokens' if conf.model.tokenize_style else 'style words')
    return style_map


def preload(mode: str, stop=lambda: False) -> None:
    """Import what the run will use (torch, ModelScope's model, preprocessors and trainer), the start-up's longest
    step, while the data is read beside it; it stops early when ``stop()`` says so (the reading ended, maybe with
    an error to show at once). What is not imported here is imported where it is used."""
    import importlib
    modules = ['torch', 'modelscope.models.multi_modal.ofa_for_all_tasks', 'utils.captioning.preprocessor']
    modules += (['utils.training.recipe_trainer', 'utils.training.stages', 'utils.training.validation'] if mode == 'train'
                else ['utils.captioning.captioner', 'utils.evaluation.results'])
    for name in modules:
        if stop():
            return
        importlib.import_module(name)


def write_summary(conf: Conf, stamp: str, summary: dict) -> str:
    """work_dir/train_{time}.json; the demo conf adds its style-following figures (utils/demo/report.py)."""
    from utils.core.io import unique_path, write_json_atomic
    if conf.data.demo:
        from utils.demo.report import demo_report
        summary['demo'] = demo_report(conf, summary['output'])
    path = unique_path(conf.run.work_dir, 'train', stamp)
    write_json_atomic(path, summary)
    return path


# ---------------------------------------------------------------- main

def main(argv: Optional[List[str]] = None) -> int:
    from utils.core.logs import log_to_file, setup_logging
    from utils.core.cli import run_reporting_errors
    from utils.core.io import timestamp

    args = build_parser().parse_args(argv)
    setup_logging(logging.INFO if distributed.is_main() else logging.WARNING)
    stamp = timestamp()
    if args.mode == 'eval' and distributed.launched() and distributed.world_size() > 1:
        print('error: eval runs in one process; start it with python3, not torchrun', file=sys.stderr)
        return 2

    def prepare():  # every check that can fail on bad input, before anything is written
        if getattr(args, 'n_samples', None) is not None and args.n_samples < 1:
            raise UsageError(f'-n must be at least 1, got {args.n_samples}')
        conf = apply_overrides(read_conf(args.conf), **conf_overrides(args))
        if args.mode == 'eval':  # first: without a trained model, eval builds no demo assets either
            from utils.captioning.captioner import trained_model_dir
            trained_model_dir(conf, args.model)
        if conf.data.demo:  # the demo conf's tiny model and data set, built where missing
            from utils.demo.data import ensure_demo_assets
            ensure_demo_assets(conf.model.model_name, conf.data.dataset_path, conf.data.img_addr, conf.model.patch_image_size or 64)
        validate(conf, splits=('train', 'val') if args.mode == 'train' else ('test',))
        from utils.core.beside import Beside
        from utils.data.image_checks import ImageChecks
        # the checkpoint and the data are read in a child process while this one imports torch and ModelScope
        with Beside(read_inputs, conf, args.mode, getattr(args, 'n_samples', None), args.checkpoint,
                    ImageChecks(conf.run.work_dir)) as reading:
            if reading.pid is not None:  # (without a child: the data first, then the imports where they are used)
                preload(args.mode, stop=reading.ended)
            checkpoint, rows, stats, style_map, val_rows, checks = reading.result()
        return conf, checkpoint, rows, stats, style_map, val_rows, checks

    if args.mode == 'train' and distributed.launched():
        distributed.init()
    if not distributed.is_main():
        distributed.barrier()  # rank 0 prepares first: it may build the demo's assets
    prepared = run_reporting_errors(prepare, debug=args.debug)
    if isinstance(prepared, int):
        return prepared
    if distributed.is_main():
        distributed.barrier()
    conf, checkpoint, rows, stats, style_map, val_rows, checks = prepared

    def run():
        main_rank = distributed.is_main()
        lock = WorkDirLock(conf.run.work_dir) if args.mode == 'train' and main_rank else contextlib.nullcontext()
        log = log_to_file(os.path.join(conf.run.work_dir, f'{args.mode}_{stamp}.log')) if main_rank \
            else contextlib.nullcontext()
        with lock, log:
            distributed.barrier()  # the other ranks start once rank 0 holds the work_dir
            if main_rank:
                checks.save()  # the image verdicts learnt while reading: the next run or resume skips them
            if args.mode == 'train':
                from utils.training import train
                sweep = lock.sweep if isinstance(lock, WorkDirLock) else lambda: None
                sweep()  # what a killed or failed run left (only the lock's holder may: they are no one else's)
                try:
                    summary = train(conf, checkpoint, stamp, rows, stats, style_map, val_rows)
                    if main_rank:
                        write_summary(conf, stamp, summary)
                finally:
                    sweep()  # this run's, on a failure (nothing is left after a run that ended well)
            else:
                from utils.evaluation.run import evaluate
                evaluate(conf, checkpoint, stamp, rows, stats, log_csv=args.log_csv, model=args.model,
                         style_blind=args.style_blind)
        return 0

    try:
        return run_reporting_errors(run, debug=args.debug)
    finally:
        if distributed.launched():
            distributed.finish()


if __name__ == '__main__':
    sys.exit(main())
