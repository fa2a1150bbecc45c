"""Personality-Captions files -> rows the stylish preprocessor takes.

A PCap file is a JSON list of ``{"personality", "comment", "image_hash"}``; val/test rows may carry
``"additional_comments"`` (extra references). Rows become ``{"style", "text", "image", "references"}``
with image = img_addr / (image_hash + file_attr). A row that is malformed or whose image is missing or
unreadable is skipped and counted (``strict``: it stops the run instead).
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

from PIL import Image
from tqdm import tqdm

logger = logging.getLogger(__name__)

PERSONALITIES_FILE = 'personalities.txt'
JPEG_EOI = b'\xff\xd9'
PROGRESS_FROM = 2000  # image checks show a progress bar from this many images on
MAX_PIXELS = 50_000_000  # larger images (decompression bombs, panoramas) are skipped


class DataError(ValueError):
    """A data problem, worded for the user: names the file (and row)."""


@dataclass
class SplitStats:
    split: str
    rows: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count

    def summary(self) -> str:
        reasons = ', '.join(f'{n} {r}' for r, n in self.skipped.most_common())
        return (f'{self.split}: {self.kept}/{self.rows} rows kept'
                + (f'; skipped {sum(self.skipped.values())} ({reasons})' if self.skipped else ''))

    def to_dict(self) -> dict:
        return {'rows': self.rows, 'kept': self.kept, 'skipped': dict(self.skipped)}


def image_path(img_addr: str, image_hash: str, file_attr: str) -> str:
    """img_addr + image_hash + file_attr, whether or not img_addr ends in a separator."""
    return os.path.join(img_addr, image_hash + file_attr)


def check_image(path: str) -> Optional[str]:
    """None if the image can be used, else the reason it cannot (without decoding every pixel)."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return 'image missing'
    if size == 0:
        return 'image empty'
    try:
        with Image.open(path) as im:  # reads the header only
            if im.size[0] * im.size[1] > MAX_PIXELS:
                return 'image too large'
            if im.format != 'JPEG':
                im.load()  # no cheap truncation marker: decode for real
                return None
        with open(path, 'rb') as f:  # a truncated JPEG has lost its end-of-image marker
            f.seek(max(0, size - 64))
            if JPEG_EOI not in f.read():
                return 'image truncated'
    except Image.DecompressionBombError:
        return 'image too large'
    except Exception:  # noqa: BLE001 - PIL raises many kinds for a bad file
        return 'image unreadable'
    return None


def _parse_row(row, with_refs: bool) -> Tuple[Optional[dict], Optional[str]]:
    if not isinstance(row, dict):
        return None, 'row not an object'
    for key in ('personality', 'comment', 'image_hash'):
        if not isinstance(row.get(key), str):
            return None, f'row without "{key}"'
    style, text, image_hash = row['personality'].strip(), row['comment'].strip(), row['image_hash'].strip()
    if not style or not text or not image_hash:
        return None, 'row with empty field'
    refs = [text]
    if with_refs:
        extra = row.get('additional_comments') or []
        if not isinstance(extra, list):
            return None, 'row with bad "additional_comments"'
        refs += [c.strip() for c in extra if isinstance(c, str) and c.strip()]
    return {'style': style, 'text': text, 'image_hash': image_hash, 'references': refs}, None


def read_split(path, img_addr: str, file_attr: str, split: str, *, strict: bool = False,
               check_images: bool = True, limit: Optional[int] = None) -> Tuple[List[dict], SplitStats]:
    """Read one PCap JSON file. Returns the usable rows and the counts of what was skipped."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding='utf-8'))
    except FileNotFoundError:
        raise DataError(f'{split} file {path} does not exist') from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f'{split} file {path} is not valid JSON: {e}') from None
    if not isinstance(data, list):
        raise DataError(f'{split} file {path} must hold a JSON list of rows, got {type(data).__name__}')
    if limit is not None:
        data = data[:limit]
    stats = SplitStats(split, rows=len(data))
    rows, reasons, seen = [], [], set()
    for i, raw in enumerate(data):
        row, reason = _parse_row(raw, with_refs=split != 'train')
        if row is not None:
            key = (row['style'], row['text'], row['image_hash'])
            if key in seen:
                row, reason = None, 'duplicate row'
            seen.add(key)
        if row is not None:
            row['image'] = image_path(img_addr, row.pop('image_hash'), file_attr)
            row['row'] = i
        rows.append(row)
        reasons.append(reason)

    if check_images:
        paths = sorted({r['image'] for r in rows if r is not None})
        with ThreadPoolExecutor(max_workers=8) as pool:
            checked = tqdm(pool.map(check_image, paths), total=len(paths), desc=f'checking {split} images',
                           unit='img', disable=len(paths) < PROGRESS_FROM)
            bad = {p: reason for p, reason in zip(paths, checked) if reason}
        for j, row in enumerate(rows):
            if row is not None and row['image'] in bad:
                reasons[j] = bad[row['image']]
                rows[j] = None

    kept = []
    for i, (row, reason) in enumerate(zip(rows, reasons)):
        if reason is not None:
            if strict:
                raise DataError(f'{split} file {path}, row {i}: {reason}')
            stats.skipped[reason] += 1
            if stats.skipped[reason] <= 3:
                logger.warning('%s file %s, row %d skipped: %s', split, path, i, reason)
            continue
        kept.append(row)
    stats.kept = len(kept)
    if not kept:
        raise DataError(f'{split} file {path}: no usable rows ({stats.summary()})')
    logger.info('%s', stats.summary())
    return kept, stats


def read_styles(dataset_path: str, rows: List[dict]) -> List[str]:
    """Styles from personalities.txt (when present, in its order), then any style the data uses that
    the list lacks (warned about once)."""
    listed: List[str] = []
    pfile = Path(dataset_path) / PERSONALITIES_FILE
    if pfile.is_file():
        for line in pfile.read_text(encoding='utf-8').splitlines():
            s = line.strip()
            if s and s not in listed:
                listed.append(s)
    used = sorted({r['style'] for r in rows})
    extra = [s for s in used if s not in set(listed)]
    if listed and extra:
        logger.warning('%d styles used by the data are missing from %s: %s', len(extra), pfile, ', '.join(extra))
    return listed + extra


def load_split(conf, split: str, *, limit: Optional[int] = None, check_images: bool = True
               ) -> Tuple[List[dict], SplitStats]:
    """The rows of one split of a conf (``train``, ``val`` or ``test``): ``[{"style", "text", "image",
    "references", "row"}]`` and the counts of what was skipped. The one way every entry point reads data."""
    return read_split(conf.split_path(split), conf.img_addr, conf.file_attr, split, strict=conf.strict,
                      check_images=check_images, limit=limit)
