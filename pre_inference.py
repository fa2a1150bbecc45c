"""Caption images in a requested style, in batches, with a trained model.

    python3 pre_inference.py --conf C [-b BATCH] [-n N] [-r] [-j LIST.json] [-m MODEL] [-o OUT_DIR] [-d DESC]

Writes {OUT_DIR or work_dir}/inference_{time}.json:
    {"model_name", "model_revision", "n_eval_sample", "results": [{"style", "image", "caption", "reference"}]}
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import sys
from typing import List, Optional

from utils.core.errors import ConfError
from utils.core.conf import load_conf
from utils.core.flags import add_conf_flags, conf_overrides
from utils.core.errors import DataError
from utils.data.rows import SplitStats, load_split
from utils.data.images import check_image, image_path
from utils.core.io import read_json
from utils.core.errors import UnknownStyleError

logger = logging.getLogger('pre_inference')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='pre_inference.py', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-c', '--conf', required=True, help='path to the JSON conf')
    p.add_argument('-n', '--n_samples', type=int, help='caption N test samples (default: all)')
    p.add_argument('-r', '--random', action='store_true', help='pick the N test samples at random (conf: seed)')
    p.add_argument('-j', '--json', help='caption this JSON list of {"style", "image" or "image_hash", '
                                        '"reference"?} instead of the test split, in order')
    p.add_argument('-m', '--model', help='model dir or hub id (default: {work_dir}/output)')
    p.add_argument('-o', '--out_dir', help='where inference_{time}.json goes (default: work_dir)')
    p.add_argument('-d', '--desc', help='a description that replaces model_name in the output')
    p.add_argument('--debug', action='store_true', help='show the traceback of an error')
    add_conf_flags(p, 'caption')  # --strict: a bad row of the test split or the -j list stops the run
    return p


def reference_value(refs: List[str]):
    """A single reference as a string, several as a list (the seed's format)."""
    return refs[0] if len(refs) == 1 else refs


def test_items(conf, n: Optional[int], pick_random: bool):
    """Items of the test split (all, the first n, or n at random) and the split's row counts."""
    rows, stats = load_split(conf, 'test')
    if n is not None and n < len(rows):
        rows = random.Random(conf.run.seed).sample(rows, n) if pick_random else rows[:n]
    items = [{'style': r['style'], 'image': r['image'], 'reference': reference_value(r['references']),
              'row': r['row']} for r in rows]
    return items, stats


def json_items(path: str, conf):
    """Items of a -j file, in order, and what was skipped. A file that is not a non-empty JSON list is an
    error; a bad row (not an object, no style, no image, an unusable image, a bad reference) is skipped and
    counted, as in a data set, unless conf.data.strict (--strict), where it is an error naming the row."""
    data = read_json(path, '-j file', DataError)
    if not isinstance(data, list) or not data:
        raise DataError(f'-j file {path} must hold a non-empty JSON list of {{"style", "image"}} objects')
    items, skipped = [], []
    stats = SplitStats('-j', rows=len(data))
    for i, row in enumerate(data):
        item, reason = _json_item(i, row, conf)
        if reason is None:
            items.append(item)
            continue
        if conf.data.strict:
            raise DataError(f'-j file {path}, row {i}: {reason}')
        skipped.append({'row': i, 'reason': reason})
        stats.skipped[reason.split(':')[0]] += 1
        if len(skipped) <= 3:
            logger.warning('-j file %s, row %d skipped: %s', path, i, reason)
    stats.kept = len(items)
    if not items:
        first = skipped[0]
        raise DataError(f'-j file {path}: no usable rows (row {first["row"]}: {first["reason"]}; {stats.summary()})')
    if skipped:
        logger.warning('%s', stats.summary())
    return items, stats, skipped


def _json_item(i: int, row, conf):
    """(item, None) for a usable -j row, else (None, the reason)."""
    if not isinstance(row, dict):
        return None, 'not an object'
    if not isinstance(row.get('style'), str) or not row['style']:
        return None, '"style" missing or not a string'
    if isinstance(row.get('image'), str):
        img = row['image']
    elif isinstance(row.get('image_hash'), str):
        img = image_path(conf.data.img_addr, row['image_hash'], conf.data.file_attr)
    else:
        return None, 'needs "image" (a path) or "image_hash"'
    problem = check_image(img)
    if problem:
        return None, f'{problem}: {img}'
    item = {'style': row['style'], 'image': img, 'row': i}
    ref = row.get('reference')
    if ref is not None:
        if not (isinstance(ref, str) or (isinstance(ref, list) and all(isinstance(r, str) for r in ref))):
            return None, '"reference" must be a string or a list of strings'
        item['reference'] = ref
    return item, None


def main(argv: Optional[List[str]] = None) -> int:
    from utils.core.cli import run_reporting_errors
    from utils.core.logs import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging()
    return run_reporting_errors(lambda: run(args), debug=args.debug)


def run(args) -> int:
    from utils.core.io import timestamp, unique_path, write_json_atomic

    conf = load_conf(args.conf, conf_overrides(args), splits=() if args.json else ('test',))
    if args.n_samples is not None and args.n_samples < 1:
        raise ConfError(f'-n must be at least 1, got {args.n_samples}')
    stats, skipped = None, None
    if args.json:
        items, stats, skipped = json_items(args.json, conf)
    else:
        items, stats = test_items(conf, args.n_samples, args.random)

    from utils.captioning.captioner import load_captioner
    captioner = load_captioner(conf, args.model)
    try:  # an unknown style fails before any work, naming its row of the file (skipped rows included)
        captions = captioner.caption(items, batch_size=conf.run.batch_size, num_workers=conf.run.num_workers)
    except UnknownStyleError as e:
        raise ConfError(f'{"-j file " + args.json if args.json else "test split"}, {e}') from None

    results = []
    for item, cap in zip(items, captions):
        r = {'style': item['style'], 'image': item['image'], 'caption': cap}
        if 'reference' in item:
            r['reference'] = item['reference']
        results.append(r)
    out_dir = args.out_dir or conf.run.work_dir
    os.makedirs(out_dir, exist_ok=True)
    path = unique_path(out_dir, 'inference', timestamp())
    output = {
        'model_name': args.desc or (args.model if args.model else conf.model.model_name),
        'model_revision': None if args.model else conf.model.model_revision,
        'n_eval_sample': len(results),
        'results': results,
    }
    if stats is not None:  # rows of the test split or -j list skipped as bad, by reason
        output['data'] = {'json' if args.json else 'test': stats.to_dict()}
    if skipped:  # which rows of the -j list, and why
        output['skipped'] = skipped
    write_json_atomic(path, output)
    logger.info('%d captions written to %s', len(results), path)
    return 0


if __name__ == '__main__':
    sys.exit(main())
