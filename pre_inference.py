"""Caption images in a requested style, in batches, with a trained model.

    python3 pre_inference.py --conf C [-b BATCH] [-n N] [-r] [-j LIST.json] [-m MODEL] [-o OUT_DIR] [-d DESC]

-m picks the model that captions (default: {work_dir}/output); the conf's model_name is the base model it was
trained from, recorded in the output. Writes {OUT_DIR or work_dir}/inference_{time}.json:
    {"model_name", "model_revision", "model", "n_eval_sample", "results": [{"style", "image", "caption",
     "reference"}]}    ("model": the absolute path of the model dir that captioned)
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from utils.core.conf_checks import load_conf
from utils.core.errors import DataError, UnknownStyleError, UsageError
from utils.core.flags import add_conf_flags, conf_overrides

logger = logging.getLogger('pre_inference')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='pre_inference.py', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-c', '--conf', required=True, help='path to the JSON conf')
    p.add_argument('-n', '--n_samples', type=int, metavar='N', help='caption N test samples (default: all)')
    p.add_argument('-r', '--random', action='store_true',
                   help='pick the N test samples at random, seeded by the conf\'s seed (default: the first N)')
    p.add_argument('-j', '--json', metavar='LIST.json',
                   help='caption this JSON list of {"style", "image" or "image_hash", "reference"?} instead of the '
                        'test split, in order (default: the test split)')
    p.add_argument('-m', '--model', metavar='MODEL',
                   help='the model that captions: a model dir or hub id (default: {work_dir}/output)')
    p.add_argument('-o', '--out_dir', metavar='OUT_DIR', help='where inference_{time}.json goes (default: work_dir)')
    p.add_argument('-d', '--desc', metavar='DESC',
                   help='a description stored as model_name in the output (default: the conf\'s model_name)')
    p.add_argument('--debug', action='store_true', help='show the traceback of an error')
    add_conf_flags(p, 'caption')  # --strict: a bad row of the test split or the -j list stops the run
    return p


def check_flags(args) -> None:
    """The command's own flags (not conf keys), before anything is read."""
    if args.n_samples is not None and args.n_samples < 1:
        raise UsageError(f'-n must be at least 1, got {args.n_samples}')
    if args.out_dir and os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise UsageError(f'-o {args.out_dir}: exists and is not a folder')


def main(argv: Optional[List[str]] = None) -> int:
    from utils.core.cli import run_reporting_errors
    from utils.core.logs import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging()
    return run_reporting_errors(lambda: run(args), debug=args.debug)


def run(args) -> int:
    from utils.captioning.captioner import load_captioner
    from utils.captioning.items import json_items, split_items
    from utils.core.io import timestamp, unique_path, write_json_atomic

    # the command line and the conf
    check_flags(args)
    conf = load_conf(args.conf, conf_overrides(args), splits=() if args.json else ('test',))
    # data
    if args.json:
        items, stats, skipped = json_items(args.json, conf)
    else:
        (items, stats), skipped = split_items(conf, args.n_samples, args.random), None
    # model
    captioner = load_captioner(conf, args.model)
    # work: an unknown style fails before any work, naming its row of the file (skipped rows included)
    try:
        captions = captioner.caption(items, batch_size=conf.run.batch_size, num_workers=conf.run.num_workers)
    except UnknownStyleError as e:
        raise DataError(f'{"-j file " + args.json if args.json else "test split"}, {e}') from None

    # results
    results = []
    for item, cap in zip(items, captions):
        r = {'style': item['style'], 'image': item['image'], 'caption': cap}
        if 'reference' in item:
            r['reference'] = item['reference']
        results.append(r)
    output = {
        'model_name': args.desc or conf.model.model_name,  # the base model (the seed's key)
        'model_revision': conf.model.model_revision,
        'model': os.path.abspath(captioner.model_dir),      # the model dir that captioned (as eval records it)
        'n_eval_sample': len(results),
        'results': results,
        'data': {'json' if args.json else 'test': stats.to_dict()},  # rows skipped as bad, by reason
    }
    if skipped:  # which rows of the -j list, and why
        output['skipped'] = skipped
    out_dir = args.out_dir or conf.run.work_dir
    os.makedirs(out_dir, exist_ok=True)
    path = unique_path(out_dir, 'inference', timestamp())
    write_json_atomic(path, output)
    logger.info('%d captions written to %s', len(results), path)
    return 0


if __name__ == '__main__':
    sys.exit(main())
