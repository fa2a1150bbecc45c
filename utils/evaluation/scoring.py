"""Caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE) computed with pycocoevalcap.

The flow is pycocoevalcap's own ``COCOEvalCap.evaluate``: every prediction and every
reference goes through pycocoevalcap's ``PTBTokenizer`` (fed ``{id: [{"caption": text}]}``),
then each scorer's ``compute_score(gts, res)`` runs once over all samples. Metric names and
values are pycocoevalcap's own: ``Bleu_1`` .. ``Bleu_4``, ``METEOR``, ``ROUGE_L``, ``CIDEr``,
``SPICE`` on its native scale (0-1; CIDEr-D as pycocoevalcap computes it may exceed 1).
Only :func:`format_table` multiplies by 100 for display.

SPICE needs Stanford CoreNLP 3.6.0 jars that pycocoevalcap downloads on first use. Their
absence is detected before SPICE is touched, so no download is attempted; SPICE is then
reported as ``None`` with a ``spice_status`` line giving the command that installs the jars.

Command line::

    python -m utils.metrics INFERENCE_JSON [-o OUT.json] [--no-spice] [--conf C]

Style accuracy (utils.style_classifier) comes with the caption metrics when a style classifier is found:
with ``--conf C`` the one of C's train split, else the one kept in the model dir's ``style_classifier/``.

Java must be on PATH (the PTB tokenizer, METEOR and SPICE are Java programs).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Iterator, Optional

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import get_stanford_models as _stanford_models
from pycocoevalcap.spice.spice import Spice
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from utils.core.conf import VAL_METRICS
from utils.core.errors import ResultFileError, first_line
from utils.core.io import read_json, write_json_atomic

logger = logging.getLogger(__name__)

METRIC_NAMES = VAL_METRICS  # pycocoevalcap's names, in table order (declared once, in utils/conf.py)
BLEU_NAMES = METRIC_NAMES[:4]
SPICE_INSTALL_COMMAND = ('python -c "from pycocoevalcap.spice.get_stanford_models '
                         'import get_stanford_models; get_stanford_models()"')
SPICE_SKIPPED = 'SPICE skipped (not requested)'
SPICE_COMPUTED = 'SPICE computed'

# Characters that end a line for Java's PTBTokenizer or for str.splitlines(). pycocoevalcap
# only replaces '\n'; any other one (e.g. '\r', '\u2028') splits a caption in two and shifts
# every later caption onto the wrong sample, so all of them become spaces.
_LINE_BREAKS = str.maketrans({ch: ' ' for ch in '\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029'})


# ---------------------------------------------------------------- SPICE detection

def spice_jar_paths() -> list[str]:
    """Paths of the two Stanford CoreNLP 3.6.0 jars that SPICE needs (inside pycocoevalcap)."""
    lib = os.path.join(_stanford_models.SPICEDIR, _stanford_models.SPICELIB)
    return [os.path.join(lib, f'{_stanford_models.JAR}{suffix}.jar') for suffix in ('', '-models')]


def missing_spice_jars() -> list[str]:
    """The SPICE CoreNLP jars that are not installed (empty when SPICE can run)."""
    return [path for path in spice_jar_paths() if not os.path.isfile(path)]


def spice_unavailable_reason() -> Optional[str]:
    """Why SPICE cannot run (with the command that fixes it), or None if its jars are present."""
    missing = missing_spice_jars()
    if not missing:
        return None
    names = ', '.join(os.path.basename(p) for p in missing)
    return (f'SPICE unavailable: Stanford CoreNLP jars missing ({names} in '
            f'{os.path.dirname(missing[0])}); install them (needs network) with: '
            f'{SPICE_INSTALL_COMMAND}')


def _first_line(exc: BaseException) -> str:
    """Exception type plus the first line of its message."""
    line = first_line(exc)
    return f'{type(exc).__name__}: {line}' if line else type(exc).__name__


def _spice_score(gts: dict, res: dict, spice: Optional[bool]) -> tuple[Optional[float], str]:
    """(SPICE value or None, status line). Never raises and never triggers the jar download."""
    if spice is False:
        return None, SPICE_SKIPPED
    reason = spice_unavailable_reason()
    if reason is not None:
        if spice:
            logger.warning('%s', reason)
        return None, reason
    logger.info('computing SPICE on %d samples', len(res))
    try:
        value, _ = Spice().compute_score(gts, res)
        value = float(value)
    except Exception as exc:  # noqa: BLE001 - SPICE must never take the other metrics down
        logger.warning('SPICE failed: %s', exc)
        return None, f'SPICE unavailable: SPICE failed at run time: {_first_line(exc)}'
    if not math.isfinite(value):
        return None, 'SPICE unavailable: SPICE returned no score (NaN)'
    return value, SPICE_COMPUTED


# ---------------------------------------------------------------- tokenising and scoring

def _check_inputs(predictions: list[str], references: list[list[str]]) -> None:
    """Raise ValueError unless there is >= 1 sample, one prediction each, each with >= 1 reference."""
    if isinstance(predictions, str) or isinstance(references, str):
        raise ValueError('predictions must be a list of strings and references a list of lists of strings')
    if len(predictions) != len(references):
        raise ValueError(f'got {len(predictions)} predictions but {len(references)} reference lists; '
                         'need exactly one reference list per prediction')
    if not predictions:
        raise ValueError('no samples to score: predictions and references are empty')
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        if not isinstance(pred, str):
            raise ValueError(f'prediction {i} must be a string, got {type(pred).__name__}')
        if isinstance(refs, str) or not isinstance(refs, (list, tuple)):
            raise ValueError(f'references[{i}] must be a list of strings, got {type(refs).__name__}')
        if not refs:
            raise ValueError(f'references[{i}] is empty: every prediction needs at least one reference')
        if not all(isinstance(r, str) for r in refs):
            raise ValueError(f'references[{i}] must contain only strings')


def _require_java() -> None:
    """pycocoevalcap's tokenizer and METEOR shell out to `java`; fail clearly without it."""
    if shutil.which('java') is None:
        raise RuntimeError('`java` not found on PATH: pycocoevalcap\'s PTB tokenizer and METEOR need a Java runtime')


def _as_coco(texts_per_sample: list[list[str]]) -> dict:
    """{sample index: [{"caption": text}, ...]}, the input PTBTokenizer.tokenize expects."""
    return {i: [{'caption': t.translate(_LINE_BREAKS)} for t in texts]
            for i, texts in enumerate(texts_per_sample)}


def tokenize(predictions: list[str], references: list[list[str]]) -> tuple[dict, dict]:
    """(gts, res) as COCOEvalCap builds them: PTB-tokenised, lower-cased, punctuation removed.

    gts maps sample index -> list of tokenised references, res maps it -> [tokenised prediction].
    """
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize(_as_coco(references))
    res = tokenizer.tokenize(_as_coco([[p] for p in predictions]))
    aligned = (list(gts) == list(range(len(references))) and list(res) == list(range(len(predictions)))
               and all(len(gts[i]) == len(refs) for i, refs in enumerate(references)))
    if not aligned:
        raise RuntimeError('pycocoevalcap\'s PTB tokenizer returned output that does not line up with the input')
    return gts, res


@contextlib.contextmanager
def _meteor_scorer() -> Iterator[Meteor]:
    """Start pycocoevalcap's METEOR (a Java process, ~10 s to load) and always stop it afterwards."""
    meteor = Meteor()
    try:
        yield meteor
    finally:
        _stop_meteor(meteor)


def start_meteor() -> Meteor:
    """A METEOR scorer for several :func:`score` calls; end it with :func:`stop_meteor`."""
    return Meteor()


def stop_meteor(meteor: Meteor) -> None:
    _stop_meteor(meteor)


def _stop_meteor(meteor: Meteor) -> None:
    """End METEOR's Java process now. Meteor.compute_score keeps its lock if it raised, and
    Meteor.__del__ would then block forever, so the lock is released first."""
    if meteor.lock.locked():
        meteor.lock.release()
    with contextlib.suppress(OSError):
        meteor.meteor_p.stdin.close()
    meteor.meteor_p.kill()
    meteor.meteor_p.wait()


def _standard_scores(gts: dict, res: dict, meteor: Meteor) -> dict:
    """BLEU-1..4, ROUGE-L, CIDEr and METEOR, each scorer called once over all samples."""
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)  # verbose=1 (the default) prints to stdout
    scores = dict(zip(BLEU_NAMES, bleu))
    scores['ROUGE_L'], _ = Rouge().compute_score(gts, res)
    scores['CIDEr'], _ = Cider().compute_score(gts, res)
    scores['METEOR'], _ = meteor.compute_score(gts, res)
    return {name: float(value) for name, value in scores.items()}


def score(predictions: list[str], references: list[list[str]], spice: Optional[bool] = None,
          meteor: Optional[Meteor] = None) -> dict:
    """Score one prediction per sample against all of that sample's references.

    Args:
        predictions: the generated caption of each sample.
        references: for each sample, its 1..N reference captions (all of them count).
        spice: None = compute SPICE if its CoreNLP jars are installed, else report it
            unavailable; False = skip it; True = compute it (still None, with a warning,
            if the jars are missing - they are never downloaded from here).
        meteor: a running METEOR scorer to use (and leave running), e.g. one kept for all the
            validations of a training run: its Java process takes ~10 s to start. None: one is
            started and stopped for this call.

    Returns:
        ``{"Bleu_1": .., "Bleu_2": .., "Bleu_3": .., "Bleu_4": .., "METEOR": .., "ROUGE_L": ..,
        "CIDEr": .., "SPICE": float or None, "n_samples": int, "spice_status": str}`` with
        corpus-level values on pycocoevalcap's native scale (0-1, not x100). SPICE is None
        (never 0) when it was skipped or could not run; spice_status says why.

    Raises:
        ValueError: lengths differ, a reference list is empty, or there are no samples.
        RuntimeError: Java is missing or the tokenizer output does not line up.
    """
    _check_inputs(predictions, references)
    _require_java()
    n = len(predictions)
    logger.info('scoring %d predictions against %d references', n, sum(len(r) for r in references))
    running = contextlib.nullcontext(meteor) if meteor is not None else _meteor_scorer()
    with running as meteor:  # METEOR loads in the background while the rest runs
        gts, res = tokenize(predictions, references)
        values = _standard_scores(gts, res, meteor)
    values['SPICE'], spice_status = _spice_score(gts, res, spice)
    result = {name: values[name] for name in METRIC_NAMES}
    result.update(n_samples=n, spice_status=spice_status)
    return result


def format_table(metrics: dict) -> str:
    """A two-column text table of the metrics x100 with one decimal (as Personality-Captions
    reports them); SPICE shows "n/a" plus its status line when it has no value."""
    lines = ['metric     score (x100)']
    if metrics.get('n_samples') is not None:
        lines[0] += f'   n={metrics["n_samples"]}'
    for name in METRIC_NAMES:
        if name not in metrics:
            continue
        value = metrics[name]
        lines.append(f'{name:<10} {"n/a" if value is None else f"{100 * value:.1f}":>12}')
    if metrics.get('SPICE', 0) is None and metrics.get('spice_status'):
        lines.append(metrics['spice_status'])
    lines += _style_lines(metrics)
    return '\n'.join(lines)


def _style_lines(metrics: dict) -> list[str]:
    """Style accuracy (x100) of the generated captions, its ceiling (the references) and chance."""
    if 'style_accuracy_top1' not in metrics:
        return []
    if metrics['style_accuracy_top1'] is None:
        return [metrics.get('style_status') or 'style accuracy unavailable']
    pct = lambda v: 'n/a' if v is None else f'{100 * v:.1f}'  # noqa: E731
    chance = metrics.get('style_chance_top1')
    return ['style accuracy          top-1   top-5',
            f'  generated captions  {pct(metrics["style_accuracy_top1"]):>7} {pct(metrics.get("style_accuracy_top5")):>7}',
            f'  references (ceiling){pct(metrics.get("reference_style_accuracy_top1")):>7} '
            f'{pct(metrics.get("reference_style_accuracy_top5")):>7}',
            f'  chance              {pct(chance):>7} {pct(None if chance is None else min(1.0, 5 * chance)):>7}']


# ---------------------------------------------------------------- command line

def _read_json(path: str):
    """Parsed JSON of path, or ResultFileError naming the file."""
    try:
        return read_json(path, 'result file', ResultFileError)
    except OSError as exc:
        raise ResultFileError(f'{path}: cannot read ({exc.strerror or exc})') from None


def _row_references(row: dict, where: str) -> Optional[list[str]]:
    """The row's non-blank references, or None when it has none (missing, null, "" or [])."""
    ref = row.get('reference')
    if isinstance(ref, str):
        refs = [ref]
    elif ref is None or isinstance(ref, list):
        refs = ref or []
        if not all(isinstance(r, str) for r in refs):
            raise ResultFileError(f'{where}: "reference" list must contain only strings')
    else:
        raise ResultFileError(f'{where}: "reference" must be a string or a list of strings, got {type(ref).__name__}')
    refs = [r for r in refs if r.strip()]
    return refs or None


def load_inference(path: str, data=None) -> tuple[list[str], list[list[str]], list[int], list]:
    """(predictions, references, indices of the scored rows, all results rows) of a result file, read once.

    The file is ``{"model_name", "model_revision", "n_eval_sample", "results": [{"style",
    "image", "caption", "reference"}, ...]}`` with "reference" a string or a list of strings.
    Rows without a reference are not scored (the caller counts them). Rows are numbered from 1 in
    messages. Raises ResultFileError for a malformed file.
    """
    data = _read_json(path) if data is None else data
    results = data.get('results') if isinstance(data, dict) else None
    if not isinstance(results, list):
        raise ResultFileError(f'{path}: expected a JSON object with a "results" list')
    predictions, references, kept = [], [], []
    for i, row in enumerate(results):
        where = f'{path}: results row {i + 1} (results[{i}])'
        if not isinstance(row, dict):
            raise ResultFileError(f'{where}: expected an object, got {type(row).__name__}')
        caption = row.get('caption')
        if not isinstance(caption, str):
            got = 'nothing' if caption is None else type(caption).__name__
            raise ResultFileError(f'{where}: "caption" must be a string, got {got}')
        refs = _row_references(row, where)
        if refs is None:
            continue
        predictions.append(caption)
        references.append(refs)
        kept.append(i)
    if not predictions:
        raise ResultFileError(f'{path}: none of the {len(results)} results rows has a reference to score against')
    return predictions, references, kept, results


def style_metrics(data: dict, path: str, predictions: list[str], references: list[list[str]],
                  styles: list[Optional[str]], conf=None, model_dir: Optional[str] = None
                  ) -> tuple[dict, list[Optional[str]]]:
    """The style figures of a file's scored rows (see utils.style_classifier) and the predicted style of each
    scored row (None where a row has no "style"). The classifier: with ``conf`` (a Conf), the one of that
    conf's train split (cached in its work_dir, and kept in ``model_dir`` when given); otherwise the copy kept
    in ``style_classifier/`` of the model dir the file names ("model" or "model_name"), or of ``output/``
    beside the file (a work_dir's default model)."""
    from utils.core.layout import OUTPUT_DIR
    from utils.evaluation.style_classifier import classifier_for_conf, find_carried_classifier, style_figures

    if conf is not None:
        classifier, status = classifier_for_conf(conf, model_dir)
    else:
        named = [data.get(k) for k in ('model', 'model_name') if isinstance(data.get(k), str)]
        classifier, status = find_carried_classifier(
            named + [os.path.join(os.path.dirname(os.path.abspath(path)), OUTPUT_DIR)])
    keep = [i for i, s in enumerate(styles) if s is not None]
    if classifier is not None and len(keep) < len(styles):
        logger.warning('%s: %d scored rows have no "style"; style accuracy covers the other %d',
                       path, len(styles) - len(keep), len(keep))
    figures, predicted = style_figures(classifier, [styles[i] for i in keep], [predictions[i] for i in keep],
                                       [references[i] for i in keep], status)
    per_row: list[Optional[str]] = [None] * len(styles)
    for i, p in zip(keep, predicted):
        per_row[i] = p
    return figures, per_row


def score_file(path: str, conf=None, spice: Optional[bool] = None, model_dir: Optional[str] = None,
               data=None) -> dict:
    """Score a result file (``inference_*.json`` or ``eval_*.json``: the same schema) the one way the toolkit
    scores: pycocoevalcap's metrics of every row with a reference, and the style figures. ``data``: the
    file's content when the caller has it (the file is then not read again). Returns
    ``{"metrics", "n_scored", "n_skipped", "predicted_styles"}`` (the last: one per results row, None for a
    row that was not scored). Raises ResultFileError for a malformed file."""
    data = _read_json(path) if data is None else data
    predictions, references, kept, rows = load_inference(path, data)
    skipped = len(rows) - len(kept)
    if skipped:
        logger.warning('%s: skipped %d of %d rows that have no reference', path, skipped, len(rows))
    metrics = score(predictions, references, spice=spice)
    styles = [rows[i].get('style') if isinstance(rows[i].get('style'), str) else None for i in kept]
    figures, predicted = style_metrics(data, path, predictions, references, styles, conf, model_dir)
    metrics.update(figures)
    per_row: list[Optional[str]] = [None] * len(rows)
    for i, p in zip(kept, predicted):
        per_row[i] = p
    return {'metrics': metrics, 'n_scored': len(predictions), 'n_skipped': skipped, 'predicted_styles': per_row}


def default_output_path(input_path: str) -> str:
    """<input dir>/<input stem>_metrics.json."""
    p = Path(input_path)
    return str(p.with_name(f'{p.stem}_metrics.json'))


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
        data = _read_json(path)
        conf = _read_conf(args.conf) if args.conf else None
        scored = score_file(path, conf, spice=False if args.no_spice else None, data=data)
    except ResultFileError as exc:  # a malformed file: found by load_inference before any scoring
        _error(str(exc))
        return 2
    except (RuntimeError, ValueError, OSError) as exc:
        _error(f'{path}: scoring failed: {_first_line(exc)}')
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
