"""Result files (``inference_*.json``, ``eval_*.json``: one schema) read and scored the one way the toolkit
scores: pycocoevalcap's metrics of every row with a reference (:mod:`utils.evaluation.scoring`) and the style
figures of the style classifier (:mod:`utils.evaluation.style_classifier`). A malformed file is a
``ResultFileError`` naming the file and row."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from utils.core.errors import ResultFileError, raise_system_failure
from utils.core.io import read_json
from utils.evaluation.per_style import per_style_figures
from utils.evaluation.scoring import score

logger = logging.getLogger(__name__)


def read_result_file(path: str):
    """Parsed JSON of path, or ResultFileError naming the file."""
    try:
        return read_json(path, 'result file', ResultFileError)
    except OSError as exc:  # e.g. no permission; a failing disk is not the file's fault
        raise_system_failure(exc)
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
    data = read_result_file(path) if data is None else data
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
                  ) -> tuple[dict, list[Optional[str]], Optional[tuple]]:
    """The style figures of a file's scored rows (see utils.evaluation.style_classifier), the predicted style of each
    scored row (None where a row has no "style") and the classifier's verdicts on the rows with a style
    (:func:`~utils.evaluation.style_classifier.judge`; None without a classifier). The classifier: with ``conf`` (a Conf), the one of that
    conf's train split (cached in its work_dir, and kept in ``model_dir`` when given); otherwise the copy kept
    in ``style_classifier/`` of the model dir the file names ("model" or "model_name"), or of ``output/``
    beside the file (a work_dir's default model)."""
    from utils.core.layout import OUTPUT_DIR
    from utils.evaluation.style_classifier import classifier_for_conf, find_carried_classifier, judge, style_figures

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
    rows = ([styles[i] for i in keep], [predictions[i] for i in keep], [references[i] for i in keep])
    verdicts = judge(classifier, *rows) if classifier is not None else None
    figures, predicted = style_figures(classifier, *rows, status, verdicts=verdicts)
    per_row: list[Optional[str]] = [None] * len(styles)
    for i, p in zip(keep, predicted):
        per_row[i] = p
    return figures, per_row, verdicts


def score_file(path: str, conf=None, spice: Optional[bool] = None, model_dir: Optional[str] = None,
               data=None) -> dict:
    """Score a result file (``inference_*.json`` or ``eval_*.json``: the same schema) the one way the toolkit
    scores: pycocoevalcap's metrics of every row with a reference, the style figures, and both per requested
    style (:mod:`utils.evaluation.per_style`: ``per_style``, ``style_confusions``). ``data``: the
    file's content when the caller has it (the file is then not read again). Returns
    ``{"metrics", "n_scored", "n_skipped", "predicted_styles"}`` (the last: one per results row, None for a
    row that was not scored). Raises ResultFileError for a malformed file."""
    data = read_result_file(path) if data is None else data
    predictions, references, kept, rows = load_inference(path, data)
    skipped = len(rows) - len(kept)
    if skipped:
        logger.warning('%s: skipped %d of %d rows that have no reference', path, skipped, len(rows))
    metrics = score(predictions, references, spice=spice, cider_per_caption=True)
    cider = metrics.pop('CIDEr_per_caption')
    styles = [rows[i].get('style') if isinstance(rows[i].get('style'), str) else None for i in kept]
    figures, predicted, verdicts = style_metrics(data, path, predictions, references, styles, conf, model_dir)
    metrics.update(figures)
    styled = [i for i, s in enumerate(styles) if s is not None]  # the rows the verdicts are of
    metrics.update(per_style_figures([styles[i] for i in styled], [cider[i] for i in styled],
                                     *(verdicts if verdicts is not None else (None, None))))
    per_row: list[Optional[str]] = [None] * len(rows)
    for i, p in zip(kept, predicted):
        per_row[i] = p
    return {'metrics': metrics, 'n_scored': len(predictions), 'n_skipped': skipped, 'predicted_styles': per_row}


def default_output_path(input_path: str) -> str:
    """<input dir>/<input stem>_metrics.json."""
    p = Path(input_path)
    return str(p.with_name(f'{p.stem}_metrics.json'))
