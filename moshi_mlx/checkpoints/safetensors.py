"""Reading and writing safetensors files, with errors that name the file and what to do."""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import mlx.core as mx

from ..errors import CheckpointError


def check_safetensors(path: Path) -> dict:
    """Validate a safetensors header against the file size; return the header."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100_000_000):
                raise CheckpointError(f"{path}: not a safetensors file (bad header length {n})")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON)") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    data = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        end = info.get("data_offsets", [0, 0])[1]
        if end > data:
            raise CheckpointError(f"{path}: file is truncated (tensor {key!r} needs {end} data bytes, "
                                  f"the file has {data}); download it again")
    return header


def read_safetensors(paths: list[Path]) -> dict[str, mx.array]:
    state: dict[str, mx.array] = {}
    for path in paths:
        check_safetensors(path)
        try:
            part = mx.load(str(path))
        except Exception as e:  # noqa: BLE001 - MLX's message is terse; name the file
            raise CheckpointError(f"{path}: cannot load safetensors ({e})") from None
        state.update(part)
    return state



_ST_DTYPES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32", mx.int32: "I32",
              mx.int64: "I64", mx.uint8: "U8", mx.int8: "I8", mx.uint16: "U16", mx.int16: "I16", mx.bool_: "BOOL"}


def write_safetensors(path: Path, tensors: dict[str, mx.array], metadata: dict[str, str] | None = None,
                      progress: bool = True, what: str = "weights") -> None:
    """Write lazy arrays to a safetensors file one tensor at a time (bounded memory).

    The header is computed from shapes and dtypes alone; each tensor is then evaluated,
    written and released. `tensors` is consumed (emptied) as it is written.
    """
    import numpy as np
    from tqdm import tqdm

    names = sorted(tensors)
    header: dict = {"__metadata__": metadata or {}}
    offset = 0
    for name in names:
        arr = tensors[name]
        if arr.dtype not in _ST_DTYPES:
            raise CheckpointError(f"cannot write {name}: dtype {arr.dtype}")
        size = arr.nbytes
        header[name] = {"dtype": _ST_DTYPES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f, tqdm(total=offset, unit="B", unit_scale=True, desc=what, disable=not progress,
                                     file=sys.stderr, dynamic_ncols=True) as bar:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            arr = tensors.pop(name)
            if arr.dtype in (mx.bfloat16, mx.float16):
                arr = arr.view(mx.uint16)
            elif arr.dtype == mx.bool_:
                arr = arr.astype(mx.uint8)
            mx.eval(arr)
            data = np.ascontiguousarray(np.array(arr, copy=False))
            f.write(data.tobytes())
            bar.update(data.nbytes)
            del arr, data
            mx.clear_cache()
