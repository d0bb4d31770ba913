"""What every data source shares: the one-line "missing data" error and `DataSource`, whose `load()` checks
shapes and labels and draws the fixed training subset (`train_size`)."""
from __future__ import annotations

from pathlib import Path

import torch

from bdcore.data import DatasetSpec, ImageSet


class DatasetMissingError(RuntimeError):
    """A data set is not on disk (or incomplete); the message is one line saying how to get it."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # guarantee a single line


class DatasetConfigError(ValueError):
    """A data-set setting that cannot work (e.g. a subset larger than the data); one line naming the fix."""


def download_failed(what: str, where, err: BaseException) -> DatasetMissingError:
    return DatasetMissingError(f"{what} download into {where} failed ({type(err).__name__}: {err}); check the "
                               f"internet connection or place the files there by hand")


class DataSource:
    """A data set that loads into in-memory uint8 ImageSets (train, test) on the CPU.

    Subclasses set `spec` and `folder` (the sub-directory of `root` they read) and implement `read()`.
    `location_args` name the constructor arguments that say *where* the data is, not *what* it is: they are
    left out of the artifact store's keys, so moving the data does not retrain anything.
    """

    spec: DatasetSpec
    folder: str = ""
    location_args: tuple[str, ...] = ("root", "download")

    def __init__(self, root: str = "data", download: bool = False, train_size: int | None = None,
                 seed: int = 0):
        if train_size is not None and int(train_size) < 1:
            raise DatasetConfigError(f"dataset.train_size={train_size} must be >= 1 (or null for the whole "
                                     "training set); e.g. dataset.train_size=30000")
        self.root = Path(root).expanduser() / self.folder
        self.download = bool(download)
        self.train_size = None if train_size is None else int(train_size)
        self.seed = int(seed)

    def read(self) -> tuple[ImageSet, ImageSet]:
        raise NotImplementedError

    def load(self) -> tuple[ImageSet, ImageSet]:
        """(train, test); train is the fixed random subset of `train_size` images drawn with `seed`."""
        train, test = self.read()
        name, shape = self.spec.name, self.spec.shape
        for split, data in (("train", train), ("test", test)):
            if tuple(data.images.shape[1:]) != shape:
                raise ValueError(f"{name} {split} images have shape {tuple(data.images.shape[1:])}, expected {shape}")
            if len(data) and (int(data.labels.min()) < 0 or int(data.labels.max()) >= self.spec.num_classes):
                raise ValueError(f"{name} {split} labels fall outside 0..{self.spec.num_classes - 1}")
        if self.train_size is not None:
            if self.train_size > len(train):
                raise DatasetConfigError(f"dataset.train_size={self.train_size} but {name} has {len(train)} "
                                         "training images; pick a smaller value or null")
            keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed))[:self.train_size]
            train = train.subset(keep.sort().values)
        return train, test
