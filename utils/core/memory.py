"""Freed memory kept for reuse in the commands that caption (``eval``, ``pre_inference.py``, ``web_demo.py``).

glibc's malloc serves every block of 32 MiB or more (and, past its dynamic threshold, smaller ones too) with a fresh
``mmap`` and hands it back to the kernel on ``free``. Captioning a batch allocates and frees the same large blocks at
every batch (a ResNet activation of 16 images at 256 px is 64 MiB; the decoder's and the vocabulary's buffers at
every step), so each batch page-faults all of them in again: at OFA-tiny size, about 390,000 minor faults and 1.3 s
of kernel time per 32 captions (about a tenth of the time). With ``M_MMAP_MAX`` 0 and a high ``M_TRIM_THRESHOLD``,
malloc keeps what was freed and the next batch reuses it: no faults after the first few batches, 8-18% less time per
caption (``bench/RESULTS.md``). The cost is that the process keeps its high-water mark of memory until it exits,
which is what a captioning command does anyway.

Process-wide, so it is set where a command builds its captioner (``load_captioner``), never at import. Nothing is
done outside glibc (``mallopt`` missing, or another C library), and nothing changes in what is computed.
"""
from __future__ import annotations

import ctypes
import logging
import sys
from typing import Optional

logger = logging.getLogger(__name__)

# glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
KEEP_UP_TO = 1 << 30  # freed memory at the top of the heap beyond this goes back to the kernel

_kept: Optional[bool] = None


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse (see the module's docstring); once per process.
    True where it took effect, False where the C library is not glibc."""
    global _kept
    if _kept is None:
        _kept = False
        if sys.platform.startswith('linux'):
            try:
                libc = ctypes.CDLL(None)  # the C library this process runs on
            except OSError:
                return False
            if not hasattr(libc, 'gnu_get_libc_version') or not hasattr(libc, 'mallopt'):
                return False  # not glibc (musl's mallopt does nothing)
            mallopt = libc.mallopt
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _kept = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_UP_TO))
            logger.debug('malloc keeps freed memory for reuse: %s', _kept)
    return _kept
