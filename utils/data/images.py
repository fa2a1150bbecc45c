"""Images of data rows: where a row's image is, and the one image loader of every entry point (training, eval,
``-j``, ``pipeline()``, the web demo), with the toolkit's limits applied at each decode.

The limits (:data:`MAX_PIXELS`, :data:`MAX_BYTES`, no truncated data, PNG text chunks of at most
:data:`MAX_TEXT_CHUNK`) are set around every decode by :func:`decode_limits`, whatever an imported module set
process-wide: ModelScope's ``preprocessors/ofa/image_classification.py`` sets ``Image.MAX_IMAGE_PIXELS = None``
and ``ImageFile.LOAD_TRUNCATED_IMAGES = True`` on import. The pixel count is checked from the header, before
any pixel is decoded, so a small file claiming a huge image is refused without allocating it."""
from __future__ import annotations

import contextlib
import io
import os
import threading
from typing import Optional

from PIL import Image, ImageFile, PngImagePlugin

MAX_PIXELS = 50_000_000  # larger images (decompression bombs, panoramas) are refused
MAX_BYTES = 200_000_000  # larger image files are refused
MAX_TEXT_CHUNK = 1 << 20  # a PNG text chunk that inflates beyond this (a text bomb) makes the file unreadable
CHECK_VERSION = 1  # of check_image's verdicts: change it when check_image accepts or refuses otherwise (the
# verdicts remembered in work_dir, utils/data/image_checks.py, are then checked again)
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')

_lock = threading.Lock()
_active = 0
_saved: dict = {}


class ImageError(ValueError):
    """An image that cannot be used; ``reason`` is the short reason ('image truncated', ...), the message names
    the input."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def image_path(img_addr: str, value: str, file_attr: str) -> str:
    """Where a row's image is: an absolute path as it is; a value that already ends in file_attr or an image
    suffix (``abc.png``) inside img_addr; otherwise img_addr + value + file_attr (PCap's ``image_hash``).
    A trailing separator on img_addr does not matter."""
    if os.path.isabs(value):
        return value
    if value.lower().endswith(file_attr.lower()) or os.path.splitext(value)[1].lower() in IMAGE_SUFFIXES:
        return os.path.join(img_addr, value)
    return os.path.join(img_addr, value + file_attr)


@contextlib.contextmanager
def decode_limits():
    """PIL's process-wide settings at the toolkit's limits while the block runs (restored when the last
    concurrent block ends); decodes in other threads inside such a block share them."""
    global _active
    with _lock:
        if _active == 0:
            _saved.update(pixels=Image.MAX_IMAGE_PIXELS, truncated=ImageFile.LOAD_TRUNCATED_IMAGES,
                          text=PngImagePlugin.MAX_TEXT_CHUNK)
        _active += 1
        Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # the toolkit checks MAX_PIXELS itself from the header
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        PngImagePlugin.MAX_TEXT_CHUNK = MAX_TEXT_CHUNK
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                Image.MAX_IMAGE_PIXELS = _saved['pixels']
                ImageFile.LOAD_TRUNCATED_IMAGES = _saved['truncated']
                PngImagePlugin.MAX_TEXT_CHUNK = _saved['text']


def _read_url(url: str) -> bytes:
    import urllib.request
    with urllib.request.urlopen(url, timeout=60) as r:  # noqa: S310 - the user's URL, http(s) only
        data = r.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise ImageError(f'image {url}: more than {MAX_BYTES} bytes', 'image too large')
    return data


def _decode(source, name: str, draft: bool = False) -> Image.Image:
    """The decoded image of a path, URL or bytes; ImageError (naming ``name``) if it cannot be used."""
    if isinstance(source, str) and source.startswith(('http://', 'https://')):
        source = _read_url(source)
    if isinstance(source, (bytes, bytearray)):
        size, fp = len(source), io.BytesIO(source)
    else:
        try:
            size = os.path.getsize(source)
        except OSError:
            raise ImageError(f'{name}: image missing', 'image missing') from None
        fp = source
    if size == 0:
        raise ImageError(f'{name}: image empty', 'image empty')
    if size > MAX_BYTES:
        raise ImageError(f'{name}: image too large ({size} bytes; at most {MAX_BYTES})', 'image too large')
    with decode_limits():
        try:
            im = Image.open(fp)  # reads the header only
            try:
                if im.size[0] * im.size[1] > MAX_PIXELS:
                    raise ImageError(f'{name}: image too large ({im.size[0]}x{im.size[1]} pixels; at most '
                                     f'{MAX_PIXELS})', 'image too large')
                if draft and im.format == 'JPEG':
                    im.draft('RGB', (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))  # a real, scaled decode
                im.load()
            except BaseException:
                im.close()
                raise
        except ImageError:
            raise
        except Image.DecompressionBombError:
            raise ImageError(f'{name}: image too large (over {MAX_PIXELS} pixels)', 'image too large') from None
        except MemoryError:
            raise ImageError(f'{name}: image too large (out of memory decoding it)', 'image too large') from None
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a bad file
            reason = 'image truncated' if 'truncated' in str(e) else 'image unreadable'
            raise ImageError(f'{name}: {reason} ({type(e).__name__}: {e})', reason) from None
    return im


def open_image(source, where: Optional[str] = None) -> Image.Image:
    """The decoded image of a path, an http(s) URL, bytes or a PIL image, within the toolkit's limits; an image
    that cannot be used is an :class:`ImageError` (a ValueError) whose message names the input (``where``, e.g.
    ``input 3``, then the path)."""
    name = ' '.join(p for p in (where, str(source) if isinstance(source, str) else None) if p) or 'image'
    if isinstance(source, Image.Image):
        if source.size[0] * source.size[1] > MAX_PIXELS:
            raise ImageError(f'{name}: image too large ({source.size[0]}x{source.size[1]} pixels; at most '
                             f'{MAX_PIXELS})', 'image too large')
        return source
    return _decode(source, name)


def check_image(path: str) -> Optional[str]:
    """None if the image can be used, else the short reason it cannot ('image truncated', ...): the verdict of
    :func:`open_image` (a JPEG is decoded at 1/8 scale, which reads all of its data)."""
    try:
        _decode(path, path, draft=True).close()
    except ImageError as e:
        return e.reason
    return None
