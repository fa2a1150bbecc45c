"""Personality-Captions files -> rows the stylish preprocessor takes.

A PCap file is a JSON list of ``{"personality", "comment", "image_hash"}``; val/test rows may carry
``"additional_comments"`` (extra references). Rows become ``{"style", "text", "image", "references"}``
with image = img_addr / (image_hash + file_attr). A row that is malformed or whose image is missing or
unreadable is skipped and counted (``strict``: it stops the run instead).
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from tqdm import tqdm

from utils.core.conf import Columns
from utils.core.errors import DataError, first_line, raise_system_failure
from utils.core.layout import DATA_SUFFIXES, PERSONALITIES_FILE
from utils.data.image_checks import ImageChecks
from utils.data.images import image_path
from utils.core.io import read_json

logger = logging.getLogger(__name__)

PROGRESS_ROWS = 50_000  # reading shows a progress bar from this many rows on


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


def _text(row: dict, column: str) -> Tuple[Optional[str], Optional[str]]:
    """(stripped text of row[column], None) or (None, the reason the row is unusable)."""
    if column not in row:
        return None, f'row without "{column}"'
    value = row[column]
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, f'row with empty "{column}"'
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # e.g. a numeric image id in a parquet file
    if not isinstance(value, str):
        return None, f'row with non-text "{column}"'
    return value.strip(), None


def _references(value) -> Optional[List[str]]:
    """Extra references: a list of strings (JSON, JSON lines, parquet), or in a CSV cell a JSON list or one
    plain string. None when the value is malformed."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith('['):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                return None
        else:
            return [text] if text else []
    if not isinstance(value, (list, tuple)):
        return None
    return [c.strip() for c in value if isinstance(c, str) and c.strip()]


def _parse_row(row, columns: Columns, with_refs: bool) -> Tuple[Optional[dict], Optional[str]]:
    if not isinstance(row, dict):
        return None, 'row not an object'
    fields = {}
    for name in ('style', 'text', 'image'):
        fields[name], reason = _text(row, getattr(columns, name))
        if reason:
            return None, reason
    refs = [fields['text']]
    if with_refs and columns.references:
        extra = _references(row.get(columns.references))
        if extra is None:
            return None, f'row with bad "{columns.references}"'
        refs += extra
    return {'style': fields['style'], 'text': fields['text'], 'image_value': fields['image'],
            'references': refs}, None


TABULAR = {'.csv': 'csv', '.jsonl': 'json', '.parquet': 'parquet'}


def _json_records(path: Path, split: str, limit: Optional[int]) -> Tuple[int, Iterator[Tuple[int, object]]]:
    data = read_json(path, f'{split} file', DataError)
    if not isinstance(data, list):
        raise DataError(f'{split} file {path} must hold a JSON list of rows, got {type(data).__name__}')
    data = data[:limit]
    return len(data), enumerate(data)


def _tabular_records(path: Path, split: str, columns: Columns, limit: Optional[int]):
    """Rows of a CSV, JSON lines or parquet file through HF datasets: the file becomes a memory-mapped
    Arrow table (cached by datasets, built once per file content) and only the mapped columns are read,
    a batch at a time, so a 186k-row file is never held in memory twice."""
    import datasets

    if not path.is_file():
        raise DataError(f'{split} file {path} does not exist')
    kind = TABULAR[path.suffix.lower()]
    kwargs = {}
    if kind == 'csv':  # every cell as text: image ids like 0012 must not become the number 12
        text_columns = [c for c in (columns.style, columns.text, columns.image, columns.references) if c]
        kwargs = {'converters': {c: str for c in text_columns}, 'keep_default_na': False}
    was = datasets.utils.logging.get_verbosity()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset(kind, data_files=str(path), split='train', **kwargs)
    except Exception as e:  # noqa: BLE001 - pyarrow/pandas raise many kinds for a malformed file
        raise_system_failure(e)  # datasets writes an Arrow cache: a full disk there is no fault of the file
        raise DataError(f'{split} file {path} could not be read as {kind}: {first_line(e)}') from None
    finally:
        datasets.utils.logging.set_verbosity(was)
        datasets.enable_progress_bars()
    wanted = [c for c in (columns.style, columns.text, columns.image) if c]
    missing = [c for c in wanted if c not in table.column_names]
    if missing:
        field_of = {getattr(columns, f): f for f in ('style', 'text', 'image')}
        raise DataError(f'{split} file {path} has no column "{missing[0]}" (conf key "columns.{field_of[missing[0]]}"; '
                        f'the file has: {", ".join(table.column_names)})')
    if columns.references and columns.references in table.column_names:
        wanted.append(columns.references)
    if limit is not None:
        table = table.select(range(min(limit, len(table))))
    table = table.select_columns(wanted)

    def records():
        i = 0
        for batch in table.iter(batch_size=4096):
            for values in zip(*(batch[c] for c in wanted)):
                yield i, dict(zip(wanted, values))  # an empty cell (None or '') is an empty field
                i += 1
    return len(table), records()


def write_rows(path, rows: List[dict]) -> Path:
    """Write rows (dicts) in the format the file's suffix names: a PCap ``.json`` list, ``.jsonl``, ``.csv``
    (a list value becomes a JSON list in its cell, None an empty cell) or ``.parquet``. The inverse of
    read_split's file reading, e.g. to convert a data set."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == '.json':
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding='utf-8')
    elif suffix == '.jsonl':
        path.write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in rows), encoding='utf-8')
    elif suffix == '.csv':
        import csv
        with open(path, 'w', newline='', encoding='utf-8') as f:
            writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
            writer.writeheader()
            writer.writerows({k: json.dumps(v) if isinstance(v, list) else ('' if v is None else v)
                              for k, v in r.items()} for r in rows)
    elif suffix == '.parquet':
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise ValueError(f'{path}: not one of {", ".join(DATA_SUFFIXES)}')
    return path


def read_split(path, img_addr: str, file_attr: str, split: str, *, columns: Optional[Columns] = None,
               strict: bool = False, check_images: bool = True, limit: Optional[int] = None,
               checks: Optional[ImageChecks] = None) -> Tuple[List[dict], SplitStats]:
    """Read one split: a PCap JSON list, or a CSV / JSON lines / parquet file whose columns ``columns`` maps
    (default: the PCap names). Returns the usable rows and the counts of what was skipped. ``checks``: the image
    verdicts remembered from earlier runs (:class:`~utils.data.image_checks.ImageChecks`; default: none, every
    image is checked)."""
    path = Path(path)
    columns = columns or Columns()
    if path.suffix.lower() in TABULAR:
        n, records = _tabular_records(path, split, columns, limit)
    else:
        n, records = _json_records(path, split, limit)
    stats = SplitStats(split, rows=n)
    rows, reasons, seen = [], [], set()
    for i, raw in tqdm(records, total=n, desc=f'reading {split}', unit='row', disable=n < PROGRESS_ROWS):
        row, reason = _parse_row(raw, columns, with_refs=split != 'train')
        if row is not None:
            key = (row['style'], row['text'], row['image_value'])
            if key in seen:
                row, reason = None, 'duplicate row'
            seen.add(key)
        if row is not None:
            row['image'] = image_path(img_addr, row.pop('image_value'), file_attr)
            row['row'] = i
        rows.append(row)
        reasons.append(reason)

    if check_images:
        checks = checks or ImageChecks(None)
        paths = sorted({r['image'] for r in rows if r is not None})
        bad = {p: reason for p, reason in checks.verdicts(paths, desc=f'checking {split} images').items() if reason}
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


def load_split(conf, split: str, *, limit: Optional[int] = None, check_images: bool = True,
               checks: Optional[ImageChecks] = None) -> Tuple[List[dict], SplitStats]:
    """The rows of one split of a conf (``train``, ``val`` or ``test``): ``[{"style", "text", "image",
    "references", "row"}]`` and the counts of what was skipped. The one way every entry point reads data.
    ``checks``: image verdicts remembered in work_dir (``ImageChecks(conf.run.work_dir)``; its ``save()`` is the
    caller's, once writing to work_dir is allowed)."""
    return read_split(conf.data.split_path(split), conf.data.img_addr, conf.data.file_attr, split, columns=conf.data.columns,
                      strict=conf.data.strict, check_images=check_images, limit=limit, checks=checks)


def load_val_rows(conf, style_map, checks=None) -> List[dict]:
    """The val rows validation captions (the first ``val_max_samples``), read before training starts. Rows of
    a style the model is not trained with cannot be captioned: they are skipped, counted and named. ``checks``:
    the image verdicts remembered in work_dir (utils/data/image_checks.py), as for the train rows."""
    rows, _ = load_split(conf, 'val', limit=conf.validation.val_max_samples, checks=checks)
    known = [r for r in rows if r['style'] in style_map.tokens]
    if len(known) < len(rows):
        unknown = sorted({r['style'] for r in rows} - set(style_map.tokens))
        logger.warning('val: %d rows skipped, their style is not among the train styles: %s',
                       len(rows) - len(known), ', '.join(unknown[:5]) + (', ...' if len(unknown) > 5 else ''))
    if not known:
        raise DataError(f'val file {conf.data.split_path("val")}: no row has a style of the train split')
    return known
