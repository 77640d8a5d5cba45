"""The files a checkpoint is made of, read and written: JSON objects, safetensors (lazily, or one
slice of a tensor), PyTorch `.bin`. The bottom of checkpoint/: it imports nothing of ours but
errors.
"""

import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict

import mlx.core as mx
import numpy as np

from ..errors import LlavaError
from .torch_bin import read_bin


def read_json(path: Path) -> dict:
    """A JSON object from `path`; one clear error for anything else."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise LlavaError(f"missing {path.name} in {path.parent}") from None
    except IsADirectoryError:
        raise LlavaError(f"{path} is a directory, not a JSON file") from None
    except UnicodeDecodeError as e:
        raise LlavaError(f"{path} is not UTF-8 text (byte {e.start})") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise LlavaError(f"{path} is not valid JSON: {e}") from None
    except OSError as e:
        raise LlavaError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise LlavaError(f"{path} must hold a JSON object, not a {type(data).__name__}")
    return data


def weight_files(path: Path) -> list:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(read_json(index).get("weight_map", {}).values()))
        if any(not isinstance(n, str) or Path(n).name != n or n in ("", ".", "..") for n in names):
            raise LlavaError(f"{index} lists a weight file that is not a plain file name in {path}")
        missing = [n for n in names if not (path / n).exists()]
        if missing:
            raise LlavaError(f"missing weight shard {missing[0]} in {path} (listed in {index.name})")
        return [path / n for n in names]
    return [Path(p) for p in sorted(glob.glob(str(path / "*.safetensors")))]


def load_weights(path: Path) -> Dict[str, mx.array]:
    """Every tensor of a checkpoint directory, lazily (safetensors are memory-mapped)."""
    files = weight_files(path)
    if not files:
        if glob.glob(str(path / "*.bin")):
            raise LlavaError(
                f"{path} has only PyTorch .bin weights; convert the checkpoint first "
                f"(python convert.py --model {path} --out DIR)"
            )
        raise LlavaError(f"no weights (*.safetensors) in {path}")
    weights = {}
    for file in files:
        try:
            weights.update(mx.load(str(file)))
        except (RuntimeError, ValueError, OSError) as e:
            raise LlavaError(f"cannot read weights {file}: {e}") from None
    return weights


def tensor_files(path: Path, stem: str) -> list:
    """[`stem`.safetensors], else [`stem`.bin], else []."""
    return next(([path / f"{stem}{ext}"] for ext in (".safetensors", ".bin") if (path / f"{stem}{ext}").exists()), [])


def read_tensors(path: Path, stem: str) -> Dict[str, mx.array]:
    """Every tensor of `stem` in `path` (safetensors lazily; .bin memory-mapped, torch_bin.py)."""
    weights = {}
    for file in tensor_files(path, stem):
        if file.suffix == ".bin":
            weights.update(read_bin(file))
        else:
            try:
                weights.update(mx.load(str(file)))
            except (RuntimeError, ValueError, OSError) as e:
                raise LlavaError(f"cannot read weights {file}: {e}") from None
    return weights


def has_safetensors(path: Path) -> bool:
    return bool(glob.glob(str(path / "*.safetensors")))


def save_shard(path: Path, shard: dict):
    try:
        mx.save_safetensors(str(path), shard, metadata={"format": "mlx"})
    except (RuntimeError, OSError, ValueError) as e:
        raise LlavaError(f"cannot write {path}: {e}") from None


def write_json(path: Path, data: dict):
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
    except OSError as e:
        raise LlavaError(f"cannot write {path}: {e}") from None


SAFETENSORS_DTYPES = {
    "F64": (np.float64, None), "F32": (np.float32, None), "F16": (np.float16, None),
    "BF16": (np.uint16, mx.bfloat16), "I64": (np.int64, None), "I32": (np.int32, None),
    "I16": (np.int16, None), "I8": (np.int8, None), "U64": (np.uint64, None),
    "U32": (np.uint32, None), "U16": (np.uint16, None), "U8": (np.uint8, None), "BOOL": (np.bool_, None),
}  # fmt: skip


@dataclass(frozen=True)
class Entry:
    file: str
    dtype: str
    shape: tuple
    offset: int  # of the tensor's first byte in the file

    def matches(self, value: mx.array) -> bool:
        numpy_dtype, view = SAFETENSORS_DTYPES.get(self.dtype, (None, None))
        return (
            numpy_dtype is not None
            and self.shape == tuple(value.shape)
            and (view or getattr(mx, np.dtype(numpy_dtype).name, None)) == value.dtype
        )


def tensor_index(files) -> Dict[str, Entry]:
    """Where each tensor of the safetensors `files` lies (their JSON headers only)."""
    index = {}
    for file in files:
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                begin = 8 + size + info["data_offsets"][0]
                index[name] = Entry(str(file), info["dtype"], tuple(info["shape"]), begin)
    return index


def read_slice(entry: Entry, axis: int, index: int, parts: int) -> mx.array:
    """Part `index` of `parts` along `axis`, read from the memory-mapped file: only its pages
    are touched (a row block is one contiguous range; a column block a run per row)."""
    numpy_dtype, view = SAFETENSORS_DTYPES[entry.dtype]
    data = np.memmap(entry.file, dtype=numpy_dtype, mode="r", offset=entry.offset, shape=entry.shape)
    step = entry.shape[axis] // parts
    where = [slice(None)] * len(entry.shape)
    where[axis] = slice(index * step, (index + 1) * step)
    part = mx.array(np.ascontiguousarray(data[tuple(where)]))
    del data
    return part.view(view) if view else part


def file_slices(stored: dict, files) -> Callable:
    """`read_part(value, axis, index, parts)` for distributed.shard: part `index` of a tensor of
    `stored` (the checkpoint's tensors as read) read from its safetensors file; None for a
    tensor that is not one of them as stored (computed at load time)."""
    index, names = tensor_index(files), {id(v): k for k, v in stored.items()}

    def read_part(value, axis: int, part: int, parts: int):
        entry = index.get(names.get(id(value)))
        return read_slice(entry, axis, part, parts) if entry is not None and entry.matches(value) else None

    return read_part
