"""A decoded-and-resized image cache for training: every image is decoded and resized once, then read
back as raw pixels in every epoch and every later run.

Personality-Captions images are full-size YFCC JPEGs; decoding and bicubic-resizing each of them in every
epoch dominates the data path. The cache holds, for one ``patch_image_size``, each image exactly as
ModelScope's OFA caption preprocessor would feed it to ToTensor (RGB, bicubic resize to size x size), in
one uint8 memory-mapped file. A tensor built from the cache is bit-identical to one built from the file.

The cache file's name carries the image size and a digest of the image list (paths, sizes, mtimes):
another image size or a changed image set gets a new file; an unchanged one is reused. Files are written
under a temporary name and renamed when complete.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from PIL import Image
from tqdm import tqdm

from utils.data.images import open_image

logger = logging.getLogger(__name__)
VERSION = 1


def load_resized(path: str, size: int) -> np.ndarray:
    """What ModelScope's caption transform does before ToTensor: RGB, bicubic resize to size x size."""
    with open_image(path) as im:  # the toolkit's limits (utils/data/images.py)
        return np.asarray(im.convert('RGB').resize((size, size), Image.BICUBIC), dtype=np.uint8)


class ImageCache:
    def __init__(self, file: str, index: Dict[str, int], size: int):
        self.file, self.index, self.size = file, index, size
        self.pixels = np.memmap(file, dtype=np.uint8, mode='r', shape=(len(index), size, size, 3))

    def __getstate__(self):  # dataloader workers reopen the file instead of copying its pixels
        return {'file': self.file, 'index': self.index, 'size': self.size}

    def __setstate__(self, state):
        self.__init__(**state)

    def get(self, path: str) -> Optional[np.ndarray]:
        i = self.index.get(path)
        return None if i is None else self.pixels[i]

    @classmethod
    def open_or_build(cls, folder: str, paths: List[str], size: int, workers: int = 4) -> 'ImageCache':
        paths = sorted(set(paths))
        digest = hashlib.sha1(json.dumps([VERSION, size]).encode())
        for p in paths:
            st = os.stat(p)
            digest.update(f'{p}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
        data = Path(folder) / f'images_{size}px_{digest.hexdigest()[:16]}.u8'
        if data.is_file():
            logger.info('image cache: reusing %s (%d images at %d px)', data, len(paths), size)
        else:
            cls._build(data, paths, size, workers)
        return cls(os.fspath(data), {p: i for i, p in enumerate(paths)}, size)

    @staticmethod
    def _build(data: Path, paths: List[str], size: int, workers: int) -> None:
        data.parent.mkdir(parents=True, exist_ok=True)
        tmp = data.with_suffix('.u8.tmp')
        pixels = np.memmap(tmp, dtype=np.uint8, mode='w+', shape=(len(paths), size, size, 3))
        logger.info('image cache: decoding and resizing %d images to %d px into %s', len(paths), size, data)

        def fill(i, out=pixels):
            out[i] = load_resized(paths[i], size)

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for _ in tqdm(pool.map(fill, range(len(paths))), total=len(paths), desc='image cache', unit='img'):
                pass
        pixels.flush()
        os.replace(tmp, data)  # complete: only now under its final name
