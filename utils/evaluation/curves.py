"""Training curves: loss, learning rate and every validation metric against the iteration, as PNG files.

Sources in a work_dir (all optional; whatever is there is drawn, whatever is missing or broken is logged
and skipped, never raised):

- ``*.log.json``: ModelScope's TextLoggerHook, one JSON object per line
  (``{"mode": "train", "epoch": 1, "iter": 10, "lr": ..., "loss": ..., "time": ...}``). With its default
  ``by_epoch=True`` the ``iter`` is counted from 1 within each epoch; the global iteration is
  ``(epoch - 1) * iters_per_epoch + iter``, with ``iters_per_epoch`` read from the same run's text log
  (``{time}.log``: ``epoch [1][10/20]``). Several runs (resumes) are merged; a later run wins where they
  overlap.
- ``val_metrics.jsonl``: one validation per line,
  ``{"iteration": int, "epoch": int, "metrics": {"CIDEr": float, ...}, "seconds": float}``.

Files written (each replaced atomically, so a page or viewer never reads half a PNG):
``curves_loss.png`` (every loss-like value the trainer logs, one panel each), ``curves_lr.png`` and
``curves_validation.png`` (one panel per validation metric).

    python -m utils.curves WORK_DIR
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

from utils.core.layout import VAL_METRICS_FILE

logger = logging.getLogger(__name__)

CURVE_FILES = {'loss': 'curves_loss.png', 'lr': 'curves_lr.png', 'validation': 'curves_validation.png'}
# TextLoggerHook keys that are bookkeeping, not training signals
_NOT_PLOTTED = {'mode', 'epoch', 'iter', 'lr', 'iter_time', 'data_load_time', 'time', 'data_time', 'memory', 'eta'}
_TEXT_LOG_ITERS = re.compile(r'\[(\d+)\]\[(\d+)/(\d+)\]')

Series = Dict[str, List[Tuple[int, float]]]  # name -> [(iteration, value)]


def _number(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _iters_per_epoch(log_json: str) -> Optional[int]:
    """iters_per_epoch from the text log of the same run ({time}.log beside {time}.log.json)."""
    text_log = log_json[:-len('.json')]
    try:
        with open(text_log, encoding='utf-8', errors='replace') as f:
            for line in f:
                m = _TEXT_LOG_ITERS.search(line)
                if m:
                    return int(m.group(3))
    except OSError:
        pass
    return None


def _read_lines(path: str) -> List[dict]:
    """The JSON objects of a JSON-lines file; unreadable lines (e.g. one being written) are skipped."""
    out, bad = [], 0
    with open(path, encoding='utf-8', errors='replace') as f:
        for line in f:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(obj, dict):
                out.append(obj)
    if bad:
        logger.warning('%s: skipped %d unreadable line(s)', path, bad)
    return out


def _global_iters(lines: List[dict], ipe: Optional[int], path: str) -> List[Optional[int]]:
    """The global iteration of each train line."""
    pairs = [(ln.get('epoch'), ln.get('iter')) for ln in lines]
    if all(isinstance(e, int) and isinstance(i, int) for e, i in pairs):
        # already global when the iteration never restarts at a new epoch (TextLoggerHook by_epoch=False)
        if all(b[1] > a[1] for a, b in zip(pairs, pairs[1:])) and len({e for e, _ in pairs}) > 1:
            return [i for _, i in pairs]
        if ipe is None:
            ipe = max(i for _, i in pairs)
            if len({e for e, _ in pairs}) > 1:
                logger.warning('%s: no text log with the iterations per epoch; estimated %d from the log '
                               '(off by less than one log interval)', path, ipe)
        return [(e - 1) * ipe + i for e, i in pairs]
    return [i if isinstance(i, int) else None for _, i in pairs]


def read_train_log(work_dir: str) -> Tuple[Series, Series]:
    """(loss-like series, learning-rate series) from every ``*.log.json`` in work_dir, oldest run first."""
    losses: Dict[str, Dict[int, float]] = {}
    lrs: Dict[str, Dict[int, float]] = {}
    logs = sorted(glob.glob(os.path.join(glob.escape(work_dir), '*.log.json')), key=os.path.getmtime)
    for path in logs:
        try:
            lines = [ln for ln in _read_lines(path) if ln.get('mode', 'train') == 'train']
        except OSError as exc:
            logger.warning('%s: cannot read (%s)', path, exc)
            continue
        for line, it in zip(lines, _global_iters(lines, _iters_per_epoch(path), path)):
            if it is None:
                continue
            for key, value in line.items():
                if key == 'lr':
                    groups = value if isinstance(value, dict) else {'lr': value}
                    if isinstance(value, list):
                        groups = {f'lr[{i}]': v for i, v in enumerate(value)}
                    for name, v in groups.items():
                        if _number(v) is not None:
                            lrs.setdefault(str(name), {})[it] = _number(v)
                elif key not in _NOT_PLOTTED and _number(value) is not None:
                    losses.setdefault(key, {})[it] = _number(value)
    as_series = lambda d: {k: sorted(v.items()) for k, v in d.items() if v}  # noqa: E731
    return as_series(losses), as_series(lrs)


def read_val_metrics(work_dir: str) -> Series:
    """Validation metric -> [(iteration, value)] from ``val_metrics.jsonl`` (empty when absent)."""
    path = os.path.join(work_dir, VAL_METRICS_FILE)
    if not os.path.isfile(path):
        return {}
    series: Dict[str, Dict[int, float]] = {}
    for line in _read_lines(path):
        it, metrics = line.get('iteration'), line.get('metrics')
        if not isinstance(it, int) or not isinstance(metrics, dict):
            continue
        for name, value in metrics.items():
            if _number(value) is not None:
                series.setdefault(str(name), {})[it] = _number(value)
    return {k: sorted(v.items()) for k, v in series.items() if v}


def _plot(series: Series, title: str, ylabel_of, path: str, log_y: bool = False) -> str:
    """One PNG, one panel per series, written under a temporary name and renamed."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    names = sorted(series)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        xs, ys = zip(*series[name])
        ax.plot(xs, ys, marker='o' if len(xs) <= 30 else None, markersize=3, linewidth=1.2)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel('iteration')
        ax.set_ylabel(ylabel_of(name))
        if log_y and min(ys) > 0:
            ax.set_yscale('log')
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis('off')
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path + '.tmp.png'
    try:
        fig.savefig(tmp, dpi=90)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def current_curves(work_dir: str) -> List[str]:
    """The curve PNGs of work_dir, drawn again only where one is missing or older than the logs it comes
    from (training draws them at each validation and at its end; a report reuses them)."""
    sources = glob.glob(os.path.join(glob.escape(work_dir), '*.log.json')) + [os.path.join(work_dir, VAL_METRICS_FILE)]
    newest = max((os.path.getmtime(p) for p in sources if os.path.isfile(p)), default=0.0)
    pngs = [os.path.join(work_dir, name) for name in CURVE_FILES.values()]
    present = [p for p in pngs if os.path.isfile(p)]
    if present and all(os.path.getmtime(p) >= newest for p in present):
        return present
    return draw_curves(work_dir)


def draw_curves(work_dir: str) -> List[str]:
    """Draw every curve the files in work_dir allow; return the PNG paths written. Never raises: a missing,
    partial or broken source is logged as a warning and skipped."""
    written: List[str] = []
    try:
        if not os.path.isdir(work_dir):
            logger.warning('no curves: %s is not a directory', work_dir)
            return written
        losses, lrs = read_train_log(work_dir)
        val = read_val_metrics(work_dir)
    except Exception as exc:  # noqa: BLE001 - curves are a by-product; they must never stop a run
        logger.warning('no curves for %s: %s', work_dir, exc)
        return written
    plots = [('loss', losses, 'training loss', lambda n: n, False),
             ('lr', lrs, 'learning rate', lambda n: 'learning rate', False),
             ('validation', val, 'validation metrics', lambda n: n, False)]
    for key, series, title, ylabel, log_y in plots:
        if not series:
            continue
        try:
            written.append(_plot(series, title, ylabel, os.path.join(work_dir, CURVE_FILES[key]), log_y))
        except Exception as exc:  # noqa: BLE001
            logger.warning('could not draw %s curves in %s: %s', key, work_dir, exc)
    if not written:
        logger.warning('no curves for %s: no *.log.json with train lines and no %s', work_dir, VAL_METRICS_FILE)
    return written


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m utils.curves',
                                     description='Draw training curves (loss, learning rate, validation '
                                                 'metrics against iteration) as PNG files in WORK_DIR.')
    parser.add_argument('work_dir', help='a training work_dir (with *.log.json and/or val_metrics.jsonl)')
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    if not os.path.isdir(args.work_dir):
        print(f'error: work_dir {args.work_dir} does not exist', file=sys.stderr)
        return 2
    paths = draw_curves(args.work_dir)
    for path in paths:
        print(path)
    return 0 if paths else 1


if __name__ == '__main__':
    sys.exit(main())
