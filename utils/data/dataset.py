"""The train dataset handed to OFATrainer: PCap rows through the stylish preprocessor, robust to bad images."""
from __future__ import annotations

import logging
from typing import List

from modelscope.msdatasets.dataset_cls.custom_datasets import TorchCustomDataset

logger = logging.getLogger(__name__)
MAX_SUBSTITUTES = 100


class StylishCaptionDataset(TorchCustomDataset):
    """ModelScope's TorchCustomDataset over a list of rows. An image that fails to decode at training time
    (checked files can still break, e.g. on a network disk) is logged and replaced by the next row, so
    one bad file never kills a long run."""

    def __init__(self, rows: List[dict], preprocessor, mode: str = 'train', with_ids: bool = False):
        super().__init__([rows], mode=mode, preprocessor=preprocessor)  # a list of one dataset: used as is
        self.failed = 0
        self.with_ids = with_ids  # samples carry "id", the index of their row (ModelScope's collate keeps it)

    def __getitem__(self, index):
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
