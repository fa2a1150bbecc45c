"""Reading Personality-Captions files."""
import json
import logging

import pytest
from PIL import Image

from utils.core.errors import DataError
from utils.data.images import check_image
from utils.data.rows import read_split, read_styles

pytestmark = pytest.mark.unit


def write_rows(path, rows):
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture
def images(tmp_path):
    d = tmp_path / 'imgs'
    d.mkdir()
    for name in ('a', 'b', 'c', 'd'):
        Image.effect_noise((320, 240), 64).convert('RGB').save(d / f'{name}.jpg', quality=90)
    data = (d / 'c.jpg').read_bytes()
    (d / 'c.jpg').write_bytes(data[: len(data) // 2])  # truncated download
    (d / 'e.jpg').write_bytes(b'')                      # 0 bytes
    (d / 'f.jpg').write_text('not an image')
    return d


def row(style, text, image, extra=None):
    r = {'personality': style, 'comment': text, 'image_hash': image}
    if extra is not None:
        r['additional_comments'] = extra
    return r


def test_rows_renamed_and_references_collected(tmp_path, images):
    f = write_rows(tmp_path / 'test.json', [row('Happy', 'so nice', 'a', ['lovely', 'great']), row('Sad', 'meh', 'b')])
    rows, stats = read_split(f, str(images), '.jpg', 'test')
    assert rows[0]['style'] == 'Happy' and rows[0]['text'] == 'so nice'
    assert rows[0]['references'] == ['so nice', 'lovely', 'great']
    assert rows[1]['references'] == ['meh']
    assert rows[0]['image'] == str(images / 'a.jpg')
    assert stats.kept == 2 and not stats.skipped


@pytest.mark.parametrize('suffix', ['', '/'])
def test_img_addr_trailing_slash_does_not_matter(tmp_path, images, suffix):
    f = write_rows(tmp_path / 'train.json', [row('Happy', 'so nice', 'a')])
    rows, _ = read_split(f, str(images) + suffix, '.jpg', 'train')
    assert rows[0]['image'].replace('//', '/') == str(images / 'a.jpg')
    assert '//' not in rows[0]['image']


def test_bad_rows_and_images_are_skipped_and_counted(tmp_path, images, caplog):
    f = write_rows(tmp_path / 'train.json', [
        row('Happy', 'ok', 'a'),
        row('Happy', 'missing image', 'zzz'),
        row('Happy', 'truncated', 'c'),
        row('Happy', 'empty file', 'e'),
        row('Happy', 'not an image', 'f'),
        {'personality': 'Happy', 'image_hash': 'b'},
        row('Happy', '   ', 'b'),
        'not a row',
        row('Sad', 'ok too', 'd'),
    ])
    with caplog.at_level(logging.INFO):
        rows, stats = read_split(f, str(images), '.jpg', 'train')
    assert [r['text'] for r in rows] == ['ok', 'ok too']
    assert stats.rows == 9 and stats.kept == 2
    assert stats.skipped == {'image missing': 1, 'image truncated': 1, 'image empty': 1,
                             'image unreadable': 1, 'row without "comment"': 1, 'row with empty "comment"': 1,
                             'row not an object': 1}
    assert 'train: 2/9 rows kept; skipped 7' in caplog.text


def test_strict_mode_stops_at_the_first_bad_row(tmp_path, images):
    f = write_rows(tmp_path / 'train.json', [row('Happy', 'ok', 'a'), row('Happy', 'x', 'c')])
    with pytest.raises(DataError, match=r'row 1: image truncated'):
        read_split(f, str(images), '.jpg', 'train', strict=True)


@pytest.mark.parametrize('content, message', [('{"a": 1}', 'must hold a JSON list'), ('[{', 'not valid JSON')])
def test_file_not_a_list_or_not_json(tmp_path, images, content, message):
    f = tmp_path / 'train.json'
    f.write_text(content)
    with pytest.raises(DataError, match=message):
        read_split(f, str(images), '.jpg', 'train')


def test_check_image_accepts_png_and_greyscale(tmp_path):
    Image.new('L', (10, 10)).save(tmp_path / 'g.png')
    Image.new('CMYK', (10, 10)).save(tmp_path / 'k.jpg')
    assert check_image(str(tmp_path / 'g.png')) is None
    assert check_image(str(tmp_path / 'k.jpg')) is None


def test_styles_from_personalities_plus_those_it_lacks(tmp_path, caplog):
    (tmp_path / 'personalities.txt').write_text('Happy\nAnxious (Nervous)\n\nOld-fashioned\n')
    rows = [{'style': s} for s in ('Happy', 'Zany', 'Anxious (Nervous)', 'Bland')]
    with caplog.at_level(logging.WARNING):
        styles = read_styles(str(tmp_path), rows)
    assert styles == ['Happy', 'Anxious (Nervous)', 'Old-fashioned', 'Bland', 'Zany']
    assert '2 styles used by the data are missing' in caplog.text and 'Bland, Zany' in caplog.text


def test_styles_without_personalities_file(tmp_path):
    assert read_styles(str(tmp_path), [{'style': 'b'}, {'style': 'a'}, {'style': 'b'}]) == ['a', 'b']
