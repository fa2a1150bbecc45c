"""Watching a run (TensorBoard event files, utils/training/tensorboard.py) and the per-style figures of validation,
`finetune.py eval` and its page (utils/evaluation/per_style.py, results.py, report.py)."""
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import finetune
from conftest import read_log_json
from utils.evaluation import per_style
from utils.evaluation.report import render
from utils.evaluation.per_style import CIDER_KEY, per_style_figures


def scalars(directory):
    """{tag: [(step, value)]} of every TensorBoard event file under directory, read with tensorboard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    runs = [p for p in Path(directory).iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    acc = EventAccumulator(str(runs[0]), size_guidance={'scalars': 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']}


def tokenised(predictions, references):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{'caption': r} for r in refs] for i, refs in enumerate(references)})
    res = tok.tokenize({i: [{'caption': p}] for i, p in enumerate(predictions)})
    return gts, res


def cider_by_hand(predictions, references, styles):
    """pycocoevalcap's own per-caption CIDEr-D over all rows (one call), averaged within each style here."""
    from pycocoevalcap.cider.cider import Cider
    corpus, each = Cider().compute_score(*tokenised(predictions, references))
    by_style = {}
    for s, v in zip(styles, each):
        by_style.setdefault(s, []).append(float(v))
    return float(corpus), {s: sum(v) / len(v) for s, v in by_style.items()}


# ---------------------------------------------------------------- per-style arithmetic

@pytest.mark.unit
def test_per_style_figures_by_hand():
    styles = ['Happy', 'Happy', 'Happy', 'Sad', 'Sad']
    cider = [0.9, 0.3, 0.0, 1.2, 0.4]
    ranked = [['Happy', 'Sad'], ['Sad', 'Happy'], ['Angry', 'Sad'], ['Sad'], ['Happy', 'Sad']]
    ref_hits = [(1, 1, 1), (0, 1, 2), (2, 2, 2), (1, 1, 1), (0, 0, 1)]  # (top-1 hits, top-5 hits, references)
    out = per_style_figures(styles, cider, ranked, ref_hits)
    happy, sad = out['per_style']['Happy'], out['per_style']['Sad']
    assert happy == {'rows': 3, CIDER_KEY: pytest.approx(0.4), 'style_accuracy_top1': pytest.approx(1 / 3),
                     'style_accuracy_top5': pytest.approx(2 / 3), 'reference_style_accuracy_top1': pytest.approx(3 / 5)}
    assert sad == {'rows': 2, CIDER_KEY: pytest.approx(0.8), 'style_accuracy_top1': 0.5, 'style_accuracy_top5': 1.0,
                   'reference_style_accuracy_top1': 0.5}
    # the row-weighted mean of the per-style CIDEr is the corpus CIDEr (the mean of the per-caption scores)
    assert (3 * happy[CIDER_KEY] + 2 * sad[CIDER_KEY]) / 5 == pytest.approx(sum(cider) / 5)
    assert out['style_confusions'] == [
        {'target': 'Happy', 'predicted': 'Angry', 'count': 1, 'share': pytest.approx(1 / 3)},
        {'target': 'Happy', 'predicted': 'Sad', 'count': 1, 'share': pytest.approx(1 / 3)},
        {'target': 'Sad', 'predicted': 'Happy', 'count': 1, 'share': 0.5}]
    assert 'all 5 scored rows' in out['per_style_note']
    # no classifier: CIDEr per style still, accuracy None (never 0), no confusions
    blind = per_style_figures(styles, cider)
    assert blind['per_style']['Sad'][CIDER_KEY] == pytest.approx(0.8)
    assert blind['per_style']['Sad']['style_accuracy_top1'] is None and blind['style_confusions'] is None
    assert [name for name, _ in per_style.ranked_styles(out['per_style'])] == ['Sad', 'Happy']


# ---------------------------------------------------------------- a result file, scored

@pytest.mark.integration
def test_result_file_per_style_cider_and_accuracy(tmp_path):
    """A hand-made inference file scored by `python -m utils.metrics` (the function eval uses), with a style
    classifier kept beside it: per-style CIDEr is pycocoevalcap's per-caption CIDEr-D over the whole file,
    averaged within each style; per-style accuracy and the confusions are what the captions were written to be."""
    from utils.evaluation import style_classifier as sc
    from utils.metrics import main as metrics_main
    phrasings = {'Happy': 'what a lovely {}', 'Sarcastic': 'oh great another {} how original',
                 'Anxious': 'i am so worried about that {}'}
    things = ['red cross', 'blue circle', 'green square', 'yellow star']
    clf = sc.StyleClassifier.fit([p.format(t) for p in phrasings.values() for t in things],
                                 [s for s in phrasings for _ in things])
    clf.save(str(tmp_path / 'output' / 'style_classifier'))
    rows = [  # (requested style, caption, references)
        ('Happy', 'what a lovely red cross', ['what a lovely red cross', 'such a lovely red cross']),
        ('Happy', 'oh great another blue circle how original', ['what a lovely blue circle']),  # -> Sarcastic
        ('Happy', 'i am so worried about that green square', ['what a lovely green square']),   # -> Anxious
        ('Sarcastic', 'oh great another yellow star how original', ['oh great another yellow star how original']),
        ('Sarcastic', 'oh great another red cross how original', ['oh great another blue circle how original']),
        ('Anxious', 'what a lovely blue circle', ['i am so worried about that blue circle']),  # -> Happy
    ]
    predicted = ['Happy', 'Sarcastic', 'Anxious', 'Sarcastic', 'Sarcastic', 'Happy']
    assert clf.predict([c for _, c, _ in rows]) == predicted  # the classifier reads them as written
    path = tmp_path / 'inference_x.json'
    path.write_text(json.dumps({'model_name': 'tiny', 'results': [
        {'style': s, 'image': f'{i}.jpg', 'caption': c, 'reference': r} for i, (s, c, r) in enumerate(rows)]}))
    assert metrics_main([str(path), '--no-spice']) == 0
    m = json.loads((tmp_path / 'inference_x_metrics.json').read_text())['metrics']
    corpus, expected = cider_by_hand([c for _, c, _ in rows], [r for _, _, r in rows], [s for s, _, _ in rows])
    assert m['CIDEr'] == pytest.approx(corpus)
    assert set(m['per_style']) == {'Happy', 'Sarcastic', 'Anxious'}
    for style, value in expected.items():
        assert m['per_style'][style][CIDER_KEY] == pytest.approx(value, rel=1e-9), style
    assert sum(e['rows'] * e[CIDER_KEY] for e in m['per_style'].values()) / len(rows) == pytest.approx(corpus)
    assert m['per_style']['Happy']['style_accuracy_top1'] == pytest.approx(1 / 3)
    assert m['per_style']['Sarcastic']['style_accuracy_top1'] == 1.0
    assert m['per_style']['Anxious']['style_accuracy_top1'] == 0.0
    assert m['per_style']['Anxious']['reference_style_accuracy_top1'] == 1.0  # its reference is recognisable
    assert m['per_style']['Happy']['style_accuracy_top5'] == 1.0  # 3 styles: all within the first five
    assert [(p['target'], p['predicted'], p['count']) for p in m['style_confusions']] == [
        ('Anxious', 'Happy', 1), ('Happy', 'Anxious', 1), ('Happy', 'Sarcastic', 1)]
    assert 'one pycocoevalcap Cider call over all 6 scored rows' in m['per_style_note']
    # scoring the Sarcastic rows as a corpus of their own gives another figure: the name says which one this is
    from pycocoevalcap.cider.cider import Cider
    alone, _ = Cider().compute_score(*tokenised([c for s, c, _ in rows if s == 'Sarcastic'],
                                                [r for s, _, r in rows if s == 'Sarcastic']))
    assert alone != pytest.approx(m['per_style']['Sarcastic'][CIDER_KEY])


@pytest.mark.integration
def test_eval_json_per_style_matches_its_own_rows(trained_copy, capsys):
    """`finetune.py eval`: the JSON's per-style figures are those of its own rows (captions, references and the
    classifier's predicted styles), recomputed here with pycocoevalcap."""
    conf, work = trained_copy
    assert finetune.main(['eval', '--conf', conf, '-n', '8']) == 0
    assert 'styles learnt least' in capsys.readouterr().out
    result = json.loads(next(work.glob('eval_*.json')).read_text())
    rows, m = result['results'], result['metrics']
    corpus, expected = cider_by_hand([r['caption'] for r in rows], [r['reference'] for r in rows],
                                     [r['style'] for r in rows])
    assert m['CIDEr'] == pytest.approx(corpus, rel=1e-9)
    assert set(m['per_style']) == {r['style'] for r in rows}
    for style, entry in m['per_style'].items():
        mine = [r for r in rows if r['style'] == style]
        assert entry['rows'] == len(mine)
        assert entry[CIDER_KEY] == pytest.approx(expected[style], rel=1e-9)
        assert entry['style_accuracy_top1'] == sum(r['predicted_style'] == style for r in mine) / len(mine)
    pairs = {}
    for r in rows:
        if r['predicted_style'] != r['style']:
            pairs[(r['style'], r['predicted_style'])] = pairs.get((r['style'], r['predicted_style']), 0) + 1
    assert {(p['target'], p['predicted']): p['count'] for p in m['style_confusions']} == pairs
    page = next(work.glob('eval_*.html')).read_text()
    assert 'Per style' in page and 'Most confused pairs' in page


# ---------------------------------------------------------------- the page

def many_styles_result(n_styles=30, rows_per_style=4):
    """An eval result of n_styles styles: style k's captions are taken for their style k/n_styles of the time
    (style S00 never, the last almost always); every miss is taken for style S00 or S01."""
    from utils.evaluation.per_style import confusions
    styles, predicted, cider = [], [], []
    for k in range(n_styles):
        name = f'S{k:02d}'
        hits = round(rows_per_style * k / (n_styles - 1))
        for j in range(rows_per_style):
            styles.append(name)
            predicted.append(name if j < hits else ('S00' if k % 2 else 'S01'))
            cider.append(0.01 * k)
    ranked = [[p] for p in predicted]
    figures = per_style_figures(styles, cider, ranked, [(1, 1, 1)] * len(styles))
    assert figures['style_confusions'] == confusions(styles, predicted)
    metrics = {'CIDEr': sum(cider) / len(cider), 'style_accuracy_top1': 0.5, 'style_accuracy_top5': 0.9,
               'reference_style_accuracy_top1': 1.0, 'reference_style_accuracy_top5': 1.0,
               'style_chance_top1': 1 / n_styles, 'style_status': 'test', **figures}
    results = [{'style': s, 'image': 'missing.jpg', 'caption': f'caption {i}', 'reference': ['a ref'],
                'predicted_style': p} for i, (s, p) in enumerate(zip(styles, predicted))][:4]
    return {'time': '20260101_000000', 'model': 'm', 'metrics': metrics, 'results': results, 'settings': {}}


def _section(page, element_id):
    m = re.search(rf'<div id="{element_id}">(.*?)</table>', page, re.S)
    assert m, element_id
    return re.findall(r'<tr><td>([^<]*)</td>', m.group(1))


@pytest.mark.unit
def test_page_shows_best_and_worst_styles_and_confused_pairs(tmp_path):
    page = render(many_styles_result(), str(tmp_path))
    assert _section(page, 'worst-styles') == [f'S{k:02d}' for k in range(10)]  # S00 (never right) first
    assert _section(page, 'best-styles') == [f'S{k:02d}' for k in range(29, 19, -1)]
    pairs = re.search(r'<table class="pairs" id="confused-pairs">(.*?)</table>', page, re.S).group(1)
    first = re.findall(r'<tr><td>([^<]*)</td><td>&rarr; ([^<]*)</td><td>(\d+)</td>', pairs)
    assert first[0] == ('S00', 'S01', '4') and len(first) == 15
    few = render(dict(many_styles_result(n_styles=4)), str(tmp_path))
    assert _section(few, 'all-styles') == ['S03', 'S02', 'S01', 'S00'] and 'worst-styles' not in few
    old = many_styles_result()
    old['metrics'] = {k: v for k, v in old['metrics'].items() if k not in ('per_style', 'style_confusions')}
    assert 'no per-style figures' in render(old, str(tmp_path))  # an eval JSON written before them


def _chromium():
    return shutil.which('chromium') or shutil.which('chromium-browser') or shutil.which('google-chrome')


@pytest.mark.e2e
@pytest.mark.skipif(_chromium() is None, reason='no chromium on PATH (apt-get install chromium)')
def test_per_style_section_renders_in_headless_chromium(tmp_path):
    """The page in headless Chromium: the per-style tables are laid out (the worst styles' table has a height and
    sits beside the best styles'), and the screenshot of the section is not blank."""
    page = render(many_styles_result(), str(tmp_path))
    probe = ("<script>window.addEventListener('load', () => { const box = id => document.getElementById(id)"
             ".getBoundingClientRect(); const w = box('worst-styles'), b = box('best-styles'), p = box('confused-pairs');"
             " document.body.setAttribute('data-boxes', [w.left, w.top, w.height, b.left, b.top, p.height].join(',')); });"
             "</script>")
    html = tmp_path / 'page.html'
    html.write_text(page.replace('</body>', probe + '</body>'))
    out = subprocess.run([_chromium(), '--headless=new', '--no-sandbox', '--disable-gpu', '--window-size=1200,2000',
                          '--virtual-time-budget=10000', '--dump-dom', html.as_uri()],
                         capture_output=True, text=True, timeout=120)
    m = re.search(r'data-boxes="([^"]*)"', out.stdout)
    assert m, out.stderr[-2000:]
    w_left, w_top, w_height, b_left, b_top, p_height = map(float, m.group(1).split(','))
    assert w_height > 200 and p_height > 200  # 10 styles and 15 pairs, one row each
    assert b_left > w_left and abs(b_top - w_top) < 1  # side by side
    shot = tmp_path / 'shot.png'
    subprocess.run([_chromium(), '--headless=new', '--no-sandbox', '--disable-gpu', f'--screenshot={shot}',
                    '--window-size=1200,2000', html.as_uri()], capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert('L'))
    assert pixels.std() > 10


# ---------------------------------------------------------------- TensorBoard

@pytest.mark.unit
def test_tensorboard_hook_logs_against_the_optimizer_step(tmp_path):
    """accumulate 2 (RecipeTrainer: one iteration is one optimizer step of two micro-batches, each putting its loss
    in the log buffer): each point is the mean of its step's micro-batches, at the step; the learning rate is the
    one the step was taken with; a validation lands at the step it follows; log_interval counts steps."""
    import torch
    from modelscope.trainers.utils.log_buffer import LogBuffer
    from utils.training.tensorboard import TensorboardHook
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    trainer = SimpleNamespace(iter=0, log_buffer=LogBuffer(), optimizer=optimizer)
    hook = TensorboardHook(str(tmp_path / 'tb' / 'run'), log_interval=1)
    hook.before_run(trainer)
    hook.before_train_epoch(trainer)
    losses, rewards = [[4.0, 2.0], [1.0, 0.5]], [[0.1, 0.3], [0.5, 0.9]]
    for i, (loss, reward) in enumerate(zip(losses, rewards)):
        trainer.iter = i
        hook.before_train_iter(trainer)
        for micro in range(2):
            trainer.log_buffer.update({'loss': loss[micro], 'reward': reward[micro], 'iter_time': 9.0})
        hook.after_train_iter(trainer)
        optimizer.param_groups[0]['lr'] /= 10  # the scheduler, after the step
        if i == 0:
            hook.add_validation({'CIDEr': 0.25, 'SPICE': None})
    hook.after_run(trainer)
    got = scalars(tmp_path / 'tb')
    assert got['train/loss'] == [(1, 3.0), (2, 0.75)]
    assert [(s, round(v, 6)) for s, v in got['train/reward']] == [(1, 0.2), (2, 0.7)]
    assert [(s, round(v, 6)) for s, v in got['train/lr']] == [(1, 0.1), (2, 0.01)]
    assert got['val/CIDEr'] == [(1, 0.25)]
    assert 'train/iter_time' not in got and 'val/SPICE' not in got

    sparse = TensorboardHook(str(tmp_path / 'tb3' / 'run'), log_interval=3)  # every 3 steps, and at epoch ends
    trainer = SimpleNamespace(iter=0, log_buffer=LogBuffer(), optimizer=optimizer)
    sparse.before_run(trainer)
    for _epoch in range(2):
        sparse.before_train_epoch(trainer)
        trainer.log_buffer.clear()  # as ModelScope's logger hooks do at an epoch start
        for _ in range(4):
            sparse.before_train_iter(trainer)
            trainer.log_buffer.update({'loss': float(trainer.iter)})
            sparse.after_train_iter(trainer)
            trainer.iter += 1
        sparse.after_train_epoch(trainer)
    sparse.after_run(trainer)
    assert scalars(tmp_path / 'tb3')['train/loss'] == [(3, 1.0), (4, 3.0), (6, 4.5), (8, 6.5)]


@pytest.mark.integration
def test_ce_run_with_validation_writes_tensorboard_and_per_style_val_metrics(make_conf):
    """A tiny CE run (one epoch of 6 iterations, validated every 2): the event files hold the loss and learning
    rate of every step and each validation's figures; val_metrics.jsonl holds the per-style figures, which for the
    last validation (the final weights: output/) equal a recomputation from output/'s captions of the val rows."""
    from utils.captioning.captioner import Captioner
    from utils.core.conf import read_conf
    from utils.data.rows import load_split
    from utils.evaluation.style_classifier import classifier_for_conf
    conf = make_conf(max_epochs=1, eval_interval=2, eval_every_epoch=True, lr=2e-3, warmup=0.0)
    work = Path(json.loads(Path(conf).read_text())['work_dir'])
    assert finetune.main(['train', '--conf', conf]) == 0
    got = scalars(work / 'tensorboard')
    logged = [e for e in read_log_json(work) if e.get('mode') == 'train']
    assert [s for s, _ in got['train/loss']] == list(range(1, 7))
    assert [v for _, v in got['train/loss']] == pytest.approx([e['loss'] for e in logged], abs=1e-4)
    assert [s for s, _ in got['train/lr']] == list(range(1, 7)) and all(v > 0 for _, v in got['train/lr'])
    lines = [json.loads(x) for x in (work / 'val_metrics.jsonl').read_text().splitlines()]
    assert [x['iteration'] for x in lines] == [2, 4, 6]
    for name in ('CIDEr', 'Bleu_4', 'style_accuracy_top1'):
        assert got[f'val/{name}'] == [(x['iteration'], pytest.approx(x['metrics'][name])) for x in lines], name
    summary = json.loads(next(work.glob('train_*.json')).read_text())
    assert Path(summary['tensorboard']).parent == work / 'tensorboard'

    last = lines[-1]
    c = read_conf(conf)
    val, _ = load_split(c, 'val')
    captions = Captioner(str(work / 'output'), c.generation, model_cfg=c.model.model_cfg).caption(
        [{'style': r['style'], 'image': r['image']} for r in val])
    corpus, expected = cider_by_hand(captions, [r['references'] for r in val], [r['style'] for r in val])
    assert last['metrics']['CIDEr'] == pytest.approx(corpus, rel=1e-9)
    clf, _ = classifier_for_conf(c)  # the one validation used, from work_dir's cache
    guesses = clf.predict(captions)
    assert set(last['per_style']) == {r['style'] for r in val}
    for style, entry in last['per_style'].items():
        mine = [i for i, r in enumerate(val) if r['style'] == style]
        assert entry['rows'] == len(mine)
        assert entry[CIDER_KEY] == pytest.approx(expected[style], rel=1e-9)
        assert entry['style_accuracy_top1'] == sum(guesses[i] == style for i in mine) / len(mine)
    assert last['metrics']['style_accuracy_top1'] == sum(g == r['style'] for g, r in zip(guesses, val)) / len(val)
    assert isinstance(last['style_confusions'], list) and CIDER_KEY in last['per_style_note']


@pytest.mark.integration
def test_scst_run_writes_its_reward_to_tensorboard(trained, make_conf):
    conf = make_conf(model_name=str(trained[1] / 'output'), stage='scst', scst={'candidates': 2},
                     lr=1e-5, warmup=0.0, max_train_samples=16)
    work = Path(json.loads(Path(conf).read_text())['work_dir'])
    assert finetune.main(['train', '--conf', conf]) == 0
    got = scalars(work / 'tensorboard')
    logged = [e for e in read_log_json(work) if e.get('mode') == 'train']
    assert len(logged) == 2
    for key in ('reward', 'baseline', 'loss'):
        assert [s for s, _ in got[f'train/{key}']] == [1, 2], key
        assert [v for _, v in got[f'train/{key}']] == pytest.approx([e[key] for e in logged], abs=1e-4), key


@pytest.mark.integration
def test_tensorboard_off(make_conf):
    conf = make_conf(max_train_samples=8, tensorboard=False)
    work = Path(json.loads(Path(conf).read_text())['work_dir'])
    assert finetune.main(['train', '--conf', conf]) == 0
    assert (work / 'output').is_dir() and not (work / 'tensorboard').exists()
