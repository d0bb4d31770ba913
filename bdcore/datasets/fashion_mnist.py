"""Fashion-MNIST: Debian's gzipped IDX files (`apt-get install dataset-fashion-mnist`), else torchvision's
copy under `<root>/fashion_mnist` (downloaded only with `download=True`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bdcore.data import DatasetSpec, ImageSet
from bdcore.datasets.base import DataSource, DatasetMissingError, download_failed
from bdcore.datasets.idx import read_idx

IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"


def idx_image_set(images_path, labels_path) -> ImageSet:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{images_path} / {labels_path} are not an IDX image/label pair")
    return ImageSet(torch.from_numpy(images).unsqueeze(1).contiguous(), torch.from_numpy(labels.astype(np.int64)))


class FashionMNIST(DataSource):
    # not in BackdoorBench: CIFAR's recipe without the flip; mean / std of the training images
    spec = DatasetSpec("fashion_mnist", 10, 1, 28, 28, (0.2860,), (0.3530,))
    folder = "fashion_mnist"
    location_args = ("root", "download", "idx_dir")

    def __init__(self, root: str = "data", download: bool = False, train_size: int | None = None,
                 seed: int = 0, idx_dir: str | None = DEBIAN_DIR):
        super().__init__(root, download, train_size, seed)
        self.idx_dir = Path(idx_dir) if idx_dir else None

    def read(self) -> tuple[ImageSet, ImageSet]:
        if self.idx_dir is not None and all((self.idx_dir / f).is_file() for f in IDX_FILES):
            paths = [self.idx_dir / f for f in IDX_FILES]
            return idx_image_set(paths[0], paths[1]), idx_image_set(paths[2], paths[3])
        import torchvision.datasets as tvd

        out = []
        for train in (True, False):
            try:
                ds = tvd.FashionMNIST(root=str(self.root), train=train, download=self.download)
            except (RuntimeError, OSError) as err:
                if self.download:
                    raise download_failed("Fashion-MNIST", self.root, err) from err
                raise DatasetMissingError(
                    "Fashion-MNIST not found: run `apt-get install dataset-fashion-mnist` (Debian) or set "
                    "dataset.download=true") from err
            images = torch.as_tensor(np.asarray(ds.data), dtype=torch.uint8).unsqueeze(1).contiguous()
            out.append(ImageSet(images, torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)))
        return out[0], out[1]
