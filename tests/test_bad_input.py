"""The bad-input matrix: every entry point answers bad input with a non-zero exit, one `error:` line
that names the culprit, no traceback, and nothing written or changed in work_dir."""
import json
import os
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

import finetune
import pre_inference
from utils import metrics
from utils.core.workdir import WorkDirLock


def snapshot(directory):
    d = Path(directory)
    if not d.exists():
        return None
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob('*')}


def png_header_only(path, width, height):
    """A PNG whose header claims width x height (a decompression bomb, as far as a reader can tell)."""
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(b'\0' * 100)))


@pytest.fixture
def bad_data(tmp_path, pcap):
    """A data set dir + image dir with one kind of problem per file/image."""
    ds, imgs = tmp_path / 'ds', tmp_path / 'imgs'
    ds.mkdir()
    imgs.mkdir()
    Image.effect_noise((320, 240), 64).convert('RGB').save(imgs / 'ok.jpg', quality=90)
    good = (imgs / 'ok.jpg').read_bytes()
    (imgs / 'trunc.jpg').write_bytes(good[: len(good) // 2])
    (imgs / 'zero.jpg').write_bytes(b'')
    (imgs / 'text.jpg').write_text('hello')
    png_header_only(imgs / 'huge.jpg', 40000, 40000)  # beyond PIL's own bomb limit
    png_header_only(imgs / 'big.jpg', 9000, 9000)      # beyond the toolkit's MAX_PIXELS
    row = {'personality': 'Happy', 'comment': 'nice', 'image_hash': 'ok'}
    files = {
        'train.json': [row],
        'val.json': [row],
        'notlist.json': {'rows': [row]},
        'nofields.json': [{'personality': 'Happy'}, {'comment': 'x'}],
        'emptycap.json': [row, dict(row, comment='  ')],
        'dupes.json': [row, dict(row)],
        'missingimg.json': [row, dict(row, image_hash='nope')],
        'trunc.json': [row, dict(row, image_hash='trunc')],
        'zero.json': [row, dict(row, image_hash='zero')],
        'text.json': [row, dict(row, image_hash='text')],
        'huge.json': [row, dict(row, image_hash='huge')],
        'big.json': [row, dict(row, image_hash='big')],
    }
    for name, content in files.items():
        (ds / name).write_text(json.dumps(content))
    (ds / 'notjson.json').write_text('[{"personality": ')
    return str(ds), str(imgs)


def train_case(make_conf, bad_data, extra_argv=(), **conf):
    ds, imgs = bad_data
    conf.setdefault('dataset_path', ds)
    conf.setdefault('img_addr', imgs)
    return ['train', '--conf', make_conf(**conf), *extra_argv]


TRAIN_CASES = {
    # conf
    'conf missing key': (dict(file_attr='__drop__'), (), '"file_attr"'),
    'conf unknown key': (dict(epochs=3), (), '"epochs"'),
    'conf wrong type': (dict(lr='fast'), (), '"lr"'),
    'negative batch': ({}, ('-b', '-4'), '"batch_size"'),
    'patch > max image size': (dict(patch_image_size=64, max_image_size=32), (), '"patch_image_size"'),
    'prompt without {}': (dict(prompt='describe it'), (), '"prompt"'),
    'model dir missing': (dict(model_name='/nonexistent/ofa'), (), '/nonexistent/ofa'),
    # data files
    'train file missing': (dict(train_json='nothere.json'), (), 'nothere.json'),
    'train file not JSON': (dict(train_json='notjson.json'), (), 'notjson.json'),
    'train file not a list': (dict(train_json='notlist.json'), (), 'notlist.json'),
    'rows missing fields': (dict(train_json='nofields.json'), (), 'no usable rows'),
    # bad rows, --strict
    'empty caption': (dict(train_json='emptycap.json'), ('--strict',), 'row 1: row with empty "comment"'),
    'duplicate row': (dict(train_json='dupes.json'), ('--strict',), 'row 1: duplicate row'),
    'image missing': (dict(train_json='missingimg.json'), ('--strict',), 'row 1: image missing'),
    'image truncated': (dict(train_json='trunc.json'), ('--strict',), 'row 1: image truncated'),
    'image 0 bytes': (dict(train_json='zero.json'), ('--strict',), 'row 1: image empty'),
    'not an image': (dict(train_json='text.json'), ('--strict',), 'row 1: image unreadable'),
    'image huge': (dict(train_json='huge.json'), ('--strict',), 'row 1: image too large'),
    'image too many pixels': (dict(train_json='big.json'), ('--strict',), 'row 1: image too large'),
    # checkpoints
    'checkpoint missing': ({}, ('-p', '/nonexistent/iter_5'), '/nonexistent/iter_5'),
    'latest without checkpoints': ({}, ('-p', 'latest'), 'no readable, undamaged checkpoint'),
}


def assert_one_line_error(capsys, code, culprit):
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith('error: ')]
    assert code != 0
    assert len(errors) == 1, err
    assert culprit in errors[0]
    assert 'Traceback' not in err


@pytest.mark.unit
@pytest.mark.parametrize('case', list(TRAIN_CASES))
def test_train_bad_input(case, make_conf, bad_data, capsys):
    conf, argv, culprit = TRAIN_CASES[case]
    args = train_case(make_conf, bad_data, argv, **conf)
    work_dir = json.loads(Path(args[2]).read_text())['work_dir']
    code = finetune.main(args)
    assert_one_line_error(capsys, code, culprit)
    assert not os.path.exists(work_dir)


@pytest.mark.unit
def test_checkpoint_that_is_not_a_checkpoint(make_conf, bad_data, tmp_path, capsys):
    fake = tmp_path / 'iter_7'
    Path(str(fake) + '.pth').write_bytes(b'garbage')
    Path(str(fake) + '_trainer_state.pth').write_bytes(b'garbage')
    args = train_case(make_conf, bad_data, ('-p', str(fake)))
    assert_one_line_error(capsys, finetune.main(args), 'cannot be loaded')


@pytest.mark.unit
def test_model_dir_without_configuration(make_conf, bad_data, tmp_path, capsys):
    (tmp_path / 'm').mkdir()
    args = train_case(make_conf, bad_data, model_name=str(tmp_path / 'm'))
    assert_one_line_error(capsys, finetune.main(args), 'configuration.json')


@pytest.mark.unit
def test_work_dir_in_use(make_conf, bad_data, capsys):
    args = train_case(make_conf, bad_data)
    work_dir = json.loads(Path(args[2]).read_text())['work_dir']
    with WorkDirLock(work_dir):
        before = snapshot(work_dir)
        assert_one_line_error(capsys, finetune.main(args), 'in use')
        assert snapshot(work_dir) == before


@pytest.mark.unit
def test_eval_without_a_trained_model(make_conf, capsys):
    path = make_conf()
    assert_one_line_error(capsys, finetune.main(['eval', '--conf', path]), 'no trained model')


@pytest.fixture
def trained_unchanged(trained):
    before = snapshot(trained[1])
    yield trained
    assert snapshot(trained[1]) == before


def write_list(tmp_path, content):
    j = tmp_path / 'list.json'
    j.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(j)


INFERENCE_CASES = {
    '-j not JSON': ('[{"style": ', 'is not valid JSON'),
    '-j not a list': ({'style': 'Happy'}, 'non-empty JSON list'),
    '-j row not an object': (['Happy'], 'row 0: not an object'),
    '-j unknown style': ([{'style': 'Happy', 'image_hash': 'test0001'}, {'style': 'Hapy', 'image_hash': 'test0001'}],
                         "row 1: unknown style 'Hapy'"),
    '-j image missing': ([{'style': 'Happy', 'image_hash': 'gone'}], 'row 0: image missing'),
    '-j reference not text': ([{'style': 'Happy', 'image_hash': 'test0001', 'reference': 3}], 'row 0: "reference"'),
}


@pytest.mark.integration
@pytest.mark.parametrize('case', list(INFERENCE_CASES))
def test_inference_bad_list(case, trained_unchanged, tmp_path, capsys):
    content, culprit = INFERENCE_CASES[case]
    code = pre_inference.main(['--conf', trained_unchanged[0], '-j', write_list(tmp_path, content)])
    assert_one_line_error(capsys, code, culprit)


@pytest.mark.parametrize('argv, culprit', [
    (['-n', '0'], '-n must be at least 1'),
    (['-m', '/nonexistent/model'], '/nonexistent/model'),
    (['-b', '0'], '"batch_size"'),
])
@pytest.mark.integration
def test_inference_bad_flags(argv, culprit, trained_unchanged, capsys):
    assert_one_line_error(capsys, pre_inference.main(['--conf', trained_unchanged[0], *argv]), culprit)


@pytest.mark.integration
def test_eval_bad_checkpoint(trained_unchanged, capsys):
    code = finetune.main(['eval', '--conf', trained_unchanged[0], '-p', str(trained_unchanged[1] / 'iter_99')])
    assert_one_line_error(capsys, code, 'iter_99')


@pytest.mark.parametrize('content, culprit', [
    ('not json', 'inf.json'),
    ('{"model_name": "x"}', 'inf.json'),
    ('{"results": [{"caption": "a", "reference": "b"}, {"caption": 3, "reference": "b"}]}', 'row 2'),
])
@pytest.mark.unit
def test_metrics_bad_file(tmp_path, capsys, content, culprit):
    f = tmp_path / 'inf.json'
    f.write_text(content)
    code = metrics.main([str(f)])
    assert_one_line_error(capsys, code, culprit)
    assert sorted(os.listdir(tmp_path)) == ['inf.json']


@pytest.mark.integration
def test_greyscale_and_cmyk_images_are_captioned(trained_unchanged, tmp_path):
    Image.effect_noise((60, 50), 40).save(tmp_path / 'grey.jpg')
    Image.new('CMYK', (60, 50), (0, 200, 200, 0)).save(tmp_path / 'cmyk.jpg')
    items = [{'style': 'Happy', 'image': str(tmp_path / n)} for n in ('grey.jpg', 'cmyk.jpg')]
    out = tmp_path / 'out'
    assert pre_inference.main(['--conf', trained_unchanged[0], '-j', write_list(tmp_path, items), '-o', str(out)]) == 0
    results = json.loads(next(out.glob('inference_*.json')).read_text())['results']
    assert [r['image'] for r in results] == [i['image'] for i in items] and all(r['caption'] for r in results)
