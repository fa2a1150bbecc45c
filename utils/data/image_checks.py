"""What the image check (:func:`utils.data.images.check_image`) found, remembered across runs in one file of
work_dir, so that a resume or a second run does not decode every image again.

An entry is keyed by the image's path and its file's size, mtime and ctime (nanoseconds): a file that is changed,
replaced (``cp``, ``mv``, ``rsync -t`` all set a new ctime) or removed is checked again. The file is
``work_dir/.image_checks.bin``, written whole under a temporary name and renamed (readers never see half a file):

    MAGIC | header length (8 bytes, little-endian) | header (JSON) | body
    body = size, mtime_ns, ctime_ns (int64, n x 3) | verdict (int16, n: -1 usable, else an index into the reasons)
           | paths (UTF-8, each ended by NUL) | reasons (UTF-8, each ended by NUL)

The header holds the format, the toolkit's version, what the check depends on (its own version, the image
limits, Pillow's version), the entry count, the body's length and its sha256. A file that does not match in any of
these (another toolkit version, a damaged or truncated file, someone else's file) is ignored, logged once, and
replaced at the next save: never trusted blindly. Loading 186k entries takes about 0.1 s.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import PIL
from tqdm import tqdm

from utils import __version__
from utils.core.io import sweep_stale, writer_tag
from utils.data import images

logger = logging.getLogger(__name__)

CHECKS_FILE = '.image_checks.bin'
MAGIC = b'OFAStyleIC image checks\n'
FORMAT = 1
PROGRESS_FROM = 2000  # checks show a progress bar from this many images to decode on
THREADS = 8  # decodes at once (PIL releases the GIL while decoding)

Key = Tuple[int, int, int]  # size, mtime_ns, ctime_ns


def check_signature() -> dict:
    """What a remembered verdict depends on besides the file itself: a cache written under another is ignored."""
    return {'toolkit': __version__, 'check': images.CHECK_VERSION, 'pillow': PIL.__version__,
            'limits': [images.MAX_PIXELS, images.MAX_BYTES, images.MAX_TEXT_CHUNK]}


def _file_key(path: str) -> Optional[Key]:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None  # missing (or a name the OS refuses): checked every time, never remembered
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _name(path: str) -> str:
    """The name an entry is kept under: a relative path is relative to the current directory."""
    return path if path.startswith(os.sep) else os.path.abspath(path)


def _check_image(path: str) -> Optional[str]:
    return images.check_image(path)  # looked up at each call (a test may replace it); a module function pickles


def _encode(strings: Iterable[str]) -> bytes:
    return b''.join(s.encode('utf-8', 'surrogatepass') + b'\0' for s in strings)


def _decode(blob: bytes, n: int) -> List[str]:
    parts = blob.split(b'\0')
    if len(parts) != n + 1 or parts[-1]:
        raise ValueError('wrong number of strings')
    return [p.decode('utf-8', 'surrogatepass') for p in parts[:-1]]


class ImageChecks:
    """The verdicts of :func:`~utils.data.images.check_image` on image files, remembered in ``folder`` (None:
    nothing is remembered; every image is checked). :meth:`verdicts` checks only what is not remembered;
    :meth:`save` writes what it learnt and lets go of the entries it holds. ``checked`` counts the images decoded, ``reused`` those answered from the
    file."""

    def __init__(self, folder: Optional[str], check: Optional[Callable[[str], Optional[str]]] = None):
        self.path = os.path.join(folder, CHECKS_FILE) if folder else None
        self.check = check or _check_image
        self.checked = self.reused = 0
        self._known: Optional[Dict[str, tuple]] = None  # path -> (size, mtime_ns, ctime_ns, verdict)
        self._learnt: Dict[str, tuple] = {}

    # ---------------------------------------------------------------- reading
    def _read(self) -> Dict[str, tuple]:
        """The entries of the file; {} when there is none or it cannot be trusted (logged: why)."""
        if self.path is None:
            return {}
        try:
            with open(self.path, 'rb') as f:
                data = f.read()
        except FileNotFoundError:
            return {}
        except OSError as e:
            logger.warning('image checks: cannot read %s (%s); checking every image', self.path, e)
            return {}
        try:
            return self._parse(data)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, struct.error) as e:
            logger.warning('image checks: ignoring %s (%s); checking every image again', self.path, e)
            return {}

    @staticmethod
    def _parse(data: bytes) -> Dict[str, tuple]:
        if not data.startswith(MAGIC):
            raise ValueError('not an image checks file')
        start = len(MAGIC) + 8
        (size,) = struct.unpack('<Q', data[len(MAGIC):start])
        header = json.loads(data[start:start + size].decode('utf-8'))
        if not isinstance(header, dict) or header.get('format') != FORMAT:
            raise ValueError(f'format {header.get("format") if isinstance(header, dict) else "?"}, not {FORMAT}')
        if header.get('signature') != check_signature():
            raise ValueError(f'written by another toolkit or check ({header.get("signature")})')
        body = memoryview(data)[start + size:]
        if len(body) != header['body_bytes'] or hashlib.sha256(body).hexdigest() != header['sha256']:
            raise ValueError('damaged (length or sha256 of its content differs)')
        n, n_reasons = int(header['count']), int(header['reasons'])
        stats = np.frombuffer(body, dtype='<i8', count=3 * n).reshape(n, 3)
        verdict = np.frombuffer(body, dtype='<i2', count=n, offset=24 * n)
        strings = bytes(body[26 * n:])
        paths_blob_len = int(header['paths_bytes'])
        paths = _decode(strings[:paths_blob_len], n)
        reasons: List[Optional[str]] = _decode(strings[paths_blob_len:], n_reasons)
        if n and (int(verdict.min()) < -1 or int(verdict.max()) >= n_reasons):
            raise ValueError('verdict out of range')
        reasons.append(None)  # index -1: usable
        return {p: (s, m, c, reasons[v]) for p, (s, m, c), v in zip(paths, stats.tolist(), verdict.tolist())}

    def known(self) -> Dict[str, tuple]:
        if self._known is None:
            self._known = self._read()
        return self._known

    def forget(self) -> None:
        """Let go of the remembered entries (read again when needed): what :meth:`save` adds is kept. The object
        then travels light between processes (utils/core/beside.py)."""
        self._known = None

    # ---------------------------------------------------------------- checking
    def verdicts(self, paths: List[str], desc: str = 'checking images') -> Dict[str, Optional[str]]:
        """{path: None if usable, else the reason} for each path: remembered verdicts of unchanged files, the
        others decoded (in threads)."""
        known = self.known()
        out: Dict[str, Optional[str]] = {}
        todo: List[Tuple[str, Optional[Key]]] = []
        for p in paths:
            key = _file_key(p)
            entry = known.get(_name(p)) if key is not None else None
            if entry is not None and entry[:3] == key:
                out[p] = entry[3]
            else:
                todo.append((p, key))
        self.reused += len(out)
        if todo:
            with ThreadPoolExecutor(max_workers=THREADS) as pool:
                found = tqdm(pool.map(self.check, [p for p, _ in todo]), total=len(todo), desc=desc, unit='img',
                             disable=len(todo) < PROGRESS_FROM)
                for (p, key), reason in zip(todo, found):
                    out[p] = reason
                    if key is not None and _file_key(p) == key:  # unchanged while it was checked
                        self._learnt[_name(p)] = (*key, reason)
            self.checked += len(todo)
        return out

    # ---------------------------------------------------------------- writing
    def save(self) -> Optional[str]:
        """Write the remembered verdicts plus those learnt since (merged with what another process may have
        written meanwhile) when there is anything new. Returns the file written, or None."""
        if self.path is None or not self._learnt:
            self._known = None  # (read again if needed: a run keeps no 186k-entry dict for its whole length)
            return None
        folder = os.path.dirname(self.path)
        sweep_stale(folder, rf'{re.escape(CHECKS_FILE)}\.@.+\.tmp', 'image check temporaries')
        entries = {**self._read(), **self._learnt}
        reasons = sorted({e[3] for e in entries.values() if e[3] is not None})
        code = {r: i for i, r in enumerate(reasons)}
        paths = list(entries)
        stats = np.array([e[:3] for e in entries.values()], dtype='<i8').reshape(len(paths), 3)
        verdict = np.array([-1 if e[3] is None else code[e[3]] for e in entries.values()], dtype='<i2')
        paths_blob = _encode(paths)
        body = stats.tobytes() + verdict.tobytes() + paths_blob + _encode(reasons)
        header = json.dumps({'format': FORMAT, 'signature': check_signature(), 'count': len(paths),
                             'reasons': len(reasons), 'paths_bytes': len(paths_blob), 'body_bytes': len(body),
                             'sha256': hashlib.sha256(body).hexdigest()}).encode('utf-8')
        tmp = f'{self.path}.{writer_tag()}.tmp'
        try:
            with open(tmp, 'wb') as f:
                f.write(MAGIC + struct.pack('<Q', len(header)) + header + body)
            os.replace(tmp, self.path)
        except OSError as e:  # a cache: the run goes on (it checks the images again next time)
            with contextlib.suppress(OSError):
                os.remove(tmp)
            logger.warning('image checks: could not write %s (%s); the next run checks the images again', self.path, e)
            return None
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        self._known, self._learnt = None, {}
        return self.path
