"""``finetune.py eval``: caption the test split, score against all references, write the results."""
from __future__ import annotations

import csv
import io
import logging
import os
from typing import List, Optional

from utils.core.io import unique_path, write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)
CSV_SETTINGS = ('tokenize_style', 'beam_size', 'max_len', 'no_repeat_ngram_size', 'patch_image_size')


def evaluate(conf, checkpoint: Optional[str], stamp: str, rows: List[dict], stats,
             log_csv: Optional[str] = None, model: Optional[str] = None, style_blind: bool = False) -> dict:
    """Caption the test rows with {work_dir}/output (or the model dir ``model``, e.g. work_dir/output_best), or
    with the weights of a CheckpointHook checkpoint (prefix work_dir/iter_N), score them against all their
    references, write eval_{time}.json and its page eval_{time}.html. ``style_blind``: the ablation, every
    row captioned with the same neutral style input (:func:`withhold_style`); the style accuracy is still
    measured against each row's requested style."""
    from utils.captioning.captioner import load_captioner
    from utils.evaluation.results import score_file
    from utils.evaluation.table import format_table
    from utils.evaluation.report import write_report

    captioner = load_captioner(conf, model, checkpoint=checkpoint + '.pth' if checkpoint else None)
    neutral = withhold_style(captioner) if style_blind else None
    items = [{'style': neutral or r['style'], 'image': r['image']} for r in rows]
    captions = captioner.caption(items, batch_size=conf.run.batch_size, num_workers=conf.run.num_workers)

    model = captioner.model_dir
    # the inference file's schema (pre_inference.py), references always a list, plus what eval knows
    result = {
        'model_name': conf.model.model_name, 'model_revision': conf.model.model_revision, 'n_eval_sample': len(rows),
        'results': [{'style': r['style'], 'image': r['image'], 'caption': c, 'reference': r['references']}
                    for r, c in zip(rows, captions)],
        'mode': 'eval', 'time': stamp, 'model': model, 'checkpoint': checkpoint,
        'settings': {k: conf.value(k) for k in CSV_SETTINGS},
        'style_blind': style_blind,
        'data': {'test': stats.to_dict()},
    }
    path = unique_path(conf.run.work_dir, 'eval', stamp)
    write_json_atomic(path, result)  # the predictions first: a scoring failure loses no captions
    scored = score_file(path, conf, model_dir=model, data=result)  # what `python -m utils.metrics` does
    metrics = result['metrics'] = scored['metrics']
    for row, predicted in zip(result['results'], scored['predicted_styles']):
        row['predicted_style'] = predicted
    write_json_atomic(path, result)
    print(format_table(metrics))
    logger.info('eval results: %s', path)
    try:
        write_report(result, path, conf.run.work_dir)
    except Exception as exc:  # noqa: BLE001 - the page is a view of the JSON, which is already written
        logger.warning('could not write the HTML report: %s', exc)
    if log_csv:
        # the CSV's columns stay as they were (old files keep appending); an ablation row says so by its model
        append_csv_row(log_csv, {'time': stamp, 'model': model + (' (style-blind)' if style_blind else ''),
                                 'checkpoint': checkpoint or '', **result['settings'], 'n_samples': len(rows),
                                 **{k: v for k, v in metrics.items() if k[0].isupper()}})
        logger.info('metrics row appended to %s', log_csv)
    return result


NEUTRAL_STYLE = '(style withheld)'  # the pseudo-style of the style-blind ablation


def withhold_style(captioner) -> str:
    """Style-blind ablation: register a pseudo-style whose prompt is the model's prompt template with the
    style slot left empty (no style token, no style word), and return its name; captioning every row with
    it gives every row the same neutral style input."""
    captioner.style_map.tokens[NEUTRAL_STYLE] = ''
    return NEUTRAL_STYLE


def append_csv_row(path: str, row: dict) -> None:
    """Append one row (header first if the file is new), all or nothing: the new file is written whole
    under a temporary name, then renamed over the old one."""
    old = ''
    if os.path.isfile(path):
        with open(path, encoding='utf-8', newline='') as f:
            old = f.read()
    buf = io.StringIO()
    fields = list(row)
    if old:
        header = next(csv.reader([old.splitlines()[0]]))
        fields = header + [k for k in row if k not in header]
        if fields != header:
            raise ValueError(f'{path}: its columns ({", ".join(header)}) lack {", ".join(fields[len(header):])}')
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction='ignore')
    if not old:
        writer.writeheader()
    writer.writerow({k: ('' if v is None else v) for k, v in row.items()})
    write_text_atomic(path, old + ('' if not old or old.endswith('\n') else '\n') + buf.getvalue())
