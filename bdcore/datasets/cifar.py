"""CIFAR-10 / CIFAR-100 from torchvision's pickles under `<root>/cifar10` / `<root>/cifar100`."""
from __future__ import annotations

import numpy as np
import torch

from bdcore.data import DatasetSpec, ImageSet
from bdcore.datasets.base import DataSource, DatasetMissingError, download_failed


class _TorchvisionCIFAR(DataSource):
    pretty: str
    archive_folder: str
    torchvision_class: str

    def read(self) -> tuple[ImageSet, ImageSet]:
        import torchvision.datasets as tvd

        cls = getattr(tvd, self.torchvision_class)
        out = []
        for train in (True, False):
            try:
                ds = cls(root=str(self.root), train=train, download=self.download)
            except (RuntimeError, OSError) as err:
                if self.download:
                    raise download_failed(self.pretty, self.root, err) from err
                raise DatasetMissingError(
                    f"{self.pretty} not found under {self.root}; run with dataset.download=true (needs "
                    f"internet) or place torchvision's {self.archive_folder} there") from err
            images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
            out.append(ImageSet(images, torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)))
        return out[0], out[1]


class CIFAR10(_TorchvisionCIFAR):
    # BackdoorBench's normalisation; only CIFAR-10 gets the random horizontal flip
    spec = DatasetSpec("cifar10", 10, 3, 32, 32, (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261), hflip=True)
    folder, pretty, archive_folder, torchvision_class = "cifar10", "CIFAR-10", "cifar-10-batches-py", "CIFAR10"


class CIFAR100(_TorchvisionCIFAR):
    spec = DatasetSpec("cifar100", 100, 3, 32, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
    folder, pretty, archive_folder, torchvision_class = "cifar100", "CIFAR-100", "cifar-100-python", "CIFAR100"
