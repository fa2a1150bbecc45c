"""The metrics as a text table: x100 with one decimal (as Personality-Captions reports them), SPICE's status
when it has no value, and the style accuracy lines."""
from __future__ import annotations

from utils.evaluation.scoring import METRIC_NAMES


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
    lines += _weakest_styles(metrics)
    return '\n'.join(lines)


WEAKEST_SHOWN = 5


def weakest_styles_text(per_style: dict, k: int = WEAKEST_SHOWN) -> str:
    """The k styles learnt least (top-1 style accuracy, then CIDEr): "Anxious 12.5% (CIDEr 3.1), ..."."""
    from utils.evaluation.per_style import CIDER_KEY, ranked_styles
    pct = lambda v: 'n/a' if v is None else f'{100 * v:.1f}'  # noqa: E731
    worst = ranked_styles(per_style)[::-1][:k]
    return ', '.join(f'{name} {pct(e.get("style_accuracy_top1"))}% (CIDEr {pct(e.get(CIDER_KEY))})' for name, e in worst)


def _weakest_styles(metrics: dict) -> list[str]:
    per_style = metrics.get('per_style')
    if not per_style or len(per_style) < 2:
        return []
    return [f'styles learnt least (top-1 style accuracy, CIDEr x100; all {len(per_style)} in the JSON\'s per_style):',
            '  ' + weakest_styles_text(per_style)]


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
