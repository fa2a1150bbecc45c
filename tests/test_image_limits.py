"""issue 22, items 1, 5 (position buckets) and 6: one image loader with the toolkit's limits, whatever ModelScope
set process-wide; pipeline() keyword arguments checked like conf keys; bad inputs named by their index."""
import io
import json
import struct
import zlib
from types import SimpleNamespace

import modelscope.preprocessors.ofa.image_classification  # noqa: F401 - sets PIL's globals: the hostile setting
import pytest
from PIL import Image, ImageFile

pytestmark = pytest.mark.unit


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff)


def png_bytes(size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise(size, 64).convert('RGB').save(buf, 'PNG')
    return buf.getvalue()


@pytest.fixture
def hostile(tmp_path):
    files = {}
    png = png_bytes()
    files['truncated.png'] = png[:len(png) // 2]
    files['bomb.gif'] = b'GIF89a' + struct.pack('<HH', 65535, 65535) + b'\x00\x00\x00' + \
        b',\x00\x00\x00\x00' + struct.pack('<HH', 65535, 65535) + b'\x00\x02\x02D\x01\x00;'
    text = b'k\x00\x00' + zlib.compress(b'\x00' * (64 << 20), 9)  # zTXt: 64 MB of text
    files['ztxt.png'] = png[:33] + _png_chunk(b'zTXt', text) + png[33:]
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 64).convert('RGB').save(buf, 'JPEG')
    files['trailing.jpg'] = buf.getvalue() + b'\x00' * 100 + b'trailing bytes after the end marker' * 10
    files['cut.jpg'] = buf.getvalue()[:len(buf.getvalue()) // 2]
    files['ok.png'] = png
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path


def test_modelscope_sets_the_hostile_globals():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True and Image.MAX_IMAGE_PIXELS is None


def test_gif_is_29_bytes(hostile):
    assert (hostile / 'bomb.gif').stat().st_size == 29


@pytest.mark.parametrize('name,reason', [('truncated.png', 'image truncated'), ('bomb.gif', 'image too large'),
                                         ('ztxt.png', 'image unreadable'), ('cut.jpg', 'image truncated'),
                                         ('trailing.jpg', None), ('ok.png', None)])
def test_check_image_verdict_with_modelscope_imported(hostile, name, reason):
    from utils.data.images import check_image
    assert check_image(str(hostile / name)) == reason


@pytest.mark.parametrize('name', ['truncated.png', 'bomb.gif', 'ztxt.png', 'cut.jpg'])
def test_preprocessor_and_web_demo_refuse_what_the_check_refuses(hostile, name):
    """The captioning preprocessor (training, eval, pipeline()) decodes through the same loader: a ValueError naming
    the file, never a decoded truncated image or a 65535x65535 allocation; the web demo refuses the upload."""
    from utils.captioning.preprocessor import OfaStylishICPreprocessor
    from utils.demo.web_app import check_upload
    path = str(hostile / name)
    with pytest.raises(ValueError, match=name):
        OfaStylishICPreprocessor.get_img_pil(None, path)
    assert check_upload(path, 10 << 20) is not None


def test_preprocessor_accepts_jpeg_with_trailing_bytes(hostile):
    from utils.captioning.preprocessor import OfaStylishICPreprocessor
    from utils.demo.web_app import check_upload
    im = OfaStylishICPreprocessor.get_img_pil(None, str(hostile / 'trailing.jpg'))
    assert im.size == (64, 64) and im.mode == 'RGB'
    assert check_upload(str(hostile / 'trailing.jpg'), 10 << 20) is None


def test_globals_restored_after_a_decode(hostile):
    from utils.data.images import check_image
    check_image(str(hostile / 'ok.png'))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True and Image.MAX_IMAGE_PIXELS is None


def test_patch_image_size_beyond_position_buckets_names_the_key(tmp_path):
    from utils.captioning.preprocessor import check_patch_image_size
    from utils.core.errors import ConfError
    (tmp_path / 'config.json').write_text(json.dumps({'image_bucket_size': 5}))
    check_patch_image_size(str(tmp_path), 80)
    with pytest.raises(ConfError, match='"patch_image_size".*at most 80'):
        check_patch_image_size(str(tmp_path), 2048)


@pytest.mark.parametrize('kwargs,name', [({'beam_size': 0}, 'beam_size'), ({'precision': 'fp8'}, 'precision'),
                                         ({'patch_image_size': 7}, 'patch_image_size'), ({'device': 'cuda:7'}, 'device'),
                                         ({'max_len': 'x'}, 'max_len'), ({'no_repeat_ngram_size': -1},
                                                                         'no_repeat_ngram_size')])
def test_pipeline_kwargs_checked_like_conf_keys(kwargs, name):
    from utils.captioning.pipeline import StylishImageCaptioningPipeline
    with pytest.raises(ValueError, match=f'argument {name} '):
        StylishImageCaptioningPipeline('/nonexistent/model', **kwargs)


def test_pipeline_bad_item_named_by_index_before_any_work(hostile):
    from utils.captioning.pipeline import StylishImageCaptioningPipeline
    fake = SimpleNamespace(styles=['Happy'])
    ok = StylishImageCaptioningPipeline.preprocess(fake, {'image': str(hostile / 'trailing.jpg'), 'style': 'Happy'},
                                                  where='input 0')
    assert ok['style'] == 'Happy'
    with pytest.raises(ValueError, match='input 3: image truncated: .*truncated.png'):
        StylishImageCaptioningPipeline.preprocess(fake, {'image': str(hostile / 'truncated.png'), 'style': 'Happy'},
                                                  where='input 3')
    with pytest.raises(ValueError, match='input 1: image too large'):
        StylishImageCaptioningPipeline.preprocess(fake, {'image': Image.new('1', (10000, 10000)), 'style': 'Happy'},
                                                  where='input 1')
