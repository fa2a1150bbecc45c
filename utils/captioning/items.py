"""What pre_inference.py captions: items ``{"style", "image", "reference"?, "row"}`` from the conf's test split
(all, the first n, or n at random) or from a ``-j`` JSON list, with the counts of what was skipped as bad."""
from __future__ import annotations

import logging
import random
from typing import List, Optional

from utils.core.errors import DataError
from utils.core.io import read_json
from utils.data.images import check_image, image_path
from utils.data.rows import SplitStats, load_split

logger = logging.getLogger('pre_inference')  # the name users see on pre_inference.py's log lines


def reference_value(refs: List[str]):
    """A single reference as a string, several as a list (the seed's format)."""
    return refs[0] if len(refs) == 1 else refs


def split_items(conf, n: Optional[int], pick_random: bool):
    """Items of the test split (all, the first n, or n at random, seeded by conf.run.seed) and the split's
    row counts."""
    rows, stats = load_split(conf, 'test')
    if n is not None and n < len(rows):
        rows = random.Random(conf.run.seed).sample(rows, n) if pick_random else rows[:n]
    items = [{'style': r['style'], 'image': r['image'], 'reference': reference_value(r['references']),
              'row': r['row']} for r in rows]
    return items, stats


def json_items(path: str, conf):
    """Items of a -j file, in order, its counts and what was skipped. A file that is not a non-empty JSON list
    is an error; a bad row (not an object, no style, no image, an unusable image, a bad reference) is skipped
    and counted, as in a data set, unless conf.data.strict (--strict), where it is an error naming the row."""
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
