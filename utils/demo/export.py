"""``python3 -m utils.demo.export --format csv|jsonl|parquet OUT_DIR``: the demo's data set as "your own data".

Writes the demo's train/val/test splits to ``OUT_DIR/{train,val,test}.{format}`` (and its personalities.txt)
in column names of their own (:data:`COLUMNS`: ``tone``, ``caption``, ``file``, ``more_captions``), the image
column holding the file name (``train0001.jpg``, looked for in the demo's ``img_addr``). The demo's tiny model
and data set are built first where they are missing (as ``finetune.py train --conf conf_examples/demo.json``
does). ``conf_examples/own_data_demo.json`` trains on the CSV export, offline:

    python3 -m utils.demo.export --format csv work_dirs/demo_csv
    python3 finetune.py train --conf conf_examples/own_data_demo.json

Files of the same name in OUT_DIR are replaced (an export is derived data: run it again for the same files).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional

from utils.core.errors import UsageError
from utils.core.layout import PERSONALITIES_FILE

logger = logging.getLogger('utils.demo.export')
FORMATS = ('csv', 'jsonl', 'parquet')
# the conf's "columns" of an export: field -> the export's column name (conf_examples/own_data_demo.json)
COLUMNS = {'style': 'tone', 'text': 'caption', 'image': 'file', 'references': 'more_captions'}
SPLITS = ('train', 'val', 'test')


def own_rows(pcap_rows: List[dict], file_attr: str, with_references: bool) -> List[dict]:
    """Personality-Captions rows in the export's column names; the image as its file name."""
    rows = []
    for r in pcap_rows:
        row = {COLUMNS['style']: r['personality'], COLUMNS['text']: r['comment'],
               COLUMNS['image']: r['image_hash'] + file_attr}
        if with_references:
            row[COLUMNS['references']] = list(r.get('additional_comments') or [])
        rows.append(row)
    return rows


def export_demo_data(dataset_path: str, out_dir: str, fmt: str, file_attr: str = '.jpg',
                     files: Optional[Dict[str, str]] = None) -> List[Path]:
    """Write the PCap splits of dataset_path (``files``: split -> file name, default ``{split}.json``) to
    out_dir in format fmt; returns the files written."""
    from utils.core.io import read_json
    from utils.core.errors import DataError
    from utils.data.rows import write_rows

    if fmt not in FORMATS:
        raise UsageError(f'--format must be one of {", ".join(FORMATS)}, got {fmt!r}')
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f'OUT_DIR {out_dir}: exists and is not a folder')
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for split in SPLITS:
        source = Path(dataset_path) / (files or {}).get(split, f'{split}.json')
        data = read_json(source, f'{split} file', DataError)
        written.append(write_rows(out / f'{split}.{fmt}', own_rows(data, file_attr, with_references=split != 'train')))
    styles = Path(dataset_path) / PERSONALITIES_FILE
    if styles.is_file():
        shutil.copyfile(styles, out / PERSONALITIES_FILE)
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python3 -m utils.demo.export', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('out_dir', metavar='OUT_DIR', help='folder for {train,val,test}.FORMAT and personalities.txt')
    p.add_argument('--format', choices=FORMATS, default='csv', help='file format (default: %(default)s)')
    p.add_argument('-c', '--conf', default=os.path.join('conf_examples', 'demo.json'),
                   help='the demo conf whose data set is exported (default: %(default)s)')
    p.add_argument('--debug', action='store_true', help='show the traceback of an error')
    return p


def run(args) -> int:
    from utils.core.conf import read_conf
    from utils.demo.data import ensure_demo_assets

    conf = read_conf(args.conf)
    if conf.data.demo:  # the demo's tiny model and data set, built where missing
        ensure_demo_assets(conf.model.model_name, conf.data.dataset_path, conf.data.img_addr,
                           conf.model.patch_image_size or 64)
    files = {split: getattr(conf.data, f'{split}_json') for split in SPLITS}
    written = export_demo_data(conf.data.dataset_path, args.out_dir, args.format, conf.data.file_attr, files)
    logger.info('demo data set exported to %s: %s (columns %s; images in %s)', os.path.abspath(args.out_dir),
                ', '.join(p.name for p in written), ', '.join(f'{k}: {v}' for k, v in COLUMNS.items()),
                os.path.abspath(conf.data.img_addr))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from utils.core.cli import run_reporting_errors
    from utils.core.logs import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging()
    return run_reporting_errors(lambda: run(args), debug=args.debug)


if __name__ == '__main__':
    sys.exit(main())
