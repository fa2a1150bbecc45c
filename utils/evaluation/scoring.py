"""Caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE) computed with pycocoevalcap.

The flow is pycocoevalcap's own ``COCOEvalCap.evaluate``: every prediction and every
reference goes through pycocoevalcap's ``PTBTokenizer`` (fed ``{id: [{"caption": text}]}``),
then each scorer's ``compute_score(gts, res)`` runs once over all samples. Metric names and
values are pycocoevalcap's own: ``Bleu_1`` .. ``Bleu_4``, ``METEOR``, ``ROUGE_L``, ``CIDEr``,
``SPICE`` on its native scale (0-1; CIDEr-D as pycocoevalcap computes it may exceed 1).
Only :func:`utils.evaluation.table.format_table` multiplies by 100 for display.

SPICE needs Stanford CoreNLP 3.6.0 jars that pycocoevalcap downloads on first use. Their
absence is detected before SPICE is touched, so no download is attempted; SPICE is then
reported as ``None`` with a ``spice_status`` line giving the command that installs the jars.

METEOR is a Java process (~10 s to start): :func:`score` starts and stops one per call, or uses one
kept running by :func:`start_meteor` / :func:`stop_meteor` (training's validations); inside
:func:`shared_meteor` all of them use one (the test session's).

Java must be on PATH (the PTB tokenizer, METEOR and SPICE are Java programs). Result files, style
accuracy and the command line: :mod:`utils.evaluation.results`, :mod:`utils.metrics`.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
from typing import Iterator, Optional

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import get_stanford_models as _stanford_models
from pycocoevalcap.spice.spice import Spice
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from utils.core.conf import VAL_METRICS
from utils.core.errors import first_line

logger = logging.getLogger(__name__)

METRIC_NAMES = VAL_METRICS  # pycocoevalcap's names, in table order (declared once, in utils/core/conf.py)
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


def exception_line(exc: BaseException) -> str:
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
        return None, f'SPICE unavailable: SPICE failed at run time: {exception_line(exc)}'
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


_sharing = False  # inside shared_meteor(): every METEOR asked for is _shared, started on first use
_shared: Optional[Meteor] = None


@contextlib.contextmanager
def shared_meteor() -> Iterator[None]:
    """Inside the block, every :func:`score` and :func:`start_meteor` uses one METEOR process, started on
    first use and stopped when the block ends (e.g. a test session, where each eval would start its own)."""
    global _sharing, _shared
    if _sharing:
        yield
        return
    _sharing = True
    try:
        yield
    finally:
        meteor, _sharing, _shared = _shared, False, None
        if meteor is not None:
            _stop_meteor(meteor)


def _new_meteor() -> Meteor:
    global _shared
    if not _sharing:
        return Meteor()
    if _shared is None:
        _shared = Meteor()
    return _shared


@contextlib.contextmanager
def _meteor_scorer() -> Iterator[Meteor]:
    """Start pycocoevalcap's METEOR (a Java process, ~10 s to load) and always stop it afterwards."""
    meteor = _new_meteor()
    try:
        yield meteor
    finally:
        stop_meteor(meteor)


def start_meteor() -> Meteor:
    """A METEOR scorer for several :func:`score` calls; end it with :func:`stop_meteor`."""
    return _new_meteor()


def stop_meteor(meteor: Meteor) -> None:
    global _shared
    if meteor is _shared and not meteor.lock.locked():
        return  # shared_meteor() stops it; one left locked by a failed call is replaced
    if meteor is _shared:
        _shared = None
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


def _standard_scores(gts: dict, res: dict, meteor: Meteor) -> tuple[dict, list[float]]:
    """(BLEU-1..4, ROUGE-L, CIDEr and METEOR, each scorer called once over all samples; each sample's own
    CIDEr-D from the same Cider call, whose mean is the corpus CIDEr)."""
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)  # verbose=1 (the default) prints to stdout
    scores = dict(zip(BLEU_NAMES, bleu))
    scores['ROUGE_L'], _ = Rouge().compute_score(gts, res)
    scores['CIDEr'], per_caption = Cider().compute_score(gts, res)
    scores['METEOR'], _ = meteor.compute_score(gts, res)
    return {name: float(value) for name, value in scores.items()}, [float(v) for v in per_caption]


def score(predictions: list[str], references: list[list[str]], spice: Optional[bool] = None,
          meteor: Optional[Meteor] = None, cider_per_caption: bool = False) -> dict:
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
        cider_per_caption: also return ``"CIDEr_per_caption"``, each sample's own CIDEr-D from the
            same pycocoevalcap call (document frequencies from all the samples' references; their mean
            is ``CIDEr``), for the per-style figures (:mod:`utils.evaluation.per_style`).

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
        values, per_caption = _standard_scores(gts, res, meteor)
    values['SPICE'], spice_status = _spice_score(gts, res, spice)
    result = {name: values[name] for name in METRIC_NAMES}
    result.update(n_samples=n, spice_status=spice_status)
    if cider_per_caption:
        result['CIDEr_per_caption'] = per_caption
    return result
