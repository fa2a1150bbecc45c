"""The train dataset handed to OFATrainer: PCap rows through the stylish preprocessor, robust to bad images.

The rows are held packed (:class:`PackedRows`: each row pickled into one shared bytes buffer, with an int64
array of offsets), not as a list of dicts: a DataLoader worker forked from the trainer reads them without
writing to the pages that hold them, so the rows are not copied into every worker. A list of dicts would be:
reading a dict writes its reference count, and a full garbage collection writes to every container, so each
worker ends up with its own copy of all the pages they sit on (about 150 MB at Personality-Captions' 186k rows).
For the same reason a worker freezes the objects it inherited out of the garbage collector's reach
(``gc.freeze``) at its first sample: the rows the trainer still holds as dicts stay shared too."""
from __future__ import annotations

import gc
import logging
import os
from typing import List

from modelscope.msdatasets.dataset_cls.custom_datasets import TorchCustomDataset

from utils.data.packed import PackedRows

logger = logging.getLogger(__name__)
MAX_SUBSTITUTES = 100


class StylishCaptionDataset(TorchCustomDataset):
    """ModelScope's TorchCustomDataset over a list of rows. An image that fails to decode at training time
    (checked files can still break, e.g. on a network disk) is logged and replaced by the next row, so
    one bad file never kills a long run."""

    def __init__(self, rows: List[dict], preprocessor, mode: str = 'train', with_ids: bool = False):
        packed = rows if isinstance(rows, PackedRows) else PackedRows(rows)
        super().__init__([packed], mode=mode, preprocessor=preprocessor)  # a list of one dataset: used as is
        self.failed = 0
        self.with_ids = with_ids  # samples carry "id", the index of their row (ModelScope's collate keeps it)
        self._pid = os.getpid()

    def __getitem__(self, index):
        if self._pid != os.getpid():  # the first sample of a forked DataLoader worker
            self._pid = os.getpid()
            gc.freeze()  # what it inherited: never walked by its collector, so those pages stay shared
        for k in range(MAX_SUBSTITUTES):
            i = (index + k) % len(self)
            row = self._inner_dataset[i]
            try:
                sample = self.preprocessor(row)
                if self.with_ids:
                    sample['id'] = i
                return sample
            except (OSError, SyntaxError, ValueError) as e:  # what PIL raises for broken image data
                self.failed += 1
                logger.warning('row %s skipped at load time: %s: %s', row.get('row'), row['image'], e)
        raise RuntimeError(f'{MAX_SUBSTITUTES} images in a row failed to load, last: {row["image"]}')
