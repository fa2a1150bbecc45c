"""Per-style figures: which styles a model has learnt, and which it takes for one another.

For each requested style, over the scored rows that asked for it:

- ``rows``: how many rows asked for it;
- ``CIDEr_mean_of_captions``: the mean of each caption's own CIDEr-D, as pycocoevalcap's ``Cider`` computes it
  in **one call over all the scored rows** (the second value ``compute_score`` returns). Its document
  frequencies therefore come from the references of the whole scored set (the val rows in validation, the
  test rows in eval), not from the style's rows alone, so the figures of two styles are comparable, and the
  row-weighted mean of the per-style figures is the corpus ``CIDEr`` (which is the mean of the same
  per-caption scores). It is *not* the CIDEr of the style's rows scored as a corpus of their own: there,
  the words every row of a style shares (its stock phrasing) would count for nothing;
- ``style_accuracy_top1`` / ``_top5``: the share of its generated captions whose requested style the style
  classifier (:mod:`utils.evaluation.style_classifier`) ranks first / among its first five guesses;
- ``reference_style_accuracy_top1``: the same for the human references of its rows: the style's ceiling
  (a style people do not write recognisably is not a style the model failed to learn).

``style_confusions``: the most frequent (requested style -> the classifier's first guess) pairs where the two
differ, with their count and the share of the requested style's rows, most frequent first.

Without a classifier the accuracy figures are None (never a silent 0) and there are no confusions (None).
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

CIDER_KEY = 'CIDEr_mean_of_captions'
CONFUSIONS_KEPT = 50  # pairs kept in the JSON (most frequent first)


def cider_note(n_rows: int) -> str:
    """What ``CIDEr_mean_of_captions`` is, for the JSON beside it."""
    return (f'{CIDER_KEY}: the mean over the style\'s rows of each caption\'s CIDEr-D, computed by one pycocoevalcap '
            f'Cider call over all {n_rows} scored rows (document frequencies from all their references); the '
            'row-weighted mean over the styles is the corpus CIDEr')


def per_style_figures(styles: Sequence[str], cider: Sequence[float],
                      ranked: Optional[Sequence[Sequence[str]]] = None,
                      reference_hits: Optional[Sequence[Tuple[int, int, int]]] = None) -> dict:
    """``{"per_style": {style: {...}}, "per_style_note": str, "style_confusions": [...] or None}``.

    Args:
        styles: the requested style of each scored row.
        cider: each row's caption's CIDEr-D (from one pycocoevalcap call over all these rows).
        ranked: the classifier's guesses for each row's generated caption, best first (None: no classifier).
        reference_hits: for each row, (its references the classifier ranks first for the row's style, those it
            ranks among its first five, its number of references)
            (:func:`utils.evaluation.style_classifier.reference_hits`; None: no classifier).
    """
    if len(cider) != len(styles) or (ranked is not None and len(ranked) != len(styles)) \
            or (reference_hits is not None and len(reference_hits) != len(styles)):
        raise ValueError('per-style figures need one style, one CIDEr and one verdict per row')
    rows: Dict[str, List[int]] = {}
    for i, style in enumerate(styles):
        rows.setdefault(style, []).append(i)
    out: Dict[str, dict] = {}
    for style in sorted(rows):
        idx = rows[style]
        entry = {'rows': len(idx), CIDER_KEY: sum(float(cider[i]) for i in idx) / len(idx),
                 'style_accuracy_top1': None, 'style_accuracy_top5': None, 'reference_style_accuracy_top1': None}
        if ranked is not None:
            entry['style_accuracy_top1'] = sum(bool(ranked[i]) and ranked[i][0] == style for i in idx) / len(idx)
            entry['style_accuracy_top5'] = sum(style in list(ranked[i])[:5] for i in idx) / len(idx)
        if reference_hits is not None:
            hits, total = sum(reference_hits[i][0] for i in idx), sum(reference_hits[i][2] for i in idx)
            entry['reference_style_accuracy_top1'] = hits / total if total else None
        out[style] = entry
    return {'per_style': out, 'per_style_note': cider_note(len(styles)),
            'style_confusions': None if ranked is None else confusions(styles, [r[0] if r else None for r in ranked])}


def confusions(styles: Sequence[str], predicted: Sequence[Optional[str]], keep: int = CONFUSIONS_KEPT) -> List[dict]:
    """The ``keep`` most frequent (requested -> predicted) pairs where the two differ: ``[{"target", "predicted",
    "count", "share"}]`` (share: of the requested style's rows), most frequent first, then by name."""
    per_target = Counter(styles)
    pairs = Counter((s, p) for s, p in zip(styles, predicted) if p is not None and p != s)
    ordered = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0][0], kv[0][1]))[:keep]
    return [{'target': t, 'predicted': p, 'count': n, 'share': n / per_target[t]} for (t, p), n in ordered]


def ranked_styles(per_style: Dict[str, dict]) -> List[Tuple[str, dict]]:
    """The styles best first: by top-1 style accuracy (where there is one), then by CIDEr, then by name."""
    def key(item):
        name, e = item
        acc = e.get('style_accuracy_top1')
        return (-(acc if acc is not None else -1.0), -(e.get(CIDER_KEY) or 0.0), name)
    return sorted(per_style.items(), key=key)
