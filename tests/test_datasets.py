"""Data set loaders (bdcore/datasets) on tiny generated layouts; never touches the network."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bdcore.datasets.decode as decode
import bdcore.datasets.tiny as tiny
from bdcore.data import DatasetSpec, ImageSet
from bdcore.datasets import (CIFAR10, CIFAR100, GTSRB, DatasetConfigError, DatasetMissingError, FashionMNIST,
                             Synthetic, TinyImageNet, make_synthetic, read_idx)
from bdcore.datasets.fashion_mnist import IDX_FILES

SOURCES = {"cifar10": CIFAR10, "cifar100": CIFAR100, "gtsrb": GTSRB, "tiny": TinyImageNet,
           "fashion_mnist": FashionMNIST}
DATASET_NAMES = tuple(SOURCES)


def dataset_spec(name):
    return SOURCES[name].spec


def load_dataset(name, root, **kwargs):
    """(train, test, spec) through the data source a config's `_target_` names."""
    source = (Synthetic if name == "synthetic" else SOURCES[name])(root=str(root), **kwargs)
    return (*source.load(), source.spec)

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def assert_one_line_missing(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.strip() == msg and len(msg) > 20


# ------------------------------------------------------------------------------------------ specs
def test_specs_match_backdoorbench():
    c10 = dataset_spec("cifar10")
    assert (c10.num_classes, c10.shape, c10.hflip) == (10, (3, 32, 32), True)
    assert c10.mean == (0.4914, 0.4822, 0.4465) and c10.std == (0.247, 0.243, 0.261)
    c100 = dataset_spec("cifar100")
    assert (c100.num_classes, c100.hflip, c100.std) == (100, False, (0.2673, 0.2564, 0.2762))
    g = dataset_spec("gtsrb")
    assert (g.num_classes, g.shape, g.mean, g.std, g.hflip) == (43, (3, 32, 32), (0, 0, 0), (1, 1, 1), False)
    t = dataset_spec("tiny")
    assert (t.num_classes, t.shape, t.hflip) == (200, (3, 64, 64), False)
    assert t.mean == (0.4802, 0.4481, 0.3975)
    f = dataset_spec("fashion_mnist")
    assert (f.num_classes, f.shape, f.mean, f.std, f.hflip) == (10, (1, 28, 28), (0.2860,), (0.3530,), False)
    s = Synthetic(num_classes=5, channels=1, size=16, pattern_seed=3, train_per_class=2).spec
    assert (s.num_classes, s.shape, s.hflip) == (5, (1, 16, 16), False)
    assert all(dataset_spec(n).crop_padding == 4 for n in DATASET_NAMES)


def test_location_args_are_declared_by_each_source():
    assert FashionMNIST.location_args == ("root", "download", "idx_dir")
    assert all({"root", "download"} <= set(src.location_args) for src in SOURCES.values())


def test_train_size_draws_a_fixed_subset_and_rejects_nonsense():
    full, _ = Synthetic().load()
    a, _ = Synthetic(train_size=10, seed=3).load()
    b, _ = Synthetic(train_size=10, seed=3).load()
    assert len(a) == 10 and torch.equal(a.images, b.images)
    for bad in (0, -5):
        with pytest.raises(DatasetConfigError, match="train_size"):
            Synthetic(train_size=bad)
    with pytest.raises(DatasetConfigError, match="smaller value"):
        Synthetic(train_size=len(full) + 1).load()


def test_missing_error_is_one_line():
    assert str(DatasetMissingError("a\nb  c")) == "a b c"
    assert issubclass(DatasetMissingError, RuntimeError)


# -------------------------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_images_labels(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    ext = ".gz" if gz else ""
    got_images = read_idx(write_idx(tmp_path / f"img{ext}", images, gz))
    got_labels = read_idx(write_idx(tmp_path / f"lab{ext}", labels, gz))
    assert got_images.dtype == np.uint8 and got_images.shape == (5, 28, 28)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    ints = np.array([[1, -2], [70000, 3]], dtype=">i4")
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / f"int{ext}", ints, gz)), ints)


def test_read_idx_rejects_garbage(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01x")
    with pytest.raises(ValueError):
        read_idx(tmp_path / "bad")
    truncated = write_idx(tmp_path / "t", np.zeros((4, 2, 2), np.uint8), False)
    truncated.write_bytes(truncated.read_bytes()[:-1])
    with pytest.raises(ValueError):
        read_idx(truncated)


# ---------------------------------------------------------------------------------- Fashion-MNIST
def test_fashion_mnist_from_idx_dir(tmp_path):
    rng = np.random.default_rng(1)
    d = tmp_path / "fm"
    d.mkdir()
    tr_x = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    tr_y = (np.arange(12) % 10).astype(np.uint8)
    te_x = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    te_y = np.array([9, 0, 5, 5], dtype=np.uint8)
    write_idx(d / "train-images-idx3-ubyte.gz", tr_x, True)
    write_idx(d / "train-labels-idx1-ubyte.gz", tr_y, True)
    write_idx(d / "t10k-images-idx3-ubyte.gz", te_x, True)
    write_idx(d / "t10k-labels-idx1-ubyte.gz", te_y, True)
    train, test, spec = load_dataset("fashion_mnist", tmp_path / "root", idx_dir=str(d))
    assert spec == dataset_spec("fashion_mnist")
    assert train.images.shape == (12, 1, 28, 28) and test.images.shape == (4, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert torch.equal(train.images[:, 0], torch.from_numpy(tr_x))
    assert test.labels.tolist() == [9, 0, 5, 5]


@pytest.mark.skipif(not all((DEBIAN_FMNIST / f).is_file() for f in IDX_FILES),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_debian_files(tmp_path):
    train, test, spec = load_dataset("fashion_mnist", tmp_path)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert sorted(train.labels.unique().tolist()) == list(range(10)) == sorted(test.labels.unique().tolist())
    assert train.labels.bincount().tolist() == [6000] * 10
    assert abs(train.images.float().mean().item() / 255 - spec.mean[0]) < 1e-3


def test_fashion_mnist_missing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetMissingError) as excinfo:
        load_dataset("fashion_mnist", tmp_path / "root", idx_dir=str(empty))
    assert_one_line_missing(excinfo)
    assert "apt-get install dataset-fashion-mnist" in str(excinfo.value)


# ------------------------------------------------------------------------------------------ CIFAR
def test_cifar10_missing(tmp_path):
    with pytest.raises(DatasetMissingError) as excinfo:
        load_dataset("cifar10", tmp_path)
    assert_one_line_missing(excinfo)
    assert str(tmp_path / "cifar10") in str(excinfo.value) and "dataset.download=true" in str(excinfo.value)


@pytest.mark.parametrize("name,cls_name,classes", [("cifar10", "CIFAR10", 10), ("cifar100", "CIFAR100", 100)])
def test_cifar_download_path_wired(tmp_path, monkeypatch, name, cls_name, classes):
    import torchvision.datasets

    calls = []
    rng = np.random.default_rng(2)

    class FakeCIFAR:
        def __init__(self, root, train=True, download=False, **kwargs):
            calls.append((root, train, download))
            n = 6 if train else 3
            self.data = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)  # N, H, W, C like torchvision
            self.targets = [int(i * 7 % classes) for i in range(n)]

    monkeypatch.setattr(torchvision.datasets, cls_name, FakeCIFAR)
    train, test, spec = load_dataset(name, tmp_path, download=True)
    assert calls == [(str(tmp_path / name), True, True), (str(tmp_path / name), False, True)]
    assert spec.name == name and train.images.shape == (6, 3, 32, 32) and test.images.shape == (3, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.images.is_contiguous()
    assert train.labels.tolist() == [i * 7 % classes for i in range(6)]
    # channel c of pixel (y, x) is data[n, y, x, c]
    x = train.images[2]
    assert x[1, 5, 9] == train.images.permute(0, 2, 3, 1)[2, 5, 9, 1]


def test_cifar_conversion_values(tmp_path, monkeypatch):
    import torchvision.datasets

    data = np.arange(2 * 32 * 32 * 3, dtype=np.int64).reshape(2, 32, 32, 3) % 256

    class FakeCIFAR:
        def __init__(self, root, train=True, download=False, **kwargs):
            self.data, self.targets = data.astype(np.uint8), [0, 9]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR)
    train, _, _ = load_dataset("cifar10", tmp_path)
    assert torch.equal(train.images, torch.from_numpy(data.astype(np.uint8)).permute(0, 3, 1, 2))


# ------------------------------------------------------------------------------------------ GTSRB
GT_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"


def _colour(c: int, k: int) -> tuple[int, int, int]:
    return ((37 * c + 11 * k) % 256, (91 * c + 53 * k + 7) % 256, (13 * c + 101 * k + 200) % 256)


def make_gtsrb(base: Path) -> tuple[list[tuple[int, tuple]], list[tuple[int, tuple]]]:
    """All 43 class folders with 1-3 uniform-colour PPMs of odd sizes; CSV rows in reverse file order.
    Returns the expected (label, colour) sequences for train and test."""
    train_expected = []
    for c in range(43):
        folder = base / "Train" / f"{c:05d}"
        folder.mkdir(parents=True)
        rows = []
        for k in range(c % 3 + 1):
            name = f"{c:05d}_{k:05d}.ppm"
            w, h = 29 + k * 7, 31 + c % 5
            Image.new("RGB", (w, h), _colour(c, k)).save(folder / name)
            rows.append((f"{name};{w};{h};5;5;{w - 5};{h - 5};{c}", (c, _colour(c, k))))
        rows.reverse()  # the loader must follow CSV row order, not file-name order
        (folder / f"GT-{c:05d}.csv").write_text("\n".join([GT_HEADER] + [r for r, _ in rows]) + "\n")
        train_expected += [e for _, e in rows]
    test_dir = base / "Test"
    test_dir.mkdir()
    test_rows, test_expected = [], []
    for i, label in enumerate([42, 0, 17, 3]):
        name = f"{i:05d}.ppm"
        Image.new("RGB", (40, 33), _colour(label, 9)).save(test_dir / name)
        test_rows.append(f"{name};40;33;5;5;35;28;{label}")
        test_expected.append((label, _colour(label, 9)))
    (test_dir / "GT-final_test.csv").write_text("\n".join([GT_HEADER] + test_rows) + "\n")
    return train_expected, test_expected


def test_gtsrb_layout_order_labels_resize_cache(tmp_path, monkeypatch):
    base = tmp_path / "gtsrb"
    train_expected, test_expected = make_gtsrb(base)
    # one non-uniform image to pin the resize method: PIL bilinear on the whole RGB image, ROI ignored
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 256, (45, 37, 3), dtype=np.uint8)
    Image.fromarray(arr).save(base / "Train" / "00001" / "00001_00000.ppm")
    want = np.array(Image.fromarray(arr).resize((32, 32), Image.BILINEAR))

    train, test, spec = load_dataset("gtsrb", tmp_path)
    assert spec == dataset_spec("gtsrb")
    assert train.images.shape == (len(train_expected), 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [c for c, _ in train_expected]
    assert test.labels.tolist() == [42, 0, 17, 3]
    for i, (c, colour) in enumerate(train_expected):
        if c == 1 and colour == _colour(1, 0):
            assert torch.equal(train.images[i].permute(1, 2, 0), torch.from_numpy(want))
        else:
            assert train.images[i].flatten(1).unique(dim=1).T.tolist() == [list(colour)], i
    for i, (_, colour) in enumerate(test_expected):
        assert train.images.dtype == test.images.dtype
        assert test.images[i].flatten(1).unique(dim=1).T.tolist() == [list(colour)]

    cache = base / ".cache_uint8_32.pt"
    assert cache.is_file() and not list(base.glob("*.tmp*"))

    def no_decode(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(decode, "decode_image", no_decode)
    train2, test2, _ = load_dataset("gtsrb", tmp_path)
    assert torch.equal(train2.images, train.images) and torch.equal(train2.labels, train.labels)
    assert torch.equal(test2.images, test.images) and torch.equal(test2.labels, test.labels)

    # a changed sample list invalidates the cache
    monkeypatch.undo()
    csv_path = base / "Test" / "GT-final_test.csv"
    csv_path.write_text("\n".join(csv_path.read_text().splitlines()[:-1]) + "\n")
    _, test3, _ = load_dataset("gtsrb", tmp_path)
    assert test3.labels.tolist() == [42, 0, 17]


def test_gtsrb_missing(tmp_path):
    with pytest.raises(DatasetMissingError) as excinfo:
        load_dataset("gtsrb", tmp_path)
    assert_one_line_missing(excinfo)
    assert "Train/000CC/GT-000CC.csv" in str(excinfo.value) and "GT-final_test.csv" in str(excinfo.value)
    (tmp_path / "gtsrb" / "Train" / "00000").mkdir(parents=True)  # incomplete layout
    with pytest.raises(DatasetMissingError) as excinfo:
        load_dataset("gtsrb", tmp_path)
    assert_one_line_missing(excinfo)
    assert "GT-00000.csv" in str(excinfo.value)


def test_gtsrb_torchvision_fallback_warns(tmp_path, monkeypatch):
    import torchvision.datasets

    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    samples = {}
    for split, labels in (("train", [0, 5, 42]), ("test", [7, 7])):
        samples[split] = []
        for i, y in enumerate(labels):
            p = img_dir / f"{split}{i}.ppm"
            Image.new("RGB", (50, 40), _colour(y, i)).save(p)
            samples[split].append((str(p), y))
    calls = []

    class FakeGTSRB:
        def __init__(self, root, split="train", download=False, **kwargs):
            calls.append((root, split, download))
            self._samples = samples[split]

    monkeypatch.setattr(torchvision.datasets, "GTSRB", FakeGTSRB)
    with pytest.warns(UserWarning, match="26,640"):
        train, test, _ = load_dataset("gtsrb", tmp_path, download=True)
    assert calls == [(str(tmp_path), "train", True), (str(tmp_path), "test", True)]
    assert train.labels.tolist() == [0, 5, 42] and test.labels.tolist() == [7, 7]
    assert train.images.shape == (3, 3, 32, 32)
    assert (tmp_path / "gtsrb" / ".cache_uint8_32_torchvision.pt").is_file()


# ------------------------------------------------------------------------------------------- Tiny
def make_tiny(base: Path, val_layout: str = "zip") -> None:
    data = base / "tiny-imagenet-200"
    wnids = ["n02", "n01"]  # written unsorted; classes must come out sorted: n01 -> 0, n02 -> 1
    (data).mkdir(parents=True)
    (data / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w in wnids:
        folder = data / "train" / w / "images"
        folder.mkdir(parents=True)
        (data / "train" / w / f"{w}_boxes.txt").write_text("ignored\n")
        for k in (2, 0, 1):
            colour = (200, 30, 30) if w == "n01" else (30, 30, 200)
            size = (64, 64) if k != 1 else (50, 80)  # one off-size image gets resized
            Image.new("RGB", size, colour).save(folder / f"{w}_{k}.JPEG", quality=95)
        Image.new("L", (64, 64), 128).save(folder / f"{w}_3.JPEG")  # grayscale -> RGB
    val = data / "val"
    annotations = [("val_1.JPEG", "n02"), ("val_0.JPEG", "n01"), ("val_2.JPEG", "n01")]
    for fname, w in annotations:
        colour = (200, 30, 30) if w == "n01" else (30, 30, 200)
        folder = val / "images" if val_layout == "zip" else val / w
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64), colour).save(folder / fname, quality=95)
    if val_layout == "zip":
        (val / "val_annotations.txt").write_text(
            "".join(f"{f}\t{w}\t0\t0\t63\t63\n" for f, w in annotations))


@pytest.mark.parametrize("val_layout", ["zip", "reorganised"])
def test_tiny_layout(tmp_path, monkeypatch, val_layout):
    make_tiny(tmp_path / "tiny", val_layout)
    train, test, spec = load_dataset("tiny", tmp_path)
    assert spec.shape == (3, 64, 64)
    assert train.images.shape == (8, 3, 64, 64) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    # class n01 is red, n02 blue (JPEG: approximately); the grayscale image is grey in all channels
    means = train.images.float().mean(dim=(2, 3))
    for i in (0, 1, 2):
        assert means[i, 0] > 150 and means[i, 2] < 80
        assert means[4 + i, 2] > 150 and means[4 + i, 0] < 80
    assert (means[3] - 128).abs().max() < 4 and (means[7] - 128).abs().max() < 4
    # val: labels from the annotations, ImageFolder order (class, then file name)
    assert test.labels.tolist() == [0, 0, 1]
    tmeans = test.images.float().mean(dim=(2, 3))
    assert tmeans[0, 0] > 150 and tmeans[2, 2] > 150
    assert (tmp_path / "tiny" / ".cache_uint8_64.pt").is_file()

    monkeypatch.setattr(decode, "decode_image", lambda *a, **k: (_ for _ in ()).throw(AssertionError("no cache")))
    train2, test2, _ = load_dataset("tiny", tmp_path)
    assert torch.equal(train2.images, train.images) and torch.equal(test2.labels, test.labels)


def test_tiny_missing_and_inconsistent(tmp_path):
    with pytest.raises(DatasetMissingError) as excinfo:
        load_dataset("tiny", tmp_path)
    assert_one_line_missing(excinfo)
    assert "tiny-imagenet-200.zip" in str(excinfo.value) and str(tmp_path / "tiny") in str(excinfo.value)
    make_tiny(tmp_path / "tiny")
    (tmp_path / "tiny" / "tiny-imagenet-200" / "wnids.txt").write_text("n01\nn02\nn03\n")
    with pytest.raises(DatasetMissingError) as excinfo:
        load_dataset("tiny", tmp_path)
    assert_one_line_missing(excinfo)


# -------------------------------------------------------------------------------------- synthetic
def test_synthetic_deterministic_balanced():
    a_tr, a_te = make_synthetic(seed=0)
    b_tr, b_te = make_synthetic(seed=0)
    c_tr, _ = make_synthetic(seed=1)
    assert torch.equal(a_tr.images, b_tr.images) and torch.equal(a_tr.labels, b_tr.labels)
    assert torch.equal(a_te.images, b_te.images)
    assert not torch.equal(a_tr.images, c_tr.images)
    assert a_tr.images.shape == (4 * 256, 3, 32, 32) and a_te.images.shape == (4 * 64, 3, 32, 32)
    assert a_tr.images.dtype == torch.uint8 and a_tr.labels.dtype == torch.int64
    assert a_tr.labels.bincount().tolist() == [256] * 4 and a_te.labels.bincount().tolist() == [64] * 4
    assert not torch.equal(a_tr.images[:len(a_te)], a_te.images)
    # not saturated: most pixels strictly inside (0, 255)
    inside = ((a_tr.images > 0) & (a_tr.images < 255)).float().mean()
    assert inside > 0.95


def test_synthetic_through_its_data_source(tmp_path):
    kw = dict(num_classes=3, channels=1, size=20, train_per_class=5, test_per_class=2)
    train, test, spec = load_dataset("synthetic", tmp_path / "unused", pattern_seed=7, **kw)
    assert isinstance(train, ImageSet) and isinstance(spec, DatasetSpec)
    assert spec.shape == (1, 20, 20) and spec.num_classes == 3
    assert train.images.shape == (15, 1, 20, 20) and test.images.shape == (6, 1, 20, 20)
    assert train.labels.bincount().tolist() == [5, 5, 5]
    assert torch.equal(train.images, make_synthetic(**kw, seed=7)[0].images)
    assert not (tmp_path / "unused").exists()


def test_synthetic_classes_separable_by_template():
    """Nearest class mean (from train) already classifies the test set well above chance."""
    train, test = make_synthetic(num_classes=6, seed=4)
    x_tr, x_te = train.images.float().flatten(1), test.images.float().flatten(1)
    means = torch.stack([x_tr[train.labels == k].mean(0) for k in range(6)])
    acc = (torch.cdist(x_te, means).argmin(1) == test.labels).float().mean().item()
    assert acc > 0.6


def test_download_failure_is_one_line(tmp_path, monkeypatch):
    import torchvision.datasets

    class OfflineCIFAR:
        def __init__(self, root, train=True, download=False, **kwargs):
            raise OSError("<urlopen error [Errno -3]\nTemporary failure in name resolution>")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", OfflineCIFAR)
    with pytest.raises(DatasetMissingError) as excinfo:
        load_dataset("cifar10", tmp_path, download=True)
    assert_one_line_missing(excinfo)
    assert "download" in str(excinfo.value)


def test_tiny_download_wired(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    calls = []

    def fake_download(url, download_root, md5=None, **kwargs):
        calls.append((url, download_root, md5))
        make_tiny(Path(download_root))

    monkeypatch.setattr(tvu, "download_and_extract_archive", fake_download)
    train, test, _ = load_dataset("tiny", tmp_path, download=True)
    assert calls == [(tiny.URL, str(tmp_path / "tiny"), tiny.MD5)]
    assert len(train) == 8 and len(test) == 3
    load_dataset("tiny", tmp_path, download=True)  # present now: no second download
    assert len(calls) == 1
