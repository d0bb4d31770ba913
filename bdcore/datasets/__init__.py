"""Data sources, one module each: every split comes back as an in-memory uint8 ImageSet on the CPU.

Configs name a source by `_target_` (conf/dataset/*.yaml); in Python, e.g.
``train, test = FashionMNIST(root="data").load()`` and ``FashionMNIST.spec``.
Nothing here touches the network unless ``download=True``.
"""
from bdcore.datasets.base import DataSource, DatasetConfigError, DatasetMissingError
from bdcore.datasets.cifar import CIFAR10, CIFAR100
from bdcore.datasets.fashion_mnist import FashionMNIST
from bdcore.datasets.gtsrb import GTSRB
from bdcore.datasets.idx import read_idx
from bdcore.datasets.synthetic import Synthetic, make_synthetic
from bdcore.datasets.tiny import TinyImageNet

__all__ = ["CIFAR10", "CIFAR100", "DataSource", "DatasetConfigError", "DatasetMissingError", "FashionMNIST",
           "GTSRB", "Synthetic", "TinyImageNet", "make_synthetic", "read_idx"]
