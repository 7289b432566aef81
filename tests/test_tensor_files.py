"""Tier 1: the safetensors files of a checkpoint (meshplan.checkpoint.tensor_files), on their own.

The writer lays out a header from shapes and dtypes, then takes one tensor at a time; the reader
gives back every tensor exactly, and refuses a file that is cut short or missing with a
CheckpointError that names the checkpoint and the file. tests/test_untrusted_checkpoints.py
covers hostile bytes inside a whole checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from meshplan.checkpoint.tensor_files import TensorFileReader, TensorFileWriter, tensor_bytes
from meshplan.errors import CheckpointError

FILE = "tensors.safetensors"


def _tensors() -> dict[str, torch.Tensor]:
    """One tensor per dtype safetensors stores, in shapes from a scalar to empty and 3-D."""
    generator = torch.Generator().manual_seed(0)
    floats = torch.randn(2, 3, 4, generator=generator)
    return {
        "f64 matrix": torch.randn(3, 5, generator=generator, dtype=torch.float64),
        "f32 3-d": floats,
        "f16 vector": floats.reshape(-1)[:7].half(),
        "bf16 column": floats[:, :, :1].bfloat16(),
        "i64 scalar": torch.tensor(-(2 ** 40)),
        "i32 row": torch.arange(-3, 3, dtype=torch.int32).reshape(1, 6),
        "i16 values": torch.tensor([-32768, 0, 32767], dtype=torch.int16),
        "i8 values": torch.tensor([-128, 5, 127], dtype=torch.int8),
        "u8 values": torch.tensor([0, 128, 255], dtype=torch.uint8),
        "bool mask": torch.tensor([[True, False], [False, True]]),
        "empty": torch.zeros(0, 4),
    }


def _write(folder: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Writes ``tensors`` to folder/FILE in their order; returns the file's size."""
    writer = TensorFileWriter(folder / FILE, [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()], metadata)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    return (folder / FILE).stat().st_size


def test_every_dtype_and_shape_reads_back_exactly(tmp_path: Path) -> None:
    tensors = _tensors()
    size = _write(tmp_path, tensors)
    with TensorFileReader(tmp_path, FILE, size) as reader:
        assert reader.names() == list(tensors)
        for name, tensor in tensors.items():
            assert (reader.shape(name), reader.dtype(name)) == (tuple(tensor.shape), tensor.dtype), name
            read = reader.tensor(name)
            assert read.dtype == tensor.dtype and torch.equal(read, tensor), name
        assert torch.equal(reader.slice("f32 3-d", (slice(1, 2), slice(0, 2))), tensors["f32 3-d"][1:2, 0:2])


def test_the_file_is_plain_safetensors(tmp_path: Path) -> None:
    tensors = _tensors()
    _write(tmp_path, tensors, metadata={"format": "pt", "written by": "a test"})
    loaded = load_file(tmp_path / FILE)  # safetensors' own reader
    assert set(loaded) == set(tensors)
    assert all(loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor) for name, tensor in tensors.items())


def test_the_data_takes_exactly_the_bytes_of_the_tensors(tmp_path: Path) -> None:
    tensors = _tensors()
    size = _write(tmp_path, tensors)
    raw = (tmp_path / FILE).read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert header % 8 == 0  # the data starts 8-byte aligned
    assert size - 8 - header == sum(tensor_bytes(t.shape, t.dtype) for t in tensors.values())


@pytest.mark.parametrize("kept", [4, 40, -1], ids=["inside the length", "inside the header", "one data byte short"])
def test_a_truncated_file_is_refused_naming_it(kept: int, tmp_path: Path) -> None:
    size = _write(tmp_path, _tensors())
    path = tmp_path / FILE
    path.write_bytes(path.read_bytes()[:kept])
    with pytest.raises(CheckpointError, match=f"checkpoint .*{tmp_path.name}.*: tensor file '?{FILE}'? is refused"):
        TensorFileReader(tmp_path, FILE, path.stat().st_size)
    # Read with the size written down before it was cut (as a manifest gives it): refused too.
    with pytest.raises(CheckpointError, match="changed size"):
        TensorFileReader(tmp_path, FILE, size)


def test_a_missing_file_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=f"{FILE}'? cannot be opened as a regular file .*No such file"):
        TensorFileReader(tmp_path, FILE, 100)


def test_a_closed_reader_reads_nothing_more(tmp_path: Path) -> None:
    size = _write(tmp_path, {"x": torch.ones(3)})
    reader = TensorFileReader(tmp_path, FILE, size)
    reader.close()
    with pytest.raises(CheckpointError, match="was closed"):
        reader.tensor("x")
