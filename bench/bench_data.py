"""Reading a Personality-Captions-sized split (186,858 rows) in each format the toolkit reads.

    python3 -m bench.bench_data [--rows 186858]

For each format (PCap .json list, .jsonl, .csv, .parquet) it prints the time to read the split into
rows (image checks off: this measures the file reading), and the peak of Python-allocated memory
(tracemalloc) while reading, next to the size of the rows that come out. The tabular formats go through
HF datasets: a first read converts the file to a memory-mapped Arrow table (timed separately), later reads
reuse it.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import tracemalloc
from pathlib import Path

from utils.data.rows import write_rows


def make_rows(n: int):
    styles = [f'Style{i}' for i in range(215)]
    return [{'personality': styles[i % 215], 'comment': f'a caption number {i} about the picture in front of me',
             'image_hash': f'{i:032x}'} for i in range(n)]


def measure(path: Path):
    """(seconds, peak MB while reading, MB held by the rows read) - memory from a second, traced read."""
    from utils.data.rows import read_split
    t = time.perf_counter()
    rows, stats = read_split(path, '/images', '.jpg', 'train', check_images=False)
    seconds = time.perf_counter() - t
    del rows
    tracemalloc.start()
    rows, _ = read_split(path, '/images', '.jpg', 'train', check_images=False)
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return seconds, peak, held, stats.kept


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rows', type=int, default=186_858)
    args = parser.parse_args(argv)
    rows = make_rows(args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ['HF_DATASETS_CACHE'] = os.path.join(tmp, 'hf_cache')
        print(f'{args.rows} rows; machine: {os.cpu_count()} CPUs')
        print(f'{"format":8} {"file MB":>8} {"1st read s":>10} {"read s":>7} {"peak MB":>8} {"rows MB":>8}')
        print('(peak MB: Python allocations while reading; rows MB: what the rows read hold afterwards)')
        for fmt in ('json', 'jsonl', 'csv', 'parquet'):
            path = Path(tmp) / f'train.{fmt}'
            write_rows(path, rows)
            first = measure(path)[0]
            seconds, peak, held, n = measure(path)
            assert n == args.rows
            print(f'{fmt:8} {path.stat().st_size / 1e6:8.1f} {first:10.2f} {seconds:7.2f} {peak / 1e6:8.0f} '
                  f'{held / 1e6:8.0f}')


if __name__ == '__main__':
    main()
