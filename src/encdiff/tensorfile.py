"""Safetensors files larger than memory: written tensor by tensor through a memory map, and read the same way.

The decoded-image and latent caches of a large folder do not fit in memory, so they are never held whole: a cache is
written into its final layout (the safetensors format: an 8-byte little-endian header length, a JSON header, the raw
data) by filling memory-mapped views of the file, and read back as tensors over a copy-on-write memory map, whose
pages the operating system loads as batches touch them and drops under pressure. The files stay ordinary safetensors
(`safetensors.safe_open` reads them), written atomically like every other file of encdiff.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .checkpoint import default_mode
from .errors import EncdiffError

DTYPES = {torch.uint8: ("U8", np.uint8), torch.int64: ("I64", np.int64), torch.float32: ("F32", np.float32)}
NUMPY = {code: np_dtype for code, np_dtype in DTYPES.values()}


def write_mapped(path: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 fill: Callable[[dict[str, np.ndarray]], None], metadata: dict[str, str] | None = None) -> None:
    """Create the safetensors file `path` holding tensors of the given dtypes and shapes, whose values `fill` writes
    into the numpy views it is given (one per name, memory-mapped onto the file); atomic: until `fill` returns
    and the file is synced, `path` is untouched."""
    header, offset = {}, 0
    for name in sorted(specs):
        dtype, shape = specs[name]
        nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": DTYPES[dtype][0], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header with spaces to 8-byte alignment
    start = 8 + len(encoded)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)) + encoded)
            f.truncate(start + offset)
        views = {name: np.memmap(tmp, dtype=DTYPES[specs[name][0]][1], mode="r+", offset=start + info["data_offsets"][0],
                                 shape=tuple(info["shape"]))
                 for name, info in header.items() if name != "__metadata__" and info["data_offsets"][1] > info["data_offsets"][0]}
        fill(views)
        for view in views.values():
            view.flush()
        del views
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_mapped(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file as a tensor over a copy-on-write memory map (nothing read yet), and the
    file's metadata. A file that is not safetensors raises EncdiffError naming it."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            length = struct.unpack("<Q", f.read(8))[0]
            if length > size - 8:
                raise ValueError(f"a header of {length} bytes in a file of {size}")
            header = json.loads(f.read(length))
        start = 8 + length
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            shape = tuple(int(d) for d in info["shape"])
            dtype = NUMPY[info["dtype"]]
            if start + end > size or end - begin != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
                raise ValueError(f"tensor {name!r} does not fit the file")
            if end == begin:
                tensors[name] = torch.from_numpy(np.zeros(shape, dtype=dtype))
            else:
                tensors[name] = torch.from_numpy(np.memmap(path, dtype=dtype, mode="c", offset=start + begin,
                                                           shape=shape))
    except (ValueError, KeyError, TypeError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EncdiffError(f"{path}: not a safetensors file ({e})") from None
    return tensors, header.get("__metadata__") or {}
