"""Rows held packed: one bytes buffer and an int64 array of offsets instead of a list of dicts.

A forked DataLoader worker reads such rows without writing to the pages that hold them, so they are not copied
into every worker (see :mod:`utils.data.dataset`); the buffer also travels between processes as one blob (the rows
read beside the start-up's imports, :mod:`utils.core.beside`). Imports only numpy: it is built before torch is."""
from __future__ import annotations

import pickle
from typing import List

import numpy as np


class PackedRows:
    """A read-only sequence of rows (dicts) in one bytes buffer: ``rows[i]`` is a new dict equal to the i-th row
    given (same keys, order and values). Building it pickles each row once (about 3 s per million rows on one core)."""

    def __init__(self, rows: List[dict]):
        pickled = [pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL) for r in rows]
        self.offsets = np.zeros(len(pickled) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, pickled), dtype=np.int64, count=len(pickled)), out=self.offsets[1:])
        self.buffer = b''.join(pickled)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f'row {i} of {len(self)}')
        i %= len(self)
        return pickle.loads(self.buffer[self.offsets[i]:self.offsets[i + 1]])

    @property
    def nbytes(self) -> int:
        return len(self.buffer) + self.offsets.nbytes
