"""Data set loaders: every split comes back as an in-memory uint8 ImageSet (DESIGN.md §4, §6;
specs/attacks.md §6).

* cifar10 / cifar100: torchvision's pickles under ``<root>/cifar10`` / ``<root>/cifar100``.
* gtsrb: BackdoorBench's folder layout under ``<root>/gtsrb`` (39,209 train / 12,630 test); torchvision's
  GTSRB download (26,640 train) is accepted only with a warning.
* tiny: Tiny-ImageNet's zip layout under ``<root>/tiny/tiny-imagenet-200``.
* fashion_mnist: Debian's gzipped IDX files (``apt-get install dataset-fashion-mnist``), else torchvision.
* synthetic: procedural class templates, deterministic per seed, for tests and smoke runs.

GTSRB and Tiny decode tens of thousands of image files once and cache the decoded uint8 tensors
next to the data (written atomically). Nothing here touches the network unless ``download=True``.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from core.data import DatasetSpec, ImageSet

__all__ = ["DatasetMissingError", "DATASET_NAMES", "dataset_spec", "load_dataset", "read_idx",
           "make_synthetic"]


class DatasetMissingError(RuntimeError):
    """A data set is not on disk (or incomplete); the message is one line saying how to get it."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # guarantee a single line


def _download_failed(what: str, where, err: BaseException) -> DatasetMissingError:
    return DatasetMissingError(f"{what} download into {where} failed ({type(err).__name__}: {err}); check the "
                               f"internet connection or place the files there by hand")


DATASET_NAMES = ("cifar10", "cifar100", "gtsrb", "tiny", "fashion_mnist", "synthetic")

_SPECS = {
    "cifar10": DatasetSpec("cifar10", 10, 3, 32, 32, (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261),
                           hflip=True),
    "cifar100": DatasetSpec("cifar100", 100, 3, 32, 32, (0.5071, 0.4865, 0.4409),
                            (0.2673, 0.2564, 0.2762)),
    "gtsrb": DatasetSpec("gtsrb", 43, 3, 32, 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "tiny": DatasetSpec("tiny", 200, 3, 64, 64, (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
    "fashion_mnist": DatasetSpec("fashion_mnist", 10, 1, 28, 28, (0.2860,), (0.3530,)),
}

_SYNTHETIC_SPEC_KEYS = ("num_classes", "channels", "size")
_CACHE_VERSION = 1

TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
GTSRB_NUM_CLASSES = 43


def _check_name(name: str) -> str:
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    return name


def dataset_spec(name: str, **synthetic_kwargs) -> DatasetSpec:
    """The DatasetSpec of a data set. Only ``synthetic`` reads kwargs (num_classes, channels, size);
    other keys (seed, sizes per class) do not change the spec and are ignored."""
    _check_name(name)
    if name != "synthetic":
        return _SPECS[name]
    num_classes = int(synthetic_kwargs.get("num_classes", 4))
    channels = int(synthetic_kwargs.get("channels", 3))
    size = int(synthetic_kwargs.get("size", 32))
    return DatasetSpec("synthetic", num_classes, channels, size, size, (0.5,) * channels,
                       (0.25,) * channels, hflip=False)


def load_dataset(name: str, root: str | os.PathLike, *, download: bool = False,
                 fashion_mnist_dir: str | None = "/usr/share/datasets/fashion-mnist",
                 **synthetic_kwargs) -> tuple[ImageSet, ImageSet, DatasetSpec]:
    """Load ``(train, test, spec)`` on the CPU. Raises DatasetMissingError (one line naming the fix)
    when the files are absent and ``download`` is false; ``synthetic_kwargs`` only feed ``synthetic``."""
    _check_name(name)
    root = Path(root).expanduser()
    spec = dataset_spec(name, **synthetic_kwargs)
    if name == "synthetic":
        train, test = make_synthetic(**synthetic_kwargs)
    elif name in ("cifar10", "cifar100"):
        train, test = _load_cifar(name, root, download)
    elif name == "gtsrb":
        train, test = _load_gtsrb(root / "gtsrb", download)
    elif name == "tiny":
        train, test = _load_tiny(root / "tiny", download)
    else:
        train, test = _load_fashion_mnist(root / "fashion_mnist", download, fashion_mnist_dir)
    for split, data in (("train", train), ("test", test)):
        if tuple(data.images.shape[1:]) != spec.shape:
            raise ValueError(f"{name} {split} images have shape {tuple(data.images.shape[1:])}, "
                             f"expected {spec.shape}")
        if len(data) and (int(data.labels.min()) < 0 or int(data.labels.max()) >= spec.num_classes):
            raise ValueError(f"{name} {split} labels fall outside 0..{spec.num_classes - 1}")
    return train, test, spec


# --------------------------------------------------------------------------------------------- IDX
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> np.ndarray:
    """Read an IDX file (gzipped or plain, detected by content): magic 0x00 0x00 <dtype> <ndim>,
    big-endian uint32 dims, then the data. 0x0803 = uint8 images (N, H, W), 0x0801 = uint8 labels (N,)."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims, dtype=np.int64)) if dims else 1
    if len(raw) - header != count * dtype.itemsize:
        raise ValueError(f"{path}: IDX payload holds {len(raw) - header} bytes, dims {dims} need "
                         f"{count * dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims).astype(
        dtype.newbyteorder("="), copy=True)


# ------------------------------------------------------------------------------------------- CIFAR
def _load_cifar(name: str, root: Path, download: bool) -> tuple[ImageSet, ImageSet]:
    import torchvision.datasets as tvd

    cls, pretty, folder = ((tvd.CIFAR10, "CIFAR-10", "cifar-10-batches-py") if name == "cifar10"
                           else (tvd.CIFAR100, "CIFAR-100", "cifar-100-python"))
    path = root / name
    out = []
    for train in (True, False):
        try:
            ds = cls(root=str(path), train=train, download=download)
        except (RuntimeError, OSError) as err:
            if download:
                raise _download_failed(pretty, path, err) from err
            raise DatasetMissingError(
                f"{pretty} not found under {path}; run with dataset.download=true (needs internet) or "
                f"place torchvision's {folder} there") from err
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        out.append(ImageSet(images, torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)))
    return out[0], out[1]


# ----------------------------------------------------------------------------------- Fashion-MNIST
_FMNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _idx_set(images_path, labels_path) -> ImageSet:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{images_path} / {labels_path} are not an IDX image/label pair")
    return ImageSet(torch.from_numpy(images).unsqueeze(1).contiguous(),
                    torch.from_numpy(labels.astype(np.int64)))


def _load_fashion_mnist(root: Path, download: bool, fashion_mnist_dir) -> tuple[ImageSet, ImageSet]:
    if fashion_mnist_dir is not None:
        d = Path(fashion_mnist_dir)
        if all((d / f).is_file() for f in _FMNIST_FILES):
            paths = [d / f for f in _FMNIST_FILES]
            return _idx_set(paths[0], paths[1]), _idx_set(paths[2], paths[3])
    import torchvision.datasets as tvd

    out = []
    for train in (True, False):
        try:
            ds = tvd.FashionMNIST(root=str(root), train=train, download=download)
        except (RuntimeError, OSError) as err:
            if download:
                raise _download_failed("Fashion-MNIST", root, err) from err
            raise DatasetMissingError(
                "Fashion-MNIST not found: run `apt-get install dataset-fashion-mnist` (Debian) or set "
                "dataset.download=true") from err
        images = torch.as_tensor(np.asarray(ds.data), dtype=torch.uint8).unsqueeze(1).contiguous()
        out.append(ImageSet(images, torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)))
    return out[0], out[1]


# ---------------------------------------------------------------------------- decoding and caching
def _decode(path, size: int) -> np.ndarray:
    """Open an image file, convert to RGB, resize whole to size x size (PIL bilinear) if needed."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8)


def _decode_all(paths, size: int) -> torch.Tensor:
    """Decode image files (in order) into a uint8 N x 3 x size x size tensor."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    if len(paths) > 64:
        workers = min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for i, arr in enumerate(pool.map(lambda p: _decode(p, size), paths, chunksize=64)):
                out[i] = arr
    else:
        for i, p in enumerate(paths):
            out[i] = _decode(p, size)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _fingerprint(samples: list[tuple[str, int]], base: Path) -> str:
    """sha256 over the relative paths and labels of a sample list, in order."""
    h = hashlib.sha256()
    for p, y in samples:
        h.update(f"{os.path.relpath(p, base)}\t{y}\n".encode())
    return h.hexdigest()


def _cached_decode(cache: Path, base: Path, train_samples, test_samples, size: int):
    """Decode train/test sample lists, reusing ``cache`` when it matches the sample lists."""
    fingerprint = _fingerprint(train_samples, base) + _fingerprint(test_samples, base)
    if cache.is_file():
        try:
            blob = torch.load(cache, map_location="cpu", weights_only=True)
            if blob.get("version") == _CACHE_VERSION and blob.get("fingerprint") == fingerprint:
                return (ImageSet(blob["train_images"], blob["train_labels"]),
                        ImageSet(blob["test_images"], blob["test_labels"]))
        except Exception as err:  # a corrupt or foreign cache is rebuilt, never trusted
            warnings.warn(f"ignoring unreadable cache {cache}: {err}")
    sets = []
    for samples in (train_samples, test_samples):
        images = _decode_all([p for p, _ in samples], size)
        sets.append(ImageSet(images, torch.tensor([y for _, y in samples], dtype=torch.long)))
    blob = {"version": _CACHE_VERSION, "fingerprint": fingerprint,
            "train_images": sets[0].images, "train_labels": sets[0].labels,
            "test_images": sets[1].images, "test_labels": sets[1].labels}
    tmp = cache.with_name(f"{cache.name}.tmp.{os.getpid()}")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(blob, tmp)
        os.replace(tmp, cache)
    except (OSError, RuntimeError) as err:  # read-only data dir: work without a cache
        warnings.warn(f"could not write cache {cache}: {err}")
        try:
            tmp.unlink()
        except OSError:
            pass
    return sets[0], sets[1]


# ------------------------------------------------------------------------------------------- GTSRB
def _read_gtsrb_csv(csv_path: Path, image_dir: Path) -> list[tuple[str, int]]:
    """Rows of a GTSRB ground-truth CSV (';'-separated, header row) -> (image path, ClassId)."""
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.reader(f, delimiter=";") if r and any(c.strip() for c in r)]
    header = [c.strip() for c in rows[0]] if rows else []
    label_col = header.index("ClassId") if "ClassId" in header else 7  # BackdoorBench: column 7
    return [(str(image_dir / r[0].strip()), int(r[label_col])) for r in rows[1:]]


def _gtsrb_missing(base: Path, detail: str) -> DatasetMissingError:
    return DatasetMissingError(
        f"GTSRB not found under {base} ({detail}); expected BackdoorBench's layout "
        f"Train/000CC/GT-000CC.csv for CC=00..42 plus Test/GT-final_test.csv with the images beside them "
        f"(BackdoorBench's sh/gtsrb_download.sh builds it from GTSRB_Final_Training_Images, "
        f"GTSRB_Final_Test_Images and GTSRB_Final_Test_GT), or set dataset.download=true to use "
        f"torchvision's GTSRB (a different 26,640-image train split)")


def _load_gtsrb(base: Path, download: bool) -> tuple[ImageSet, ImageSet]:
    train_dir, test_dir = base / "Train", base / "Test"
    if train_dir.is_dir() or test_dir.is_dir():
        train_samples = []
        for c in range(GTSRB_NUM_CLASSES):
            folder = train_dir / f"{c:05d}"
            csv_path = folder / f"GT-{c:05d}.csv"
            if not csv_path.is_file():
                raise _gtsrb_missing(base, f"missing {csv_path.relative_to(base)}")
            train_samples += _read_gtsrb_csv(csv_path, folder)
        test_csv = test_dir / "GT-final_test.csv"
        if not test_csv.is_file():
            raise _gtsrb_missing(base, f"missing {test_csv.relative_to(base)}")
        test_samples = _read_gtsrb_csv(test_csv, test_dir)
        return _cached_decode(base / ".cache_uint8_32.pt", base, train_samples, test_samples, 32)

    tv_train = base / "GTSRB" / "Training"
    if download or tv_train.is_dir():
        return _load_gtsrb_torchvision(base, download)
    raise _gtsrb_missing(base, "no Train/ or Test/ folder")


def _load_gtsrb_torchvision(base: Path, download: bool) -> tuple[ImageSet, ImageSet]:
    """torchvision's GTSRB (root = base's parent, so it lives in base/GTSRB and base/GT-final_test.csv)."""
    import torchvision.datasets as tvd

    warnings.warn("GTSRB: using torchvision's download, whose train split (26,640 images) differs from "
                  "BackdoorBench's (39,209); results are not comparable with the published numbers")
    samples = []
    for split in ("train", "test"):
        try:
            ds = tvd.GTSRB(root=str(base.parent), split=split, download=download)
        except (RuntimeError, OSError) as err:
            if download:
                raise _download_failed("GTSRB (torchvision)", base, err) from err
            raise _gtsrb_missing(base, f"torchvision GTSRB {split} split incomplete") from err
        # the public API would decode every image through PIL; the sample list is all we need
        samples.append([(str(p), int(y)) for p, y in ds._samples])
    return _cached_decode(base / ".cache_uint8_32_torchvision.pt", base, samples[0], samples[1], 32)


# -------------------------------------------------------------------------------------------- Tiny
_IMG_EXT = (".jpeg", ".jpg", ".png")


def _tiny_missing(base: Path, detail: str) -> DatasetMissingError:
    return DatasetMissingError(
        f"Tiny-ImageNet not found under {base} ({detail}); download {TINY_URL} and unzip it under {base} "
        f"(giving {base / 'tiny-imagenet-200'}), or set dataset.download=true")


def _images_in(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in _IMG_EXT and p.is_file()),
                  key=lambda p: p.name)


def _load_tiny(base: Path, download: bool) -> tuple[ImageSet, ImageSet]:
    data = base / "tiny-imagenet-200"
    if not (data / "train").is_dir() and download:
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(TINY_URL, download_root=str(base), md5=TINY_MD5)
        except (RuntimeError, OSError) as err:
            raise _download_failed("Tiny-ImageNet", base, err) from err
    train_dir, val_dir = data / "train", data / "val"
    if not train_dir.is_dir():
        raise _tiny_missing(base, "no tiny-imagenet-200/train folder")
    if not val_dir.is_dir():
        raise _tiny_missing(base, "no tiny-imagenet-200/val folder")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    wnids_file = data / "wnids.txt"
    if wnids_file.is_file():
        wnids = sorted(w.strip() for w in wnids_file.read_text().split() if w.strip())
        if wnids != classes:
            raise _tiny_missing(base, f"wnids.txt lists {len(wnids)} classes but train/ holds "
                                      f"{len(classes)} matching folders; re-extract the archive")
    index = {w: i for i, w in enumerate(classes)}

    # ImageFolder order (BackdoorBench): classes sorted, then file names sorted within a class.
    train_samples = []
    for w in classes:
        folder = train_dir / w / "images"
        if not folder.is_dir():
            folder = train_dir / w
        train_samples += [(str(p), index[w]) for p in _images_in(folder)]

    annotations = val_dir / "val_annotations.txt"
    val_samples = []
    if annotations.is_file() and (val_dir / "images").is_dir():  # the zip's layout
        for line in annotations.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) < 2 or not parts[0].strip():
                continue
            fname, wnid = parts[0].strip(), parts[1].strip()
            if wnid not in index:
                raise _tiny_missing(base, f"val_annotations.txt names unknown class {wnid}")
            val_samples.append((index[wnid], fname, str(val_dir / "images" / fname)))
    else:  # BackdoorBench's reorganised layout val/<wnid>/[images/]*.JPEG
        for w in classes:
            folder = val_dir / w / "images" if (val_dir / w / "images").is_dir() else val_dir / w
            if folder.is_dir():
                val_samples += [(index[w], p.name, str(p)) for p in _images_in(folder)]
    if not val_samples:
        raise _tiny_missing(base, "no validation images (val/images + val/val_annotations.txt)")
    val_samples.sort(key=lambda t: (t[0], t[1]))  # what ImageFolder over val/<wnid>/ yields
    test_samples = [(p, y) for y, _, p in val_samples]
    return _cached_decode(base / ".cache_uint8_64.pt", data, train_samples, test_samples, 64)


# --------------------------------------------------------------------------------------- synthetic
def _synthetic_images(templates: torch.Tensor, labels: torch.Tensor, gen: torch.Generator,
                      max_shift: int, noise: float) -> torch.Tensor:
    n = len(labels)
    _, c, h, w = templates.shape
    x = templates[labels]  # n x c x h x w, float in [0, 255]
    if max_shift > 0:
        p = max_shift
        padded = torch.nn.functional.pad(x, (p, p, p, p), mode="replicate")
        dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        rows = dy.view(n, 1) + torch.arange(h).view(1, h)
        cols = dx.view(n, 1) + torch.arange(w).view(1, w)
        bidx = torch.arange(n).view(n, 1, 1)
        x = padded.permute(0, 2, 3, 1)[bidx, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)
    gain = 1.0 + 0.15 * (2 * torch.rand(n, 1, 1, 1, generator=gen) - 1)  # brightness / contrast jitter
    bias = 20.0 * (2 * torch.rand(n, 1, 1, 1, generator=gen) - 1)
    x = (x - 127.5) * gain + 127.5 + bias + noise * torch.randn(x.shape, generator=gen)
    return x.round().clamp_(0, 255).to(torch.uint8).contiguous()


def make_synthetic(num_classes: int = 4, channels: int = 3, size: int = 32, train_per_class: int = 64,
                   test_per_class: int = 32, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """A procedural, class-balanced data set that a tiny CNN learns in seconds.

    Each class owns a smooth random template (a 4x4 grid of random colours upsampled bilinearly to
    size x size); an image is its class template shifted by up to size/16 pixels, with per-image
    brightness/contrast jitter and Gaussian pixel noise, rounded and clipped to uint8. Everything comes
    from one CPU generator seeded by ``seed``; sample order is shuffled (labels are balanced).
    """
    if num_classes < 1 or channels < 1 or size < 4 or train_per_class < 0 or test_per_class < 0:
        raise ValueError("make_synthetic needs num_classes >= 1, channels >= 1, size >= 4 and "
                         "non-negative per-class counts")
    gen = torch.Generator().manual_seed(int(seed))
    grid = torch.rand(num_classes, channels, 4, 4, generator=gen)
    smooth = torch.nn.functional.interpolate(grid, size=(size, size), mode="bilinear",
                                             align_corners=True)
    # a per-class oriented stripe texture (random orientation, 2-5 periods per image, per-channel
    # phase): translation-invariant, so crops and shifts keep it recognisable
    angle = torch.rand(num_classes, generator=gen) * torch.pi
    freq = (2.0 + 3.0 * torch.rand(num_classes, generator=gen)) * 2 * torch.pi / size
    phase = torch.rand(num_classes, channels, generator=gen) * 2 * torch.pi
    coords = torch.arange(size, dtype=torch.float32)
    proj = (angle.cos().view(-1, 1, 1) * coords.view(1, 1, size)
            + angle.sin().view(-1, 1, 1) * coords.view(1, size, 1)) * freq.view(-1, 1, 1)  # K x H x W
    stripes = 0.5 + 0.5 * torch.sin(proj.unsqueeze(1) + phase.view(num_classes, channels, 1, 1))
    templates = 30.0 + 195.0 * (0.6 * smooth + 0.4 * stripes)  # headroom for jitter and triggers
    max_shift = max(1, size // 16)
    sets = []
    for per_class in (train_per_class, test_per_class):
        labels = torch.arange(num_classes).repeat_interleave(per_class)
        labels = labels[torch.randperm(len(labels), generator=gen)]
        images = _synthetic_images(templates, labels, gen, max_shift, noise=24.0)
        sets.append(ImageSet(images, labels.long()))
    return sets[0], sets[1]
