"""PyTorch `.bin` weights read without torch: the original LLaVA checkpoints (liuhaotian's
`pytorch_model-*.bin`, `non_lora_trainables.bin`, `mm_projector.bin`) ship them.

`torch.save` writes a zip archive: `*/data.pkl`, a pickle of the state dict whose tensors
point (by persistent id) at storages, one file each under `*/data/`. The pickle is read by a
restricted unpickler that knows only what rebuilds tensors — the globals of
`torch.load(weights_only=True)`'s allow-list that state dicts use — and refuses any other
global (`os.system`, `builtins.eval`, ...) before anything is called, so a hostile file
cannot run code. Storages are memory-mapped where the archive stores them uncompressed (as
torch writes them): a tensor's bytes are read only when it is used.
"""

import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, Tuple

import mlx.core as mx
import numpy as np

from ..errors import LlavaError

# torch's storage classes → (numpy dtype of the stored bytes, MLX view; bfloat16 has no numpy dtype)
STORAGES = {
    "FloatStorage": (np.float32, None),
    "HalfStorage": (np.float16, None),
    "BFloat16Storage": (np.uint16, mx.bfloat16),
    "DoubleStorage": (np.float64, None),
    "LongStorage": (np.int64, None),
    "IntStorage": (np.int32, None),
    "ShortStorage": (np.int16, None),
    "CharStorage": (np.int8, None),
    "ByteStorage": (np.uint8, None),
    "BoolStorage": (np.bool_, None),
}


@dataclass(frozen=True)
class StorageType:
    name: str


@dataclass(frozen=True)
class Storage:
    kind: str  # a STORAGES key
    key: str  # its file under data/
    count: int  # elements


@dataclass(frozen=True)
class TensorRef:
    """A tensor as the pickle describes it: a view (offset, shape, strides in elements) of a storage."""

    storage: Storage
    offset: int
    shape: tuple
    strides: tuple


def rebuild_tensor(storage, offset, shape, strides, requires_grad=False, hooks=None, metadata=None):
    return TensorRef(storage, int(offset), tuple(shape), tuple(strides))


def rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    return data


# The only globals a state dict's pickle may name: everything else is refused unread.
ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): rebuild_parameter,
    **{("torch", name): StorageType(name) for name in STORAGES},
}


class Unpickler(pickle.Unpickler):
    def __init__(self, file, where: str):
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED:
            raise LlavaError(
                f"refusing to read {self.where}: its pickle names {module}.{name}, which is not part of "
                "a PyTorch state dict (a .bin file can run code when loaded; only tensors are read)"
            )
        return ALLOWED[(module, name)]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], StorageType)):
            raise LlavaError(f"refusing to read {self.where}: an unknown persistent id {str(pid)[:60]}")
        kind = pid[1].name
        return Storage(kind, str(pid[2]), int(pid[4]))


def read_bin(file: Path) -> Dict[str, mx.array]:
    """Every tensor of a PyTorch `.bin` state dict as an MLX array, bit for bit."""
    return dict(iter_bin(file))


def iter_bin(file: Path) -> Iterator[Tuple[str, mx.array]]:
    """(name, MLX array) of each tensor in turn: only the tensor being converted is in memory
    (the storages are memory-mapped), so a multi-GB file can be re-saved a piece at a time."""
    if not zipfile.is_zipfile(file):
        raise LlavaError(
            f"cannot read weights {file}: not a PyTorch zip archive (the format before torch 1.6 is "
            "not read without torch)"
        )
    try:
        with zipfile.ZipFile(file) as archive:
            root, state = read_pickle(file, archive)
            storages = {}
            for name, ref in state.items():
                if not isinstance(ref, TensorRef):
                    raise LlavaError(f"cannot read weights {file}: '{name}' is not a tensor")
                key = ref.storage.key
                if key not in storages:
                    storages[key] = storage_array(file, archive, f"{root}data/{key}", ref.storage)
                yield str(name), to_mlx(storages[key], ref)
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, KeyError, ValueError, OSError) as e:
        raise LlavaError(f"cannot read weights {file}: {type(e).__name__}: {str(e)[:120]}") from None


def read_pickle(file: Path, archive: zipfile.ZipFile) -> Tuple[str, dict]:
    """(the archive's root folder, the state dict with TensorRefs for tensors)."""
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
        raise LlavaError(f"cannot read weights {file}: no single data.pkl in the archive")
    root = pickles[0][: -len("data.pkl")]
    if f"{root}byteorder" in names and archive.read(f"{root}byteorder").strip() != b"little":
        raise LlavaError(f"cannot read weights {file}: big-endian tensors are not supported")
    with archive.open(pickles[0]) as data:
        state = Unpickler(data, str(file)).load()
    if not isinstance(state, dict):
        raise LlavaError(f"cannot read weights {file}: it holds a {type(state).__name__}, not a state dict")
    return root, state


def storage_array(file: Path, archive: zipfile.ZipFile, member: str, storage: Storage) -> np.ndarray:
    """A storage's elements: memory-mapped from the archive when stored uncompressed."""
    dtype = np.dtype(STORAGES[storage.kind][0])
    info = archive.getinfo(member)
    if info.file_size != storage.count * dtype.itemsize:
        expected = storage.count * dtype.itemsize
        raise LlavaError(f"cannot read weights {file}: storage {member} has {info.file_size} bytes, not {expected}")
    if info.compress_type != zipfile.ZIP_STORED:
        return np.frombuffer(archive.read(member), dtype=dtype)
    with open(file, "rb") as f:  # the local header's name and extra lengths give the data's offset
        f.seek(info.header_offset + 26)
        name_length, extra_length = np.frombuffer(f.read(4), dtype="<u2")
    start = info.header_offset + 30 + int(name_length) + int(extra_length)
    if storage.count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(file, dtype=dtype, mode="r", offset=start, shape=(storage.count,))


def to_mlx(storage: np.ndarray, ref: TensorRef) -> mx.array:
    """The tensor's view of its storage, made contiguous, as MLX (bfloat16 through its bits)."""
    itemsize = storage.dtype.itemsize
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.strides)) if all(ref.shape) else ref.offset
    if ref.offset < 0 or any(s < 0 for s in ref.strides) or (all(ref.shape) and last >= storage.shape[0]):
        raise LlavaError("a tensor reaches outside its storage")
    view = np.lib.stride_tricks.as_strided(
        storage[ref.offset :], shape=ref.shape, strides=[s * itemsize for s in ref.strides], writeable=False
    )
    contiguous = np.array(view, order="C")  # a copy; ascontiguousarray would make a scalar 1-d
    # MLX would narrow float64 to float32 by default: keep what the file holds
    array = mx.array(contiguous, dtype=mx.float64) if contiguous.dtype == np.float64 else mx.array(contiguous)
    bits_of = STORAGES[ref.storage.kind][1]
    return array.view(bits_of) if bits_of is not None else array


# -- writing, as torch.save does (what the original's savers write: mm_projector.bin,
# non_lora_trainables.bin), without torch --------------------------------------------------
WRITTEN_STORAGES = {mx.float32: "FloatStorage", mx.float16: "HalfStorage", mx.bfloat16: "BFloat16Storage"}


def _pickle_int(n: int) -> bytes:
    if 0 <= n < 256:
        return pickle.BININT1 + n.to_bytes(1, "little")
    if 0 <= n < 65536:
        return pickle.BININT2 + n.to_bytes(2, "little")
    if -(2**31) <= n < 2**31:
        return pickle.BININT + n.to_bytes(4, "little", signed=True)
    data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return pickle.LONG1 + bytes([len(data)]) + data


def _pickle_str(text: str) -> bytes:
    data = text.encode("utf-8")
    return pickle.BINUNICODE + len(data).to_bytes(4, "little") + data


def _pickle_tuple(items: bytes) -> bytes:
    return pickle.MARK + items + pickle.TUPLE


def state_dict_pickle(tensors: Dict[str, mx.array]) -> bytes:
    """The pickle torch.save writes for a dict of contiguous tensors, storage i holding tensor i:
    each a `torch._utils._rebuild_tensor_v2(storage, 0, shape, strides, False, OrderedDict())`."""
    out = [pickle.PROTO + bytes([2]), pickle.EMPTY_DICT, pickle.MARK]
    for i, (name, value) in enumerate(tensors.items()):
        shape = tuple(value.shape)
        strides = tuple(int(np.prod(shape[k + 1 :])) for k in range(len(shape)))
        storage = _pickle_tuple(
            _pickle_str("storage")
            + pickle.GLOBAL
            + f"torch\n{WRITTEN_STORAGES[value.dtype]}\n".encode()
            + _pickle_str(str(i))
            + _pickle_str("cpu")
            + _pickle_int(int(np.prod(shape)))
        )
        arguments = (
            storage
            + pickle.BINPERSID
            + _pickle_int(0)
            + _pickle_tuple(b"".join(map(_pickle_int, shape)))
            + _pickle_tuple(b"".join(map(_pickle_int, strides)))
            + pickle.NEWFALSE
            + pickle.GLOBAL
            + b"collections\nOrderedDict\n"
            + pickle.EMPTY_TUPLE
            + pickle.REDUCE
        )
        out += [
            _pickle_str(name),
            pickle.GLOBAL + b"torch._utils\n_rebuild_tensor_v2\n",
            _pickle_tuple(arguments),
            pickle.REDUCE,
        ]
    return b"".join(out + [pickle.SETITEMS, pickle.STOP])


def write_bin(path: Path, tensors: Dict[str, mx.array]):
    """A PyTorch `.bin` (torch.save's zip format: archive/data.pkl, archive/data/<i>, byteorder,
    version) of float32 / float16 / bfloat16 tensors, readable by torch.load(weights_only=True)."""
    root = path.stem
    try:
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.writestr(f"{root}/data.pkl", state_dict_pickle(tensors))
            archive.writestr(f"{root}/byteorder", "little")
            for i, value in enumerate(tensors.values()):
                if value.dtype not in WRITTEN_STORAGES:
                    raise LlavaError(f"cannot write a {value.dtype} tensor to {path}")
                data = np.array(value.view(mx.uint16) if value.dtype == mx.bfloat16 else value)
                archive.writestr(f"{root}/data/{i}", data.tobytes())
            archive.writestr(f"{root}/version", "3\n")
    except OSError as e:
        raise LlavaError(f"cannot write {path}: {e}") from None
