"""GTSRB in BackdoorBench's folder layout under `<root>/gtsrb` (39,209 train / 12,630 test images, 32 px);
torchvision's GTSRB download (a different 26,640-image train split) is accepted only with a warning."""
from __future__ import annotations

import csv
import warnings
from pathlib import Path

from bdcore.data import DatasetSpec, ImageSet
from bdcore.datasets.base import DataSource, DatasetMissingError, download_failed
from bdcore.datasets.decode import cached_decode

NUM_CLASSES = 43


def read_ground_truth_csv(csv_path: Path, image_dir: Path) -> list[tuple[str, int]]:
    """Rows of a GTSRB ground-truth CSV (';'-separated, header row) -> (image path, ClassId)."""
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.reader(f, delimiter=";") if r and any(c.strip() for c in r)]
    header = [c.strip() for c in rows[0]] if rows else []
    label_col = header.index("ClassId") if "ClassId" in header else 7  # BackdoorBench reads column 7
    return [(str(image_dir / r[0].strip()), int(r[label_col])) for r in rows[1:]]


def gtsrb_missing(base: Path, detail: str) -> DatasetMissingError:
    return DatasetMissingError(
        f"GTSRB not found under {base} ({detail}); expected BackdoorBench's layout "
        f"Train/000CC/GT-000CC.csv for CC=00..42 plus Test/GT-final_test.csv with the images beside them "
        f"(BackdoorBench's sh/gtsrb_download.sh builds it from GTSRB_Final_Training_Images, "
        f"GTSRB_Final_Test_Images and GTSRB_Final_Test_GT), or set dataset.download=true to use "
        f"torchvision's GTSRB (a different 26,640-image train split)")


class GTSRB(DataSource):
    # BackdoorBench resizes to 32 x 32 and does not normalise GTSRB (mean 0, std 1)
    spec = DatasetSpec("gtsrb", NUM_CLASSES, 3, 32, 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    folder = "gtsrb"

    def read(self) -> tuple[ImageSet, ImageSet]:
        base = self.root
        train_dir, test_dir = base / "Train", base / "Test"
        if train_dir.is_dir() or test_dir.is_dir():
            train_samples = []
            for c in range(NUM_CLASSES):
                folder = train_dir / f"{c:05d}"
                csv_path = folder / f"GT-{c:05d}.csv"
                if not csv_path.is_file():
                    raise gtsrb_missing(base, f"missing {csv_path.relative_to(base)}")
                train_samples += read_ground_truth_csv(csv_path, folder)
            test_csv = test_dir / "GT-final_test.csv"
            if not test_csv.is_file():
                raise gtsrb_missing(base, f"missing {test_csv.relative_to(base)}")
            test_samples = read_ground_truth_csv(test_csv, test_dir)
            return cached_decode(base / ".cache_uint8_32.pt", base, train_samples, test_samples, 32)
        if self.download or (base / "GTSRB" / "Training").is_dir():
            return self._read_torchvision()
        raise gtsrb_missing(base, "no Train/ or Test/ folder")

    def _read_torchvision(self) -> tuple[ImageSet, ImageSet]:
        """torchvision's GTSRB (its root is base's parent, so it lives in base/GTSRB)."""
        import torchvision.datasets as tvd

        base = self.root
        warnings.warn("GTSRB: using torchvision's download, whose train split (26,640 images) differs from "
                      "BackdoorBench's (39,209); results are not comparable with the published numbers")
        samples = []
        for split in ("train", "test"):
            try:
                ds = tvd.GTSRB(root=str(base.parent), split=split, download=self.download)
            except (RuntimeError, OSError) as err:
                if self.download:
                    raise download_failed("GTSRB (torchvision)", base, err) from err
                raise gtsrb_missing(base, f"torchvision GTSRB {split} split incomplete") from err
            # the public API would decode every image through PIL; the sample list is all we need
            samples.append([(str(p), int(y)) for p, y in ds._samples])
        return cached_decode(base / ".cache_uint8_32_torchvision.pt", base, samples[0], samples[1], 32)
