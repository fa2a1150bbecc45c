"""The README's first command, `finetune.py train --conf conf_examples/demo.json`, end to end on a short run:
the demo conf with its paths moved to a temporary dir (nothing there yet) and fewer rows and epochs."""
import json
import re
from pathlib import Path

import pytest

import finetune
from utils.core.conf_checks import load_conf
from conftest import ROOT
from utils.demo.data import COLOURS, SHAPES, STYLES


def follows(style, text):
    """The demo's check, written again: the caption is one of the style's two templates, any word in the
    colour and shape slots."""
    return any(re.fullmatch(' '.join(r'\S+' if w in ('{c}', '{s}') else re.escape(w) for w in t.split()),
                            ' '.join(text.lower().split())) for t in STYLES[style])


def names(truth, text):
    """The caption names the colour and the shape of the image's reference caption."""
    colour = next(w for w in truth.split() if w in COLOURS)
    shape = next(w for w in truth.split() if w in SHAPES)
    return colour in text.lower().split() and shape in text.lower().split()


def recount(rows, items, captions):
    truth = {r['image_hash']: r['comment'] for r in rows}
    hashes = [Path(i['image']).stem for i in items]
    return {'captions': len(captions),
            'style_followed': sum(follows(i['style'], c) for i, c in zip(items, captions)),
            'content_correct': sum(names(truth[h], c) for h, c in zip(hashes, captions))}


@pytest.mark.e2e
def test_demo_conf_builds_its_assets_trains_and_reports(tmp_path, capsys, monkeypatch):
    from utils.captioning import captioner as captioning
    calls, real = [], captioning.Captioner.caption

    def recorded(self, items, *args, **kwargs):  # what the demo's report captioned, and the captions it got
        captions = real(self, items, *args, **kwargs)
        calls.append((list(items), list(captions)))
        return captions
    monkeypatch.setattr(captioning.Captioner, 'caption', recorded)
    conf = json.loads((ROOT / 'conf_examples' / 'demo.json').read_text())
    assert conf['demo'] is True
    for key in ('model_name', 'img_addr', 'dataset_path', 'work_dir'):
        conf[key] = str(tmp_path / Path(conf[key]).name)
    conf.update(max_epochs=1, max_train_samples=32, val_max_samples=4, max_len=4)  # short: the path, not the skill
    path = tmp_path / 'demo.json'
    path.write_text(json.dumps(conf))

    assert finetune.main(['train', '--conf', str(path)]) == 0
    assert (tmp_path / 'tiny_ofa' / 'pytorch_model.bin').is_file()         # the tiny model was built
    assert len(list((tmp_path / 'images').glob('*.jpg'))) == 320 + 16 + 32  # and the data set
    summary = json.loads(next((tmp_path / 'demo').glob('train_*.json')).read_text())
    report = summary['demo']
    test_rows = json.loads((tmp_path / 'data' / 'test.json').read_text())
    (items, captions), = [c for c in calls if len(c[0]) == 32 * 4]  # the report's one captioning
    assert sorted((Path(i['image']).stem, i['style']) for i in items) == sorted(
        (r['image_hash'], s) for r in test_rows for s in STYLES)  # every held-out image in every style
    assert report == recount(test_rows, items, captions)  # its figures are those of the captions it got
    err = capsys.readouterr().err
    assert (f"demo: {report['style_followed']}/128 held-out captions follow the requested style, "
            f"{report['content_correct']}/128 name the right colour and shape") in err

    model_bin = tmp_path / 'tiny_ofa' / 'pytorch_model.bin'
    built = model_bin.stat().st_mtime_ns
    load_conf(str(path))  # what every later command does first
    assert model_bin.stat().st_mtime_ns == built  # assets that exist are not built again


@pytest.mark.unit
def test_the_demo_report_counts_style_and_content_of_each_caption(pcap, tiny_model, monkeypatch, tmp_path):
    """demo_report on captions made to order (no model): per image and style, one caption in the style's
    (second) phrasing naming the image's colour and shape, one in the style's phrasing naming another colour, one in
    another style's phrasing naming the right ones, one that is neither."""
    from utils.captioning import captioner as captioning
    from utils.core.conf import conf_from_dict
    from utils.demo.data import caption
    from utils.demo.report import demo_report
    rows = json.loads(Path(pcap[0], 'test.json').read_text())
    truth = {r['image_hash']: r['comment'] for r in rows}
    styles = list(STYLES)

    def made_to_order(item, k):
        words = truth[Path(item['image']).stem].split()
        colour = next(w for w in words if w in COLOURS)
        shape = next(w for w in words if w in SHAPES)
        other = next(c for c in COLOURS if c != colour)
        return [caption(item['style'], colour, shape, alt=True), caption(item['style'], other, shape),
                caption(styles[(styles.index(item['style']) + 1) % 4], colour, shape),
                f'a picture of {other} things'][k % 4]

    class FakeCaptioner:
        def __init__(self, *args, **kwargs):
            pass

        def caption(self, items, *args, **kwargs):
            return [made_to_order(item, k) for k, item in enumerate(items)]
    monkeypatch.setattr(captioning, 'Captioner', FakeCaptioner)
    conf = conf_from_dict({'model_name': tiny_model, 'tokenize_style': True, 'img_addr': pcap[1],
                           'dataset_path': pcap[0], 'file_attr': '.jpg', 'train_json': 'train.json',
                           'val_json': 'val.json', 'test_json': 'test.json', 'work_dir': str(tmp_path / 'w')})
    n = len({r['image_hash'] for r in rows}) * 4
    assert n == 32  # 8 test images, 4 styles: 8 captions of each of the 4 kinds
    assert demo_report(conf, str(tmp_path / 'model')) == {'captions': n, 'style_followed': n // 2,
                                                           'content_correct': n // 2}
