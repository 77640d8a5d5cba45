"""PyTorch .bin files read without torch (checkpoint/torch_bin.py): bit-identical to
`torch.load(weights_only=True)` for every dtype the released checkpoints use, views and shared
storages included; a pickle naming any other global is refused before anything runs."""

import pickle
import sys
import zipfile
from collections import OrderedDict

import mlx.core as mx
import numpy as np
import pytest

from llava_mlx.checkpoint.torch_bin import iter_bin, read_bin
from llava_mlx.errors import LlavaError

torch = pytest.importorskip("torch")  # the test extra installs it: it is the reference here


def state_dict():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=g)
    return OrderedDict(
        [
            ("model.embed_tokens.weight", torch.randn(12, 8, generator=g).to(torch.float16)),
            ("model.layers.0.mlp.down_proj.weight", torch.randn(8, 16, generator=g).to(torch.bfloat16)),
            ("model.norm.weight", torch.randn(8, generator=g)),
            ("model.mm_projector.0.weight", torch.nn.Parameter(torch.randn(4, 4, generator=g), requires_grad=False)),
            ("double", torch.randn(3, generator=g).double()),
            ("positions", torch.arange(7)),
            ("int32", torch.arange(5, dtype=torch.int32)),
            ("int16", torch.arange(5, dtype=torch.int16)),
            ("int8", torch.arange(-3, 3, dtype=torch.int8)),
            ("uint8", torch.arange(6, dtype=torch.uint8)),
            ("mask", torch.tensor([True, False, True])),
            ("scalar", torch.tensor(3.5)),
            ("empty", torch.zeros(0, 4)),
            ("base", base),
            ("transposed", base.t()),  # a view: strides (1, 10), the same storage
            ("rows", base[2:5]),  # offset into the storage
            ("columns", base[:, 3:7]),
        ]
    )


def as_numpy(value) -> np.ndarray:
    if isinstance(value, mx.array):
        return np.array(value.view(mx.uint16)) if value.dtype == mx.bfloat16 else np.array(value)
    value = value.detach().contiguous()
    return value.view(torch.int16).numpy().view(np.uint16) if value.dtype == torch.bfloat16 else value.numpy()


def test_bit_identical_to_torch(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save(state_dict(), path)
    expected = torch.load(path, map_location="cpu", weights_only=True)
    ours = read_bin(path)
    assert list(ours) == list(expected)
    names = {mx.float16: "float16", mx.bfloat16: "bfloat16", mx.float32: "float32", mx.float64: "float64"}
    for name, tensor in expected.items():
        got = ours[name]
        assert tuple(got.shape) == tuple(tensor.shape), name
        assert str(tensor.dtype).split(".")[-1] == names.get(got.dtype, str(got.dtype).split(".")[-1]), name
        assert as_numpy(got).tobytes() == as_numpy(tensor).tobytes(), name


def test_read_one_tensor_at_a_time(tmp_path):
    path = tmp_path / "w.bin"
    torch.save(state_dict(), path)
    pieces = iter_bin(path)
    name, first = next(pieces)  # nothing else is converted yet
    assert name == "model.embed_tokens.weight" and first.dtype == mx.float16
    assert len(list(pieces)) == len(state_dict()) - 1


class Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > pwned.txt",))


def test_a_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.bin"
    torch.save({"weight": torch.zeros(2)}, path)
    with zipfile.ZipFile(path) as archive:  # the same archive with the state dict swapped for an exploit
        members = {n: archive.read(n) for n in archive.namelist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    members[pkl] = pickle.dumps({"weight": Exploit()}, protocol=2)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    with pytest.raises(LlavaError, match=r"names (posix|os)\.system, which is not part of a PyTorch state dict"):
        read_bin(path)
    assert not (tmp_path / "pwned.txt").exists()


def test_not_a_zip_and_legacy_files(tmp_path):
    legacy = tmp_path / "legacy.bin"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(LlavaError, match="not a PyTorch zip archive"):
        read_bin(legacy)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(LlavaError, match="cannot read weights .*junk.bin"):
        read_bin(junk)


def test_torch_is_not_imported(tmp_path, monkeypatch):
    path = tmp_path / "w.bin"
    torch.save({"w": torch.ones(3, dtype=torch.float16)}, path)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` would raise
    assert read_bin(path)["w"].tolist() == [1.0, 1.0, 1.0]
