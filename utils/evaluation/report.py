"""``eval_{time}.html``: one self-contained page beside ``eval_{time}.json`` (nothing it shows is fetched:
thumbnails and curves are embedded as base64 data URIs). Every text from the data is HTML-escaped.

The page: the run (model, checkpoint, settings, style-blind or not), the caption metrics table, the style
accuracy of the generated captions next to its ceiling (the human references) and chance, the styles the
model has learnt best and worst and the pairs of styles it confuses most (:mod:`utils.evaluation.per_style`),
the training curves of the work_dir, and a sample of rows (image, requested style, generated caption,
references, predicted style).
"""
from __future__ import annotations

import base64
import html
import io
import logging
import os
from typing import List, Optional

logger = logging.getLogger(__name__)

SAMPLE_ROWS = 48       # rows shown, spread evenly over the predictions
STYLES_SHOWN = 10      # best and worst styles shown (all of them when there are at most twice as many)
PAIRS_SHOWN = 15       # most confused (requested -> predicted) pairs shown
THUMBNAIL_PX = 160     # longest side of an embedded thumbnail

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:1.5em;margin-bottom:4px} h2{font-size:1.15em;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse} td,th{padding:4px 10px;text-align:left;vertical-align:top}
.metrics td:nth-child(2){text-align:right;font-variant-numeric:tabular-nums}
.rows td{border-top:1px solid #eee} .rows img{display:block;border-radius:4px}
.meta{color:#555;font-size:.9em} .blind{background:#fde2c0;padding:6px 10px;border-radius:4px;display:inline-block}
.bar{background:#eef;height:16px;width:320px;position:relative;border-radius:3px}
.bar span{display:block;height:100%;border-radius:3px}
.hit{color:#1a7f37;font-weight:600} .miss{color:#c0392b;font-weight:600}
.curves img{max-width:100%;border:1px solid #eee;margin:6px 0} ul{margin:0;padding-left:18px}
.styles td:nth-child(n+2),.pairs td:nth-child(n+3){text-align:right;font-variant-numeric:tabular-nums}
.styles .bar{width:100px} .styles td,.styles th{padding:3px 7px}
.cols{display:flex;gap:28px;flex-wrap:wrap} .cols h3{font-size:1em;margin:8px 0}
"""


def _e(value) -> str:
    return html.escape('' if value is None else str(value), quote=True)


def _data_uri(data: bytes, mime: str) -> str:
    return f'data:{mime};base64,{base64.b64encode(data).decode("ascii")}'


def thumbnail(path: str, size: int = THUMBNAIL_PX) -> Optional[str]:
    """A JPEG data URI of the image, at most size px on its longest side; None if unreadable."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im = im.convert('RGB')
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format='JPEG', quality=85)
    except Exception as exc:  # noqa: BLE001 - a bad image must not stop the report
        logger.warning('report: no thumbnail for %s (%s)', path, exc)
        return None
    return _data_uri(buf.getvalue(), 'image/jpeg')


def _pct(value) -> str:
    return 'n/a' if value is None else f'{100 * value:.1f}'


def _bar(value, colour: str) -> str:
    width = 0 if value is None else max(0.0, min(1.0, value)) * 100
    return f'<div class="bar"><span style="width:{width:.1f}%;background:{colour}"></span></div>'


def _metrics_table(metrics: dict) -> str:
    from utils.evaluation.scoring import METRIC_NAMES
    rows = ''.join(f'<tr><td>{_e(n)}</td><td>{_e(_pct(metrics.get(n)))}</td></tr>'
                   for n in METRIC_NAMES if n in metrics)
    note = f'<p class="meta">{_e(metrics.get("spice_status"))}</p>' if metrics.get('SPICE') is None else ''
    return f'<table class="metrics"><tr><th>metric</th><th>score (x100)</th></tr>{rows}</table>{note}'


def _style_section(metrics: dict) -> str:
    if metrics.get('style_accuracy_top1') is None:
        return f'<p>{_e(metrics.get("style_status") or "style accuracy unavailable")}</p>'
    lines = [('generated captions', 'style_accuracy_top1', 'style_accuracy_top5', '#2e86de'),
             ('human references (ceiling)', 'reference_style_accuracy_top1', 'reference_style_accuracy_top5',
              '#27ae60')]
    rows = ''.join(
        f'<tr><td>{_e(label)}</td><td>{_bar(metrics.get(k1), colour)}</td><td>{_e(_pct(metrics.get(k1)))}</td>'
        f'<td>{_e(_pct(metrics.get(k5)))}</td></tr>' for label, k1, k5, colour in lines)
    chance = metrics.get('style_chance_top1')
    rows += (f'<tr><td>chance</td><td>{_bar(chance, "#999")}</td><td>{_e(_pct(chance))}</td>'
             f'<td>{_e(_pct(None if chance is None else min(1.0, 5 * chance)))}</td></tr>')
    return (f'<table class="style"><tr><th></th><th>top-1</th><th>top-1 %</th><th>top-5 %</th></tr>{rows}</table>'
            f'<p class="meta">{_e(metrics.get("style_status"))}</p>')


def _styles_table(entries) -> str:
    from utils.evaluation.per_style import CIDER_KEY
    rows = ''.join(
        f'<tr><td>{_e(name)}</td><td>{_e(e.get("rows"))}</td>'
        f'<td>{_bar(e.get("style_accuracy_top1"), "#2e86de")}</td><td>{_e(_pct(e.get("style_accuracy_top1")))}</td>'
        f'<td>{_e(_pct(e.get("reference_style_accuracy_top1")))}</td><td>{_e(_pct(e.get(CIDER_KEY)))}</td></tr>'
        for name, e in entries)
    return ('<table class="styles"><tr><th>style</th><th>rows</th><th>style accuracy top-1</th><th>%</th>'
            f'<th>ceiling %</th><th>CIDEr</th></tr>{rows}</table>')


def _per_style_section(metrics: dict) -> str:
    """The best and worst styles (top-1 style accuracy, then CIDEr) and the most confused pairs."""
    from utils.evaluation.per_style import ranked_styles
    per_style = metrics.get('per_style')
    if not per_style:
        return '<p class="meta">no per-style figures in this result</p>'
    ranked = ranked_styles(per_style)
    note = (f'<p class="meta">{_e(len(ranked))} styles, ranked by the top-1 style accuracy of their generated '
            'captions, then by CIDEr. Ceiling: the top-1 style accuracy of their human references. CIDEr: the mean '
            'of the captions\' own CIDEr-D (x100), document frequencies from all the scored rows.</p>')
    if len(ranked) <= 2 * STYLES_SHOWN:
        tables = f'<div class="cols"><div id="all-styles"><h3>every style, best first</h3>{_styles_table(ranked)}</div></div>'
    else:
        tables = (f'<div class="cols"><div id="worst-styles"><h3>the {STYLES_SHOWN} styles learnt least</h3>'
                  f'{_styles_table(ranked[::-1][:STYLES_SHOWN])}</div>'
                  f'<div id="best-styles"><h3>the {STYLES_SHOWN} styles learnt best</h3>'
                  f'{_styles_table(ranked[:STYLES_SHOWN])}</div></div>')
    pairs = metrics.get('style_confusions')
    if pairs is None:
        confused = f'<p class="meta">{_e(metrics.get("style_status") or "no style classifier: no confusions")}</p>'
    elif not pairs:
        confused = '<p class="meta">no confusions: every caption was taken for its requested style</p>'
    else:
        rows = ''.join(f'<tr><td>{_e(p["target"])}</td><td>&rarr; {_e(p["predicted"])}</td><td>{_e(p["count"])}</td>'
                       f'<td>{_e(_pct(p.get("share")))}</td></tr>' for p in pairs[:PAIRS_SHOWN])
        confused = ('<table class="pairs" id="confused-pairs"><tr><th>requested style</th><th>taken for</th>'
                    f'<th>captions</th><th>% of the style\'s rows</th></tr>{rows}</table>')
    return (f'{note}{tables}<h3>Most confused pairs</h3><p class="meta">requested style &rarr; the classifier\'s '
            f'first guess, where they differ; the {min(len(pairs or []), PAIRS_SHOWN)} most frequent</p>{confused}')


def _curves_section(work_dir: str) -> str:
    from utils.evaluation.curves import current_curves
    imgs = []
    for path in current_curves(work_dir):
        try:
            with open(path, 'rb') as f:
                imgs.append(f'<img alt="{_e(os.path.basename(path))}" src="{_data_uri(f.read(), "image/png")}">')
        except OSError as exc:
            logger.warning('report: cannot embed %s (%s)', path, exc)
    return '<div class="curves">' + ''.join(imgs) + '</div>' if imgs else \
        '<p class="meta">no training logs in the work_dir</p>'


def sample_indices(n: int, k: int = SAMPLE_ROWS) -> List[int]:
    """k indices spread evenly over range(n) (all of them when n <= k)."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _rows_section(predictions: List[dict]) -> str:
    out = ['<table class="rows"><tr><th>image</th><th>requested style</th><th>generated caption</th>'
           '<th>references</th><th>predicted style</th></tr>']
    for i in sample_indices(len(predictions)):
        p = predictions[i]
        uri = thumbnail(p.get('image', ''))
        img = f'<img alt="{_e(os.path.basename(p.get("image", "")))}" src="{uri}">' if uri else \
            f'<span class="meta">{_e(p.get("image"))} (unreadable)</span>'
        refs = p.get('reference') or []
        refs = ''.join(f'<li>{_e(r)}</li>' for r in ([refs] if isinstance(refs, str) else refs))
        predicted = p.get('predicted_style')
        mark = '' if predicted is None else (' class="hit"' if predicted == p.get('style') else ' class="miss"')
        out.append(f'<tr><td>{img}</td><td>{_e(p.get("style"))}</td><td>{_e(p.get("caption"))}</td>'
                   f'<td><ul>{refs}</ul></td><td{mark}>{_e(predicted if predicted is not None else "n/a")}</td></tr>')
    out.append('</table>')
    return ''.join(out)


def render(result: dict, work_dir: str) -> str:
    """The page for one eval result (the dict written to eval_{time}.json)."""
    metrics = result.get('metrics', {})
    predictions = result.get('results', [])
    settings = ', '.join(f'{k}={v}' for k, v in (result.get('settings') or {}).items())
    blind = ('<p class="blind">style-blind ablation: every row was captioned with the same neutral style input; '
             'the requested style below is what the row asked for</p>') if result.get('style_blind') else ''
    shown = len(sample_indices(len(predictions)))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>eval {_e(result.get('time'))}</title>
<style>{_CSS}</style></head><body>
<h1>Evaluation {_e(result.get('time'))}</h1>
<p class="meta">model {_e(result.get('model'))}; checkpoint {_e(result.get('checkpoint') or 'none (the model dir)')};
{_e(len(predictions))} test rows; {_e(settings)}</p>{blind}
<h2>Caption metrics</h2>{_metrics_table(metrics)}
<h2>Style accuracy</h2>
<p class="meta">Share of captions whose requested style a text classifier (trained on the train split's captions)
ranks first (top-1) or among its first five (top-5). The human references of the same rows are the ceiling;
chance is guessing uniformly among the styles.</p>{_style_section(metrics)}
<h2>Per style</h2>{_per_style_section(metrics)}
<h2>Training curves</h2>{_curves_section(work_dir)}
<h2>Sample of rows ({shown} of {len(predictions)})</h2>{_rows_section(predictions)}
</body></html>
"""


def write_report(result: dict, json_path: str, work_dir: str) -> str:
    """Write the page beside the eval JSON (eval_X.json -> eval_X.html), atomically; return its path."""
    from utils.core.io import write_text_atomic
    path = os.path.splitext(json_path)[0] + '.html'
    write_text_atomic(path, render(result, work_dir))
    logger.info('eval report: %s', path)
    return path
