"""Images of data rows: where a row's image is, and whether it can be used (without decoding every pixel
where the format allows)."""
from __future__ import annotations

import os
from typing import Optional

from PIL import Image

JPEG_EOI = b'\xff\xd9'
MAX_PIXELS = 50_000_000  # larger images (decompression bombs, panoramas) are skipped
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')


def image_path(img_addr: str, value: str, file_attr: str) -> str:
    """Where a row's image is: an absolute path as it is; a value that already ends in file_attr or an image
    suffix (``abc.png``) inside img_addr; otherwise img_addr + value + file_attr (PCap's ``image_hash``).
    A trailing separator on img_addr does not matter."""
    if os.path.isabs(value):
        return value
    if value.lower().endswith(file_attr.lower()) or os.path.splitext(value)[1].lower() in IMAGE_SUFFIXES:
        return os.path.join(img_addr, value)
    return os.path.join(img_addr, value + file_attr)


def check_image(path: str) -> Optional[str]:
    """None if the image can be used, else the reason it cannot (without decoding every pixel)."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return 'image missing'
    if size == 0:
        return 'image empty'
    try:
        with Image.open(path) as im:  # reads the header only
            if im.size[0] * im.size[1] > MAX_PIXELS:
                return 'image too large'
            if im.format != 'JPEG':
                im.load()  # no cheap truncation marker: decode for real
                return None
        with open(path, 'rb') as f:  # a truncated JPEG has lost its end-of-image marker
            f.seek(max(0, size - 64))
            if JPEG_EOI not in f.read():
                return 'image truncated'
    except Image.DecompressionBombError:
        return 'image too large'
    except Exception:  # noqa: BLE001 - PIL raises many kinds for a bad file
        return 'image unreadable'
    return None
