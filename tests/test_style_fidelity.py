"""Style accuracy (utils/style_classifier.py), the style-blind ablation, training curves (utils/curves.py)
and the eval page (utils/report.py), on the small demo-format data set and the tiny trained model."""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import finetune
from utils.evaluation import curves, style_classifier as sc
from utils.data.rows import read_split
from utils.metrics import main as metrics_main
from utils.evaluation.report import render

FIGURES = ('style_accuracy_top1', 'style_accuracy_top5', 'reference_style_accuracy_top1',
           'reference_style_accuracy_top5', 'style_chance_top1')


def newest(work_dir, pattern):
    return max(Path(work_dir).glob(pattern), key=os.path.getmtime)


@pytest.fixture(scope='module')
def train_rows(pcap):
    rows, _ = read_split(Path(pcap[0]) / 'train.json', pcap[1], '.jpg', 'train', check_images=False)
    return rows


@pytest.fixture(scope='module')
def test_rows(pcap):
    rows, _ = read_split(Path(pcap[0]) / 'test.json', pcap[1], '.jpg', 'test', check_images=False)
    return rows


# ------------------------------------------------------------------ the classifier

@pytest.mark.unit
def test_classifier_recognises_the_styles_of_held_out_references(train_rows, test_rows):
    clf = sc.StyleClassifier.fit([r['text'] for r in train_rows], [r['style'] for r in train_rows])
    assert clf.styles == sorted({r['style'] for r in train_rows})
    # the test rows' additional references use phrasings the train split never has
    alt = [(r['references'][1], r['style']) for r in test_rows]
    acc = clf.accuracy([t for t, _ in alt], [s for _, s in alt])
    assert acc[1] == 1.0
    # punctuation and case are ignored, as in the captions the model generates
    assert clf.predict(["OH GREAT, another red cross... how original!"]) == ['Sarcastic']
    assert clf.accuracy(['what a lovely red cross'], ['Unknown style'])[5] == 0.0


@pytest.mark.unit
def test_features_equal_sklearns_tfidf_and_storage_is_plain_data(train_rows, tmp_path):
    from sklearn.feature_extraction.text import TfidfVectorizer
    texts = [r['text'] for r in train_rows]
    clf = sc.StyleClassifier.fit(texts, [r['style'] for r in train_rows], meta={'data_hash': 'x'})
    s = sc.SETTINGS
    reference = TfidfVectorizer(ngram_range=tuple(s['ngram_range']), max_features=s['max_features'],
                                sublinear_tf=s['sublinear_tf'], token_pattern=s['token_pattern'],
                                preprocessor=sc.normalise, dtype=np.float32).fit_transform(texts)
    assert abs(reference - clf.features(texts)).max() < 1e-6
    clf.save(str(tmp_path / 'c'))
    assert sorted(os.listdir(tmp_path / 'c')) == ['classifier.json', 'vocabulary.json', 'weights.npz']
    np.load(tmp_path / 'c' / 'weights.npz', allow_pickle=False)  # no object arrays inside
    again = sc.StyleClassifier.load(str(tmp_path / 'c'))
    probe = texts + ['i am so worried about that cross', 'nothing like any style']
    assert np.array_equal(clf.scores(probe), again.scores(probe))
    assert again.styles == clf.styles and again.meta['data_hash'] == 'x'
    (tmp_path / 'c' / 'weights.npz').write_bytes(b'not a zip')
    with pytest.raises(ValueError, match='not a readable style classifier'):
        sc.StyleClassifier.load(str(tmp_path / 'c'))


@pytest.mark.unit
def test_cache_by_train_data_and_copy_kept_with_the_model(train_rows, tmp_path, monkeypatch):
    work, model = tmp_path / 'work', tmp_path / 'model'
    model.mkdir()
    fits = []
    real_fit = sc.StyleClassifier.fit.__func__
    monkeypatch.setattr(sc.StyleClassifier, 'fit',
                        classmethod(lambda cls, *a, **k: fits.append(1) or real_fit(cls, *a, **k)))
    first = sc.classifier_for_rows(train_rows, str(work), str(model))
    assert len(fits) == 1 and (model / 'style_classifier' / 'classifier.json').is_file()
    assert len(list((work / 'style_classifier').iterdir())) == 1
    sc.classifier_for_rows(train_rows, str(work), str(model))
    assert len(fits) == 1  # same content: the cache
    shutil.rmtree(work)
    again = sc.classifier_for_rows(train_rows, str(work), str(model))
    assert len(fits) == 1 and again.meta['data_hash'] == first.meta['data_hash']  # the model's copy
    changed = [dict(r, text=r['text'] + ' indeed') if i == 0 else r for i, r in enumerate(train_rows)]
    sc.classifier_for_rows(changed, str(work), str(model))
    assert len(fits) == 2 and len(list((work / 'style_classifier').iterdir())) == 2
    assert json.loads((model / 'style_classifier' / 'classifier.json').read_text())['data_hash'] == \
        sc.data_hash(changed)


@pytest.mark.unit
def test_figures_without_a_classifier_are_none_not_zero():
    figures, predicted = sc.style_figures(None, ['Happy'], ['a caption'], [['ref']], 'no classifier')
    assert all(figures[k] is None for k in FIGURES) and figures['style_status'] == 'no classifier'
    assert predicted == [None]


# ------------------------------------------------------------------ eval, ablation, report

@pytest.fixture(scope='module')
def styled(tmp_path_factory, tiny_model, pcap):
    """(conf path, work_dir) of a tiny model trained until it follows the requested style most of the time.

    Its data set says the same thing (a red cross) in each style's words on every image, so the style is
    all there is to learn: 180 iterations teach it 3 or 4 of the 4 styles (the full demo data set would
    take the demo's 480 iterations)."""
    from utils.demo.data import STYLES, caption
    tmp = tmp_path_factory.mktemp('styled')
    data = tmp / 'data'
    data.mkdir()
    train = [{'personality': s, 'comment': caption(s, 'red', 'cross'), 'image_hash': f'train{i:04d}'}
             for i in range(12) for s in STYLES]
    test = [{'personality': s, 'comment': caption(s, 'red', 'cross'),
             'additional_comments': [caption(s, 'red', 'cross', alt=True)], 'image_hash': f'test{i:04d}'}
            for i, s in enumerate(list(STYLES) * 2)]
    for split, rows in (('train', train), ('val', test[:4]), ('test', test)):
        (data / f'{split}.json').write_text(json.dumps(rows))
    conf = {
        'model_name': tiny_model, 'tokenize_style': True, 'img_addr': pcap[1], 'dataset_path': str(data),
        'file_attr': '.jpg', 'train_json': 'train.json', 'val_json': 'val.json', 'test_json': 'test.json',
        'work_dir': str(tmp / 'work'), 'prompt': None, 'batch_size': 4, 'max_epochs': 15, 'lr': 5e-3,
        'warmup': 0.0, 'label_smoothing': 0.0, 'log_interval': 5, 'patch_image_size': 32,
        'max_image_size': 32, 'beam_size': 2, 'max_len': 12,
        'checkpoint': {'by_epoch': False, 'interval': 1000, 'max_checkpoint_num': 1},
        'eval_interval': None, 'eval_every_epoch': False,  # no validation during training: not needed here
    }
    path = tmp / 'conf.json'
    path.write_text(json.dumps(conf))
    assert finetune.main(['train', '--conf', str(path)]) == 0
    return str(path), Path(conf['work_dir'])


@pytest.fixture(scope='module')
def evals(styled):
    """(normal eval JSON, style-blind eval JSON) of the styled model."""
    conf, work = styled
    assert finetune.main(['eval', '--conf', conf]) == 0
    normal = newest(work, 'eval_*.json')
    assert finetune.main(['eval', '--conf', conf, '--style_blind']) == 0
    blind = newest(work, 'eval_*.json')
    assert blind != normal
    return json.loads(normal.read_text()), json.loads(blind.read_text()), normal, blind


@pytest.mark.integration
def test_eval_reports_style_accuracy(evals, styled, capsys):
    normal = evals[0]
    m = normal['metrics']
    assert all(0 <= m[k] <= 1 for k in FIGURES)
    assert m['style_chance_top1'] == 0.25
    assert m['reference_style_accuracy_top1'] == 1.0
    assert m['style_accuracy_top1'] >= 0.6, [p['caption'] for p in normal['results']]
    assert m['style_accuracy_top5'] == 1.0  # 4 styles: every style is in the top 5
    assert normal['style_blind'] is False
    preds = normal['results']
    assert sum(p['predicted_style'] == p['style'] for p in preds) / len(preds) == m['style_accuracy_top1']
    # the classifier travels with the model it judged, and is cached in work_dir
    assert (styled[1] / 'output' / 'style_classifier' / 'weights.npz').is_file()
    assert len(list((styled[1] / 'style_classifier').iterdir())) == 1


@pytest.mark.integration
def test_style_blind_ablation_drops_style_accuracy(evals):
    normal, blind = evals[0]['metrics'], evals[1]['metrics']
    assert evals[1]['style_blind'] is True
    # the rows still carry the style they asked for, and are judged against it
    assert [p['style'] for p in evals[1]['results']] == [p['style'] for p in evals[0]['results']]
    assert blind['style_accuracy_top1'] <= normal['style_accuracy_top1'] - 0.3
    assert blind['reference_style_accuracy_top1'] == normal['reference_style_accuracy_top1']
    # one neutral input for every row: the captions' styles collapse onto (nearly) one
    predicted = [p['predicted_style'] for p in evals[1]['results']]
    assert max(predicted.count(s) for s in set(predicted)) >= len(predicted) - 2


@pytest.mark.integration
def test_metrics_cli_style_accuracy_with_conf_or_the_models_copy(evals, styled, tmp_path, capsys):
    normal = evals[0]
    results = [{'style': p['style'], 'image': p['image'], 'caption': p['caption'], 'reference': p['reference']}
               for p in normal['results']]
    inference = tmp_path / 'inference.json'
    inference.write_text(json.dumps({'model_name': str(styled[1] / 'output'), 'results': results}))
    for extra in (['--conf', styled[0]], []):  # the conf's train split, or the copy in the named model dir
        out = tmp_path / f'm{len(extra)}.json'
        assert metrics_main([str(inference), '-o', str(out), '--no-spice'] + extra) == 0
        m = json.loads(out.read_text())['metrics']
        for key in FIGURES:
            assert m[key] == pytest.approx(normal['metrics'][key]), key
    assert 'references (ceiling)' in capsys.readouterr().out
    before = sorted(os.listdir(tmp_path))
    assert metrics_main([str(inference), '--conf', str(tmp_path / 'nope.json'), '--no-spice']) == 2
    assert 'nope.json' in capsys.readouterr().err and sorted(os.listdir(tmp_path)) == before
    inference.write_text(json.dumps({'model_name': 'damo/some_hub_model', 'results': results}))
    assert metrics_main([str(inference), '-o', str(tmp_path / 'none.json'), '--no-spice']) == 0
    m = json.loads((tmp_path / 'none.json').read_text())['metrics']
    assert m['style_accuracy_top1'] is None and '--conf' in m['style_status']


@pytest.mark.integration
def test_report_is_self_contained_and_escaped(evals, styled):
    page = Path(str(evals[2])[:-len('.json')] + '.html').read_text()
    assert 'src="http' not in page and 'href="http' not in page
    assert page.count('src="data:image/jpeg;base64,') == len(evals[0]['results'])
    assert 'src="data:image/png;base64,' in page  # the training curves
    assert 'style-blind ablation' not in page
    assert 'style-blind ablation' in Path(str(evals[3])[:-len('.json')] + '.html').read_text()
    evil = dict(evals[0], results=[dict(evals[0]['results'][0], caption='<script>alert(1)</script>',
                                            style='A&B "quoted"')])
    html = render(evil, str(styled[1]))
    assert '<script>alert(1)</script>' not in html and '&lt;script&gt;alert(1)&lt;/script&gt;' in html
    assert 'A&amp;B &quot;quoted&quot;' in html


def _chromium():
    return shutil.which('chromium') or shutil.which('chromium-browser') or shutil.which('google-chrome')


@pytest.mark.e2e
@pytest.mark.skipif(_chromium() is None, reason='no chromium on PATH (apt-get install chromium)')
def test_report_images_render_in_headless_chromium(evals, tmp_path):
    """Open the page in headless Chromium; after load, every <img> must have decoded (naturalWidth > 0)."""
    page = Path(str(evals[2])[:-len('.json')] + '.html').read_text()
    probe = ("<script>window.addEventListener('load', () => { document.body.setAttribute('data-widths', "
             "Array.from(document.images).map(i => i.complete ? i.naturalWidth : -1).join(',')); });</script>")
    copy = tmp_path / 'probe.html'
    copy.write_text(page.replace('</body>', probe + '</body>'))
    out = subprocess.run([_chromium(), '--headless=new', '--no-sandbox', '--disable-gpu', '--virtual-time-budget=10000',
                          '--dump-dom', copy.as_uri()], capture_output=True, text=True, timeout=120)
    m = re.search(r'data-widths="([^"]*)"', out.stdout)
    assert m, out.stderr[-2000:]
    widths = [int(w) for w in m.group(1).split(',')]
    assert len(widths) == len(evals[0]['results']) + page.count('src="data:image/png;')  # thumbnails + curves
    assert all(w > 0 for w in widths), widths
    shot = tmp_path / 'shot.png'
    subprocess.run([_chromium(), '--headless=new', '--no-sandbox', '--disable-gpu', f'--screenshot={shot}',
                    '--window-size=1200,1400', evals[2].with_suffix('.html').as_uri()],
                   capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert('L'))
    assert pixels.std() > 10  # not a blank page


# ------------------------------------------------------------------ curves

def _write_logs(work: Path, stamp='20260101_000000', ipe=5, epochs=2, interval=2):
    lines, text = [], []
    for epoch in range(1, epochs + 1):
        for it in range(interval, ipe + 1, interval):
            g = (epoch - 1) * ipe + it
            lines.append({'mode': 'train', 'epoch': epoch, 'iter': it, 'lr': 1e-3 / g, 'iter_time': 0.1,
                          'data_load_time': 0.01, 'loss': 5.0 / g})
            text.append(f'2026 - modelscope - INFO - epoch [{epoch}][{it}/{ipe}]\tlr: 1e-3, loss: {5.0 / g}')
    (work / f'{stamp}.log.json').write_text('\n'.join(json.dumps(ln) for ln in lines) + '\n')
    (work / f'{stamp}.log').write_text('\n'.join(text) + '\n')


@pytest.mark.unit
def test_curves_from_logs_and_validation_metrics(tmp_path):
    _write_logs(tmp_path)
    val = [{'iteration': 5, 'epoch': 1, 'metrics': {'CIDEr': 0.1, 'Bleu_4': 0.05}, 'seconds': 1.0},
           {'iteration': 10, 'epoch': 2, 'metrics': {'CIDEr': 0.3, 'Bleu_4': 0.07}, 'seconds': 1.0}]
    (tmp_path / 'val_metrics.jsonl').write_text('\n'.join(json.dumps(v) for v in val) + '\n{"iteration": 15, "ep')
    losses, lrs = curves.read_train_log(str(tmp_path))
    assert [i for i, _ in losses['loss']] == [2, 4, 7, 9]  # epoch 2's inner iterations 2, 4 -> 7, 9
    assert list(losses) == ['loss']  # timings are not training signals
    assert lrs['lr'][2] == (7, pytest.approx(1e-3 / 7))
    assert curves.read_val_metrics(str(tmp_path))['CIDEr'] == [(5, 0.1), (10, 0.3)]  # partial last line skipped
    paths = curves.draw_curves(str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ['curves_loss.png', 'curves_lr.png', 'curves_validation.png']
    for p in paths:
        pixels = np.asarray(Image.open(p).convert('L'))
        assert pixels.shape[0] > 100 and pixels.std() > 5


@pytest.mark.unit
def test_report_reuses_fresh_curves_and_redraws_stale_ones(tmp_path):
    _write_logs(tmp_path)
    drawn = curves.current_curves(str(tmp_path))  # none yet: drawn
    assert [os.path.basename(p) for p in drawn] == ['curves_loss.png', 'curves_lr.png']
    stamps = [os.path.getmtime(p) for p in drawn]
    assert curves.current_curves(str(tmp_path)) == drawn
    assert [os.path.getmtime(p) for p in drawn] == stamps  # fresh: not drawn again
    log = next(tmp_path.glob('*.log.json'))
    os.utime(log, (stamps[0] + 10, stamps[0] + 10))  # a newer log
    curves.current_curves(str(tmp_path))
    assert all(os.path.getmtime(p) > s for p, s in zip(drawn, stamps))


@pytest.mark.unit
def test_curves_never_raise(tmp_path, caplog):
    assert curves.draw_curves(str(tmp_path / 'missing')) == []
    (tmp_path / 'x.log.json').write_text('{"mode": "train", "epoch": 1, "iter": "bad"}\nnot json\n')
    (tmp_path / 'val_metrics.jsonl').write_text('[1, 2]\n{"iteration": 3, "metrics": {"CIDEr": "nan?"}}\n')
    assert curves.draw_curves(str(tmp_path)) == []
    assert 'no curves' in caplog.text
    assert curves.main([str(tmp_path / 'missing')]) == 2


@pytest.mark.integration
def test_curves_of_a_real_training_run(trained_copy, capsys):
    """The session's training run (ModelScope's TextLoggerHook, 2 epochs x 6 iterations, logged every one);
    drawn in a copy: the curves are written into work_dir."""
    losses, lrs = curves.read_train_log(str(trained_copy[1]))
    assert [i for i, _ in losses['loss']] == list(range(1, 13))
    assert 'iter_time' not in losses and 'data_load_time' not in losses
    assert curves.main([str(trained_copy[1])]) == 0
    assert 'curves_loss.png' in capsys.readouterr().out
