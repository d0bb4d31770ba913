"""Decoding folders of image files (GTSRB, Tiny-ImageNet) into uint8 tensors, once.

The decoded tensors are cached next to the data (written atomically) and reused while the sample list
(relative paths and labels, in order) is unchanged; a corrupt or foreign cache is rebuilt, never trusted.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from bdcore.data import ImageSet
from bdcore.io import torch_save_atomic

CACHE_VERSION = 1
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def decode_image(path, size: int) -> np.ndarray:
    """Open an image file, convert to RGB, resize whole to size x size (PIL bilinear) if needed."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8)


def decode_images(paths, size: int) -> torch.Tensor:
    """Decode image files (in order) into a uint8 N x 3 x size x size tensor."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    if len(paths) > 64:
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            for i, arr in enumerate(pool.map(lambda p: decode_image(p, size), paths, chunksize=64)):
                out[i] = arr
    else:
        for i, p in enumerate(paths):
            out[i] = decode_image(p, size)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def images_in(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                  key=lambda p: p.name)


def sample_list_fingerprint(samples: list[tuple[str, int]], base: Path) -> str:
    """sha256 over the relative paths and labels of a sample list, in order."""
    h = hashlib.sha256()
    for p, y in samples:
        h.update(f"{os.path.relpath(p, base)}\t{y}\n".encode())
    return h.hexdigest()


def cached_decode(cache: Path, base: Path, train_samples, test_samples, size: int) -> tuple[ImageSet, ImageSet]:
    """Decode train/test sample lists, reusing `cache` when it matches the sample lists."""
    fingerprint = sample_list_fingerprint(train_samples, base) + sample_list_fingerprint(test_samples, base)
    if cache.is_file():
        try:
            blob = torch.load(cache, map_location="cpu", weights_only=True)
            if blob.get("version") == CACHE_VERSION and blob.get("fingerprint") == fingerprint:
                return (ImageSet(blob["train_images"], blob["train_labels"]),
                        ImageSet(blob["test_images"], blob["test_labels"]))
        except Exception as err:  # a corrupt or foreign cache is rebuilt, never trusted
            warnings.warn(f"ignoring unreadable cache {cache}: {err}")
    sets = []
    for samples in (train_samples, test_samples):
        images = decode_images([p for p, _ in samples], size)
        sets.append(ImageSet(images, torch.tensor([y for _, y in samples], dtype=torch.long)))
    blob = {"version": CACHE_VERSION, "fingerprint": fingerprint,
            "train_images": sets[0].images, "train_labels": sets[0].labels,
            "test_images": sets[1].images, "test_labels": sets[1].labels}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch_save_atomic(blob, cache)
    except (OSError, RuntimeError) as err:  # read-only data dir: work without a cache
        warnings.warn(f"could not write cache {cache}: {err}")
    return sets[0], sets[1]
