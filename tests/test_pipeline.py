"""ModelScope's pipeline() on a model dir this toolkit trained: registration, configuration.json, captions equal
to pre_inference.py's, inputs (path, PIL image, URL, lists with batch_size), errors."""
import functools
import http.server
import json
import threading
from pathlib import Path

import pytest
from PIL import Image

import pre_inference
import preprocessors
from preprocessors import STYLISH_IC_PIPELINE, STYLISH_IC_PREPROCESSOR, StylishImageCaptioningPipeline
from utils.core.errors import UnknownStyleError

pytestmark = pytest.mark.integration


@pytest.fixture(scope='module')
def output_dir(trained):
    return str(Path(trained[1], 'output').resolve())  # absolute: a relative a/b looks like a hub id


@pytest.fixture(scope='module')
def stylish_pipeline(output_dir):
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks
    return pipeline(Tasks.image_captioning, model=output_dir)


@pytest.fixture(scope='module')
def items(trained):
    """Mixed styles (prompts of different lengths without style tokens), one image in two styles."""
    img_addr = Path(json.loads(Path(trained[0]).read_text())['img_addr'])
    pairs = [('Sarcastic', 'test0001'), ('Happy', 'test0001'), ('Anxious', 'test0002'), ('Romantic', 'test0003'),
             ('Happy', 'test0004'), ('Sarcastic', 'test0005')]
    return [{'style': s, 'image': str(img_addr / f'{h}.jpg')} for s, h in pairs]


def pre_inference_captions(conf_path, items, out_dir, *flags):
    """Captions pre_inference.py writes for a -j list of items."""
    out_dir.mkdir(parents=True, exist_ok=True)
    listing = out_dir / 'list.json'
    listing.write_text(json.dumps(items))
    assert pre_inference.main(['--conf', conf_path, '-j', str(listing), '-o', str(out_dir), '-b', '2', *flags]) == 0
    result = json.loads(next(out_dir.glob('inference_*.json')).read_text())
    return [r['caption'] for r in result['results']]


@pytest.mark.parametrize('sub_dir', ['output', 'output_best'])
def test_saved_model_dir_names_the_pipeline_and_preprocessor(trained, sub_dir):
    model_dir = Path(trained[1], sub_dir)
    if sub_dir == 'output_best' and not model_dir.exists():
        pytest.skip('this training run wrote no output_best/ (no validation)')
    cfg = json.loads((model_dir / 'configuration.json').read_text())
    assert cfg['pipeline'] == {'type': STYLISH_IC_PIPELINE}  # CheckpointHook had set it to the task
    assert cfg['preprocessor'] == {'type': STYLISH_IC_PREPROCESSOR}
    assert cfg['task'] == 'image-captioning'


def test_pipeline_builds_the_toolkits_classes(stylish_pipeline, output_dir):
    from modelscope.preprocessors import Preprocessor
    assert type(stylish_pipeline) is StylishImageCaptioningPipeline
    assert isinstance(stylish_pipeline.preprocessor, preprocessors.OfaPreprocessorForStylishIC)
    assert stylish_pipeline.styles == ['Happy', 'Sarcastic', 'Romantic', 'Anxious']
    # ModelScope's own preprocessor factory reads the same configuration.json
    assert isinstance(Preprocessor.from_pretrained(output_dir), preprocessors.OfaPreprocessorForStylishIC)


def test_captions_equal_pre_inference(trained, stylish_pipeline, items, tmp_path):
    expected = pre_inference_captions(trained[0], items, tmp_path / 'default')
    out = stylish_pipeline(items, batch_size=4)
    assert [o['caption'] for o in out] == expected


def test_captions_equal_pre_inference_where_they_differ(trained, random_output, items, tmp_path):
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks
    expected = pre_inference_captions(trained[0], items, tmp_path, '-m', random_output)
    assert expected[0] != expected[1] and len(set(expected)) >= 3  # style and image change the caption
    captioner = pipeline(Tasks.image_captioning, model=random_output)
    assert [o['caption'] for o in captioner(items, batch_size=4)] == expected
    assert [o['caption'] for o in captioner(items)] == expected


def test_generation_settings_equal_pre_inference(trained, output_dir, items, tmp_path):
    from modelscope.pipelines import pipeline
    expected = pre_inference_captions(trained[0], items, tmp_path, '--beam_size', '2', '--max_len', '4',
                                      '--no_repeat_ngram_size', '0')
    short = pipeline('image-captioning', model=output_dir, beam_size=2, max_len=4, no_repeat_ngram_size=0)
    assert [o['caption'] for o in short(items, batch_size=5)] == expected
    assert all(len(c.split()) <= 4 for c in expected)


def test_mask_image_tokens_is_on_by_default_and_off_as_pre_inferences_flag(trained, random_output, items, tmp_path):
    """mask_image_tokens (the conf key, on by default): pipeline() takes it as an argument; off, its captions are
    pre_inference.py --no-mask_image_tokens's; a value that is not a bool is refused naming the argument."""
    from modelscope.pipelines import pipeline
    assert pipeline('image-captioning', model=random_output).captioner.model.generator.mask_image_tokens
    unmasked = pipeline('image-captioning', model=random_output, mask_image_tokens=False)
    assert not unmasked.captioner.model.generator.mask_image_tokens
    expected = pre_inference_captions(trained[0], items, tmp_path, '-m', random_output, '--no-mask_image_tokens')
    assert [o['caption'] for o in unmasked(items, batch_size=2)] == expected
    with pytest.raises(ValueError, match='pipeline\\(\\) argument mask_image_tokens must be True or False'):
        pipeline('image-captioning', model=random_output, mask_image_tokens='yes')


def test_pil_image_url_and_default_style(stylish_pipeline, items):
    sarcastic = stylish_pipeline(items[0])['caption']
    with Image.open(items[0]['image']) as img:
        assert stylish_pipeline({'image': img.copy(), 'style': 'Sarcastic'}) == {'caption': sarcastic}
    assert stylish_pipeline(items[0]['image'], style='Sarcastic') == {'caption': sarcastic}
    assert stylish_pipeline([{'image': items[0]['image']}], style='Sarcastic') == [{'caption': sarcastic}]

    image_dir = Path(items[0]['image']).parent
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(image_dir))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)  # loopback only: no network
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f'http://127.0.0.1:{server.server_port}/{Path(items[0]["image"]).name}'
        assert stylish_pipeline({'image': url, 'style': 'Sarcastic'}) == {'caption': sarcastic}
    finally:
        server.shutdown()
        server.server_close()


def test_unknown_style_is_pre_inferences_error(trained, stylish_pipeline, items, tmp_path, capsys):
    bad = [items[0], {'style': 'sarcastic', 'image': items[0]['image']}]
    listing = tmp_path / 'list.json'
    listing.write_text(json.dumps(bad))
    assert pre_inference.main(['--conf', trained[0], '-j', str(listing), '-o', str(tmp_path)]) == 2
    cli_error = capsys.readouterr().err.strip().splitlines()[-1]
    with pytest.raises(UnknownStyleError) as single:
        stylish_pipeline(bad[1])
    with pytest.raises(UnknownStyleError) as listed:
        stylish_pipeline(bad, batch_size=2)
    assert "unknown style 'sarcastic'" in str(single.value) and "nearest known: 'Sarcastic'" in str(single.value)
    assert cli_error.endswith(f'row 1: {single.value}') and str(listed.value) == f'row 1: {single.value}'


@pytest.mark.parametrize('bad, message', [
    ({'image': 'IMAGE'}, 'input: no style: give "style"'),
    ({'style': 'Happy'}, 'input: needs "image"'),
    ({'image': '/nonexistent/a.jpg', 'style': 'Happy'}, 'input: image file /nonexistent/a.jpg does not exist'),
    ({'image': 3, 'style': 'Happy'}, 'input: "image" must be a path, URL or PIL image, not int'),
    ([{'image': 'IMAGE', 'style': 'Happy'}, {'image': 'IMAGE'}], 'input 1: no style'),
])
def test_bad_input_is_a_clear_error(stylish_pipeline, items, bad, message):
    bad = json.loads(json.dumps(bad).replace('IMAGE', items[0]['image']))
    with pytest.raises(ValueError, match='^' + message.replace('(', r'\(').replace('"', '"')):
        stylish_pipeline(bad)


def test_a_preprocessor_argument_is_refused(output_dir):
    from modelscope.pipelines import pipeline
    from preprocessors import OfaPreprocessorForStylishIC
    with pytest.raises(ValueError, match='builds its own preprocessor'):
        pipeline('image-captioning', model=output_dir, preprocessor=OfaPreprocessorForStylishIC(output_dir))
