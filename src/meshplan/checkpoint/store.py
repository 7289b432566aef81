"""The on-disk checkpoint format: safetensors files written tensor by tensor, a manifest, atomic publish.

A meshplan checkpoint is a directory::

    meshplan-checkpoint.json                  manifest: files and their sizes, tensors, models, optimizers
    tensors-00000-of-00002.safetensors        whole (unsharded) tensors, each written by one rank
    tensors-00001-of-00002.safetensors
    state.pt                                  the front end's own state (loops, schedulers, counters)
    rank-00000.pt ...                         per-process state (random number generators)

Tensors are stored whole, keyed by name, so any layout can read them back. Nothing in it is
unpickled: tensors are safetensors, and the ``.pt`` files are read with ``weights_only=True``.
A save writes into a hidden sibling folder and renames it into place once the manifest is
written, so a checkpoint is either complete or invisible.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Any, Iterable

import torch

MANIFEST = "meshplan-checkpoint.json"
FORMAT = "meshplan-checkpoint"
VERSION = 1

_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written: incomplete, torn, unsafe, or not meshplan's."""


class TensorFileWriter:
    """Writes one safetensors file a tensor at a time, so no more than one tensor is held in memory.

    The header is laid out up front from the shapes and dtypes; ``write`` must then be called for
    every tensor, in the order given.
    """

    def __init__(self, path: str | os.PathLike, specs: list[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None) -> None:
        header: dict[str, Any] = {}
        offset = 0
        for name, shape, dtype in specs:
            if dtype not in _SAFETENSORS_DTYPES:
                raise CheckpointError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot store.")
            size = _numel(shape) * dtype.itemsize
            header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = metadata or {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.path = Path(path)
        self._pending = [(name, tuple(shape), dtype) for name, shape, dtype in specs]
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Appends the next tensor's bytes."""
        expected = self._pending.pop(0)
        if (name, tuple(tensor.shape), tensor.dtype) != expected:
            raise CheckpointError(f"wrote {name} {tuple(tensor.shape)} {tensor.dtype}, expected {expected}.")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        self._file.write(flat.view(torch.uint8).numpy().data)

    def close(self) -> None:
        """Flushes the file to disk; every tensor must have been written."""
        if self._pending:
            raise CheckpointError(f"{self.path.name}: {len(self._pending)} tensors were never written.")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


_TORCH_DTYPES = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}


class TensorFileReader:
    """Reads whole tensors from a safetensors file with plain reads, one at a time.

    Unlike a memory map, a read leaves nothing of the file resident in the process: reading a
    tensor costs the tensor's size, whatever was read before.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        size = self.path.stat().st_size
        try:
            with open(self.path, "rb") as file:
                (length,) = struct.unpack("<Q", file.read(8))
                if length > size - 8:
                    raise ValueError(f"a header of {length} bytes in a file of {size}")
                header = json.loads(file.read(length))
            header.pop("__metadata__", None)
            self._entries = {name: (tuple(entry["shape"]), _TORCH_DTYPES[entry["dtype"]], *entry["data_offsets"])
                             for name, entry in header.items()}
        except (ValueError, KeyError, TypeError, AttributeError, struct.error) as error:
            raise CheckpointError(f"{self.path} is not a safetensors file: {error!r}.") from None
        self._data_start = 8 + length
        if any(self._data_start + end > size for _, _, _, end in self._entries.values()):
            raise CheckpointError(f"{self.path} is shorter than its header says.")

    def names(self) -> list[str]:
        """The names of the tensors in the file."""
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape."""
        return self._entries[name][0]

    def dtype(self, name: str) -> torch.dtype:
        """A tensor's dtype."""
        return self._entries[name][1]

    def tensor(self, name: str) -> torch.Tensor:
        """A whole tensor, read into memory of its own."""
        shape, dtype, start, end = self._entries[name]
        buffer = bytearray(end - start)
        with open(self.path, "rb") as file:
            file.seek(self._data_start + start)
            file.readinto(buffer)
        if not buffer:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


def _numel(shape: Iterable[int]) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count


def tensor_bytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    """The number of bytes a tensor of ``shape`` and ``dtype`` occupies."""
    return _numel(shape) * dtype.itemsize


def plain_data(value: Any) -> Any:
    """``value`` with mappings made plain dicts (Lightning's AttributeDict, for one), so it loads without code."""
    if isinstance(value, dict):
        return {key: plain_data(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain_data(item) for item in value]
    if type(value) is tuple:
        return tuple(plain_data(item) for item in value)
    return value


def check_safe_object(obj: Any, what: str) -> bytes:
    """``obj`` serialized by torch.save; a CheckpointError if loading it back would need unpickling code."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    try:
        torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"{what} holds an object that could only be loaded by unpickling code, which meshplan checkpoints "
            f"refuse: {_first_line(error)}. Keep checkpointed state to numbers, strings, lists, dicts and tensors."
        ) from None
    return buffer.getvalue()


def check_storable(tensors: Iterable[tuple[str, torch.dtype]]) -> None:
    """A CheckpointError naming the first tensor whose dtype safetensors cannot store."""
    for name, dtype in tensors:
        if dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot store.")


def save_safe_object(obj: Any, path: Path, what: str) -> None:
    """torch.save of plain data (dicts, lists, numbers, strings, tensors), refused if loading it would need unpickling code."""
    data = check_safe_object(obj, what)
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def load_safe_object(path: Path) -> Any:
    """torch.load with ``weights_only=True``: plain data and tensors only, never arbitrary objects."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:
        raise CheckpointError(
            f"{path} holds objects that loading would have to unpickle by running code; refused "
            f"(torch.load(weights_only=True): {_first_line(error)})."
        ) from None


def _first_line(error: Exception) -> str:
    """The telling line of an error: torch's weights-only refusals name the global they refused."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    telling = [line for line in lines if "Unsupported global" in line or "Unsupported operand" in line]
    return (telling or lines or [type(error).__name__])[0]


def partial_path(final: Path) -> Path:
    """The hidden folder a save writes into before it is published as ``final``."""
    return final.parent / f".{final.name}.partial"


def check_replaceable(final: Path) -> None:
    """Refuses to save over a directory that holds something other than a meshplan checkpoint."""
    if final.is_file() and not final.is_symlink():
        raise CheckpointError(f"{final} is a file; a meshplan checkpoint is a directory: remove it or save elsewhere.")
    if final.is_dir() and not final.is_symlink() and any(final.iterdir()) and not (final / MANIFEST).is_file():
        raise CheckpointError(
            f"{final} is a directory that holds no meshplan checkpoint; saving there would replace its contents. "
            f"Save to a new or empty directory."
        )


def prepare_partial(final: Path) -> Path:
    """Clears what an interrupted save of ``final`` left behind and creates the folder to write into."""
    partial = partial_path(final)
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def publish(partial: Path, final: Path, sizes: dict[str, int], manifest: dict[str, Any]) -> None:
    """Writes the manifest and renames ``partial`` to ``final``.

    ``sizes`` are the sizes of the tensor files as their writers measured them (on another node,
    a stat here could be stale); the other files are rank 0's own. Until the rename the
    checkpoint is invisible. A previous checkpoint at ``final`` is moved aside to
    ``.NAME.replaced`` first and deleted last; ``latest_checkpoint`` still finds it there if
    the process dies in between.
    """
    files = {path.name: path.stat().st_size for path in sorted(partial.iterdir())}
    manifest = dict(manifest, format=FORMAT, version=VERSION, saved_at=time.time(), files={**files, **sizes})
    staged = partial / (MANIFEST + ".tmp")
    with open(staged, "w") as file:
        json.dump(manifest, file, indent=1)
        file.flush()
        os.fsync(file.fileno())
    os.replace(staged, partial / MANIFEST)
    if final.is_symlink() or final.is_file():
        final.unlink()
    replaced = final.parent / f".{final.name}.replaced"
    if final.exists():
        if replaced.exists():
            shutil.rmtree(replaced)
        os.rename(final, replaced)
    os.rename(partial, final)
    if replaced.exists():
        shutil.rmtree(replaced)
    _fsync_directory(final.parent)


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a complete checkpoint; a CheckpointError naming what is missing otherwise."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}.")
    if not path.is_dir():
        raise CheckpointError(
            f"{path} is a file, not a meshplan checkpoint directory; meshplan strategies do not load "
            f"pickled checkpoints (they could run arbitrary code)."
        )
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(
            f"{path} is not a complete meshplan checkpoint: {MANIFEST} is missing (a save that did not "
            f"finish leaves none)."
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as error:
        raise CheckpointError(f"{manifest_path} is not valid JSON: {error}.") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"{manifest_path} is not a version-{VERSION} meshplan checkpoint manifest.")
    problems = []
    for name, size in manifest["files"].items():
        file = path / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != size:
            problems.append(f"{name} has {file.stat().st_size} bytes, the manifest says {size}")
    if problems:
        raise CheckpointError(f"checkpoint {path} is torn: " + "; ".join(problems) + ".")
    return manifest


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a checkpoint whose files are all there."""
    try:
        read_manifest(path)
    except CheckpointError:
        return False
    return True


def latest_checkpoint(directory: str | os.PathLike) -> str | None:
    """The most recent complete checkpoint directly inside ``directory``, or None.

    Partial saves (hidden folders without a manifest) and torn checkpoints are skipped, so after
    a crash this is the checkpoint to resume from; a checkpoint that was being replaced when the
    process died is found in its ``.NAME.replaced`` folder. Checkpoints are ordered by the training step
    they were saved at, then by the time they were published.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = []
    for path in directory.iterdir():
        # A ".NAME.replaced" folder is a complete checkpoint whose replacement was cut short.
        hidden = path.name.startswith(".") and not path.name.endswith(".replaced")
        if hidden or not path.is_dir():
            continue
        try:
            manifest = read_manifest(path)
        except CheckpointError:
            continue
        found.append((manifest.get("step", 0), manifest["saved_at"], str(path)))
    return max(found)[2] if found else None
