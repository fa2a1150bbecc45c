"""``python -m utils.metrics RESULT_JSON [-o OUT.json] [--no-spice] [--conf C]``: score any result file
(an ``inference_*.json`` or ``eval_*.json``) with pycocoevalcap and the style classifier.

Style accuracy comes with the caption metrics when a style classifier is found: with ``--conf C`` the one of
C's train split, else the one kept in the model dir's ``style_classifier/``. Java must be on PATH.

Exit codes: 0 ok; 1 scoring or writing failed; 2 a malformed result file or a bad ``--conf``.

The command's table of contents:

* :mod:`utils.evaluation.results`  the result file: read, checked, scored (:func:`score_file`), the output path
* :mod:`utils.evaluation.scoring`  pycocoevalcap: tokenising, BLEU/METEOR/ROUGE-L/CIDEr, SPICE detection
* :mod:`utils.evaluation.table`    the metrics table printed
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from utils.core.errors import ResultFileError
from utils.core.io import write_json_atomic
from utils.evaluation.results import default_output_path, read_result_file, score_file
from utils.evaluation.scoring import exception_line
from utils.evaluation.table import format_table

logger = logging.getLogger('utils.metrics')  # also under python -m


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m utils.metrics',
        description='Score an inference JSON file with pycocoevalcap (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE).')
    parser.add_argument('inference_json', help='a result file (inference_*.json or eval_*.json): a "results" list of {caption, reference, ...}')
    parser.add_argument('-o', '--output', help='metrics JSON to write (default: <input stem>_metrics.json beside the input)')
    parser.add_argument('--no-spice', action='store_true', help='skip SPICE even if its jars are installed')
    parser.add_argument('--conf', help='style accuracy with the style classifier of this conf\'s train split '
                                       '(default: the one kept in the style_classifier/ of the model dir)')
    return parser


def _read_conf(path: str):
    """The --conf file as a Conf (its train split gives the style classifier), or ResultFileError."""
    from utils.core.errors import ConfError
    from utils.core.conf import read_conf
    try:
        return read_conf(path)
    except ConfError as exc:
        raise ResultFileError(f'--conf {path}: {exc}') from None


def _error(message: str) -> None:
    print(f'error: {" ".join(message.split())}', file=sys.stderr)


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry point; returns the exit code (0 ok, 2 bad input, 1 scoring/writing failed)."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    path = args.inference_json
    try:
        data = read_result_file(path)
        conf = _read_conf(args.conf) if args.conf else None
        scored = score_file(path, conf, spice=False if args.no_spice else None, data=data)
    except ResultFileError as exc:  # a malformed file: found by load_inference before any scoring
        _error(str(exc))
        return 2
    except (RuntimeError, ValueError, OSError) as exc:
        _error(f'{path}: scoring failed: {exception_line(exc)}')
        return 1
    metrics = scored['metrics']
    out = args.output or default_output_path(path)
    payload = {'input': path, 'metrics': metrics, 'n_scored': scored['n_scored'], 'n_skipped': scored['n_skipped']}
    try:
        write_json_atomic(out, payload)
    except OSError as exc:
        _error(f'{out}: cannot write metrics ({exc.strerror or exc})')
        return 1
    print(format_table(metrics))
    logger.info('scored %d rows (%d skipped without a reference); metrics written to %s',
                scored['n_scored'], scored['n_skipped'], out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
