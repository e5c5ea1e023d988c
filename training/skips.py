"""Which images a timm ImageDataset skipped as unreadable, recorded from the dataset's own reads.

timm's ``ImageDataset.__getitem__`` reads ``reader[index]`` and, when the image cannot be decoded, logs a warning and
reads the next index instead; within one item every read but the last is therefore an image it skipped.
`SkipRecordingDataset` wraps the dataset, wraps its reader to list the reads of each item, and marks the skipped
indices in a shared-memory bitmap, so forked loader workers mark the parent's copy.
"""
from typing import List

import torch
from torch.utils.data import Dataset

__all__ = ['SkipRecordingDataset']


class _RecordingReader:
    """A timm reader that appends every index read to `reads`; anything else goes to the wrapped reader."""

    def __init__(self, reader, reads: List[int]):
        self.reader = reader
        self.reads = reads

    def __getitem__(self, index):
        self.reads.append(index)
        return self.reader[index]

    def __len__(self):
        return len(self.reader)

    def __getattr__(self, name):
        if name in ('reader', 'reads'):  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.reader, name)


class SkipRecordingDataset(Dataset):
    """A timm ImageDataset that records the indices it skipped as unreadable.

    Attribute reads and the loader's `transform`/`target_transform` go to the wrapped dataset (timm's create_loader
    sets the transform on the dataset it is given).
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self._reads: List[int] = []
        dataset.reader = _RecordingReader(dataset.reader, self._reads)
        self.skipped = torch.zeros(len(dataset), dtype=torch.bool).share_memory_()

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        self._reads.clear()
        item = self.dataset[index]
        for skipped in self._reads[:-1]:
            self.skipped[skipped] = True
        return item

    def __getattr__(self, name):
        if name in ('dataset', '_reads', 'skipped'):  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __setattr__(self, name, value):
        if name in ('transform', 'target_transform'):
            setattr(self.dataset, name, value)
        else:
            super().__setattr__(name, value)

    def take(self) -> List[int]:
        """The indices marked since the last call; clears them."""
        indices = self.skipped.nonzero().flatten().tolist()
        self.skipped.zero_()
        return indices
