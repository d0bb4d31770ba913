"""Tiny-ImageNet (200 classes, 64 px) in its zip layout under `<root>/tiny/tiny-imagenet-200`; BackdoorBench's
reorganised val/<wnid>/ layout is read too."""
from __future__ import annotations

from pathlib import Path

from bdcore.data import DatasetSpec, ImageSet
from bdcore.datasets.base import DataSource, DatasetMissingError, download_failed
from bdcore.datasets.decode import cached_decode, images_in

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
MD5 = "90528d7ca1a48142e341f4ef8d21d0de"


def tiny_missing(base: Path, detail: str) -> DatasetMissingError:
    return DatasetMissingError(
        f"Tiny-ImageNet not found under {base} ({detail}); download {URL} and unzip it under {base} "
        f"(giving {base / 'tiny-imagenet-200'}), or set dataset.download=true")


class TinyImageNet(DataSource):
    spec = DatasetSpec("tiny", 200, 3, 64, 64, (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262))
    folder = "tiny"

    def read(self) -> tuple[ImageSet, ImageSet]:
        base, download = self.root, self.download
        data = base / "tiny-imagenet-200"
        if not (data / "train").is_dir() and download:
            from torchvision.datasets.utils import download_and_extract_archive

            try:
                download_and_extract_archive(URL, download_root=str(base), md5=MD5)
            except (RuntimeError, OSError) as err:
                raise download_failed("Tiny-ImageNet", base, err) from err
        train_dir, val_dir = data / "train", data / "val"
        if not train_dir.is_dir():
            raise tiny_missing(base, "no tiny-imagenet-200/train folder")
        if not val_dir.is_dir():
            raise tiny_missing(base, "no tiny-imagenet-200/val folder")
        classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
        wnids_file = data / "wnids.txt"
        if wnids_file.is_file():
            wnids = sorted(w.strip() for w in wnids_file.read_text().split() if w.strip())
            if wnids != classes:
                raise tiny_missing(base, f"wnids.txt lists {len(wnids)} classes but train/ holds "
                                          f"{len(classes)} matching folders; re-extract the archive")
        index = {w: i for i, w in enumerate(classes)}

        # ImageFolder order (BackdoorBench): classes sorted, then file names sorted within a class.
        train_samples = []
        for w in classes:
            folder = train_dir / w / "images"
            if not folder.is_dir():
                folder = train_dir / w
            train_samples += [(str(p), index[w]) for p in images_in(folder)]

        annotations = val_dir / "val_annotations.txt"
        val_samples = []
        if annotations.is_file() and (val_dir / "images").is_dir():  # the zip's layout
            for line in annotations.read_text().splitlines():
                parts = line.split("\t")
                if len(parts) < 2 or not parts[0].strip():
                    continue
                fname, wnid = parts[0].strip(), parts[1].strip()
                if wnid not in index:
                    raise tiny_missing(base, f"val_annotations.txt names unknown class {wnid}")
                val_samples.append((index[wnid], fname, str(val_dir / "images" / fname)))
        else:  # BackdoorBench's reorganised layout val/<wnid>/[images/]*.JPEG
            for w in classes:
                folder = val_dir / w / "images" if (val_dir / w / "images").is_dir() else val_dir / w
                if folder.is_dir():
                    val_samples += [(index[w], p.name, str(p)) for p in images_in(folder)]
        if not val_samples:
            raise tiny_missing(base, "no validation images (val/images + val/val_annotations.txt)")
        val_samples.sort(key=lambda t: (t[0], t[1]))  # what ImageFolder over val/<wnid>/ yields
        test_samples = [(p, y) for y, _, p in val_samples]
        return cached_decode(base / ".cache_uint8_64.pt", data, train_samples, test_samples, 64)
