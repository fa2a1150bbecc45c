"""The stylish preprocessors: the style reaches the encoded source; eval/inference are deterministic."""
import pytest
import torch

from utils.core.conf import DEFAULT_PROMPT
from utils.data.styles import StyleMap
from utils.core.errors import UnknownStyleError

pytestmark = pytest.mark.unit

STYLES = ['Happy', 'Sarcastic', 'Anxious (Nervous)']


@pytest.fixture(scope='module')
def image(pcap):
    return f'{pcap[1]}/train0000.jpg'


def make(tiny_model, tokenize, mode='inference'):
    from preprocessors import OfaPreprocessorForStylishIC
    sm = StyleMap.build(STYLES, tokenize, DEFAULT_PROMPT)
    return OfaPreprocessorForStylishIC(tiny_model, mode=mode, style_map=sm, no_collate=True)


def test_registered_with_modelscope():
    from modelscope.preprocessors.builder import PREPROCESSORS
    from modelscope.utils.constant import Fields

    from preprocessors import STYLISH_IC_PREPROCESSOR, OfaPreprocessorForStylishIC
    assert PREPROCESSORS.get(STYLISH_IC_PREPROCESSOR, group_key=Fields.multi_modal) is OfaPreprocessorForStylishIC


def test_style_token_in_source(tiny_model, image):
    p = make(tiny_model, True)
    tok = p.tokenizer
    a = p({'image': image, 'style': 'Happy'})['source']
    b = p({'image': image, 'style': 'Anxious (Nervous)'})['source']
    assert tok.convert_tokens_to_ids('<code_0>') in a.tolist()
    assert tok.convert_tokens_to_ids('<code_2>') in b.tolist()
    assert not torch.equal(a, b)


def test_style_words_in_source(tiny_model, image):
    p = make(tiny_model, False)
    a = p({'image': image, 'style': 'Sarcastic'})['source']
    b = p({'image': image, 'style': 'Happy'})['source']
    assert 'Sarcastic' in p.tokenizer.decode(a) and 'Happy' in p.tokenizer.decode(b)
    assert not torch.equal(a, b)


def test_train_sample_has_target(tiny_model, image):
    p = make(tiny_model, True, mode='train')
    s = p({'image': image, 'style': 'Happy', 'text': 'what a lovely red circle'})
    assert p.tokenizer.decode(s['target'], skip_special_tokens=True).strip() == 'what a lovely red circle'
    assert s['prev_output_tokens'][0].item() == p.tokenizer.bos_token_id


def test_mode_reaches_inner_preprocessor(tiny_model):
    p = make(tiny_model, True, mode='train')
    p.mode = 'eval'
    assert p.preprocess.mode == 'eval'


def test_eval_is_deterministic(tiny_model, image):
    p = make(tiny_model, True, mode='eval')
    a = p({'image': image, 'style': 'Happy'})
    b = p({'image': image, 'style': 'Happy'})
    assert torch.equal(a['patch_image'], b['patch_image']) and torch.equal(a['source'], b['source'])


def test_unknown_style_is_an_error(tiny_model, image):
    with pytest.raises(UnknownStyleError, match='nearest known'):
        make(tiny_model, True)({'image': image, 'style': 'Sarcastc'})


def test_saved_with_model_and_reloaded(tiny_model, tmp_path, image):
    from preprocessors import OfaPreprocessorForStylishIC
    p = make(tiny_model, True)
    out = tmp_path / 'out'
    p.save_pretrained(str(out))
    assert (out / 'style_map.json').is_file()
    # a model dir = the tiny model + the saved map: the reloaded preprocessor encodes identically
    import shutil
    model_copy = tmp_path / 'model'
    shutil.copytree(tiny_model, model_copy)
    shutil.copy(out / 'style_map.json', model_copy)
    q = OfaPreprocessorForStylishIC(str(model_copy), no_collate=True)
    for style in STYLES:
        assert torch.equal(p({'image': image, 'style': style})['source'], q({'image': image, 'style': style})['source'])


def test_image_cache_gives_identical_samples_and_is_reused(tiny_model, pcap, tmp_path, caplog):
    import logging

    from utils.data.image_cache import ImageCache
    images = [f'{pcap[1]}/train{i:04d}.jpg' for i in range(6)]
    plain = make(tiny_model, True, mode='train')
    cached = make(tiny_model, True, mode='train')
    cached.preprocess.use_image_cache(ImageCache.open_or_build(str(tmp_path), images, 32))
    for img in images:
        a = plain({'image': img, 'style': 'Happy', 'text': 'a b'})
        b = cached({'image': img, 'style': 'Happy', 'text': 'a b'})
        assert torch.equal(a['patch_image'], b['patch_image'])
    assert len(list(tmp_path.glob('*.u8'))) == 1
    with caplog.at_level(logging.INFO):
        ImageCache.open_or_build(str(tmp_path), images, 32)
    assert 'reusing' in caplog.text
    ImageCache.open_or_build(str(tmp_path), images, 48)  # another image size: another cache file
    assert len(list(tmp_path.glob('*.u8'))) == 2
    with pytest.raises(ValueError, match='48 px'):
        cached.preprocess.use_image_cache(ImageCache.open_or_build(str(tmp_path), images, 48))
    import pickle
    clone = pickle.loads(pickle.dumps(ImageCache.open_or_build(str(tmp_path), images, 32)))  # what workers get
    assert (clone.get(images[2]) == cached.preprocess.image_cache.get(images[2])).all()


def test_a_row_that_breaks_only_at_decode_time_is_replaced_by_the_next(tiny_model, pcap, tmp_path, caplog):
    """An image that passed the read-time check and broke afterwards (a network disk, a file overwritten
    during a long run): the train dataset logs it, counts it and hands the next row's sample instead."""
    import shutil

    from utils.data.images import check_image
    from utils.data.dataset import StylishCaptionDataset
    pre = make(tiny_model, True, mode='train')
    breaks = tmp_path / 'breaks.jpg'
    shutil.copy(f'{pcap[1]}/train0000.jpg', breaks)
    assert check_image(str(breaks)) is None  # the check at read time passes
    rows = [{'style': 'Happy', 'text': 'what a lovely red circle', 'image': str(breaks), 'row': 0},
            {'style': 'Sarcastic', 'text': 'oh great a cross', 'image': f'{pcap[1]}/train0001.jpg', 'row': 1}]
    dataset = StylishCaptionDataset(rows, pre)
    breaks.write_bytes(b'\xff\xd8 no longer a jpeg')
    sample = dataset[0]
    expected = pre(rows[1])
    assert torch.equal(sample['target'], expected['target'])
    assert torch.equal(sample['patch_image'], expected['patch_image'])
    assert dataset.failed == 1
    assert 'row 0 skipped at load time' in caplog.text
