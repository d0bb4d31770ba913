"""A reader for the IDX format of (Fashion-)MNIST."""
from __future__ import annotations

import gzip

import numpy as np

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
