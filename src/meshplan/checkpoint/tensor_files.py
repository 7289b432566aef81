"""Safetensors files of a checkpoint: written a tensor at a time, read back as untrusted bytes.

Writing lays out the header from the shapes and dtypes up front, then appends each tensor's
bytes, so no more than one tensor is held in memory. Reading trusts none of a file's bytes: the
file is opened only as a regular file directly inside the checkpoint (never through a symbolic
link, never a FIFO or device), and the header is checked as strictly as safetensors checks it
before anything else is read, so no read goes outside the file's data and nothing is allocated
that the file does not hold. Every refusal is a CheckpointError naming the checkpoint and the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import struct
from pathlib import Path
from typing import Any, Iterable, Iterator, NoReturn

import torch

from meshplan.errors import CheckpointError, shown, shown_key, shown_path

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on a header

_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_TORCH_DTYPES = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}
_NUMEL_LIMIT = 2**63  # torch's sizes and strides are int64


# ---------------------------------------------------------------- writing


def tensor_bytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    """The number of bytes a tensor of ``shape`` and ``dtype`` occupies."""
    count = dtype.itemsize
    for size in shape:
        count *= int(size)
    return count


def check_storable(tensors: Iterable[tuple[str, torch.dtype]]) -> None:
    """A CheckpointError naming the first tensor whose dtype safetensors cannot store."""
    for name, dtype in tensors:
        if dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot store.")


class TensorFileWriter:
    """Writes one safetensors file a tensor at a time, so no more than one tensor is held in memory.

    The header is laid out up front from the shapes and dtypes; ``write`` must then be called for
    every tensor, in the order given.
    """

    def __init__(self, path: str | os.PathLike, specs: list[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None) -> None:
        check_storable((name, dtype) for name, _, dtype in specs)
        names = [name for name, _, _ in specs]
        if len(set(names)) != len(names):
            # A second entry of a name would overwrite the first in the header while both tensors'
            # bytes are written: a file safetensors cannot read.
            duplicate = next(name for index, name in enumerate(names) if name in names[:index])
            raise CheckpointError(f"{shown_path(Path(path).name)}: tensor {shown_key(duplicate)} would be written twice.")
        header: dict[str, Any] = {}
        offset = 0
        for name, shape, dtype in specs:
            size = tensor_bytes(shape, dtype)
            header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = metadata or {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.path = Path(path)
        self._pending = [(name, tuple(shape), dtype) for name, shape, dtype in specs]
        self._file = open(self.path, "wb")
        with self._closed_on_error():
            self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Appends the next tensor's bytes. A failed write (a full disk) closes the file: the writer is done."""
        with self._closed_on_error():
            expected = self._pending.pop(0)
            if (name, tuple(tensor.shape), tensor.dtype) != expected:
                raise CheckpointError(f"wrote {name} {tuple(tensor.shape)} {tensor.dtype}, expected {expected}.")
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            self._file.write(flat.view(torch.uint8).numpy().data)

    def close(self) -> None:
        """Flushes the file to disk and closes it; every tensor must have been written (the file is closed anyway)."""
        with self._closed_on_error():
            if self._pending:
                raise CheckpointError(f"{self.path.name}: {len(self._pending)} tensors were never written.")
            self._file.flush()
            os.fsync(self._file.fileno())
        self._file.close()

    @contextlib.contextmanager
    def _closed_on_error(self) -> Iterator[None]:
        """Closes the file if what runs inside raises: a writer that failed keeps no descriptor open."""
        try:
            yield
        except BaseException:
            with contextlib.suppress(OSError):  # its buffered bytes cannot be written either
                self._file.close()
            raise


# ---------------------------------------------------------------- reading


def open_member(checkpoint: Path, name: str, size: int) -> int:
    """A read-only descriptor of the regular file ``name`` directly inside ``checkpoint``, of ``size`` bytes.

    ``name`` must be a plain name (the manifest's ``files`` are checked to be). A symbolic link is
    never followed (O_NOFOLLOW: the name has no other component a link could hide in), and a FIFO
    or device is refused without blocking (O_NONBLOCK, then fstat).
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(checkpoint / name, flags)
    except (OSError, ValueError) as error:  # ValueError (UnicodeError too): a name the OS cannot be given
        if isinstance(error, OSError):
            why = "it is a symbolic link, never followed" if error.errno == errno.ELOOP else error.strerror or str(error)
        else:
            why = f"a name the filesystem cannot hold: {type(error).__name__}"
        raise CheckpointError(f"checkpoint {shown_path(checkpoint)}: {shown_key(name)} cannot be opened as a regular file "
                              f"of the checkpoint ({why}).") from None
    status = os.fstat(descriptor)
    if not stat.S_ISREG(status.st_mode) or status.st_size != size:
        os.close(descriptor)
        what = "is not a regular file" if not stat.S_ISREG(status.st_mode) else "changed size since the manifest was checked"
        raise CheckpointError(f"checkpoint {shown_path(checkpoint)}: {shown_key(name)} {what}.")
    return descriptor


def read_exactly(descriptor: int, buffer: bytearray | memoryview, offset: int) -> bool:
    """Fills ``buffer`` from ``offset``; False if the file ends first, or cannot be read (an I/O error)."""
    view = memoryview(buffer)
    done = 0
    while done < len(view):
        try:
            count = os.preadv(descriptor, [view[done:]], offset + done)
        except OSError:
            return False
        if count == 0:
            return False
        done += count
    return True


def _descriptor_path(descriptor: int) -> str | None:
    """A path that opens the very file ``descriptor`` is open on (not whatever its name points to now), if any."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        if os.path.isdir(folder):
            return f"{folder}/{descriptor}"
    return None


class TensorFileReader:
    """Reads whole tensors from a safetensors file of a checkpoint with plain reads, one at a time.

    Unlike a memory map, a read leaves nothing of the file resident in the process: reading a
    tensor costs the tensor's size, whatever was read before. The header is checked as strictly
    as safetensors checks it before anything else is read, so every tensor's bytes lie inside the
    file and match its shape and dtype; ``size`` is the file's size as the manifest gives it.

    The file stays open until ``close`` (or the end of a ``with`` block): every read goes through
    the descriptor whose header was checked, so a file swapped in under the same name afterwards,
    even one of the same size, is never read.
    """

    def __init__(self, checkpoint: str | os.PathLike, name: str, size: int) -> None:
        self.checkpoint = Path(checkpoint)
        self.name = name
        self.path = self.checkpoint / name
        self._mapped: Any = None  # safetensors' own reader, for slices
        self._descriptor: int | None = open_member(self.checkpoint, name, size)
        try:
            prefix = bytearray(8)
            if not read_exactly(self._descriptor, prefix, 0):
                self._refuse(f"it has {size} bytes, fewer than the 8 of a header length")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or length > size - 8:
                self._refuse(f"its header length {length} exceeds {min(MAX_HEADER_BYTES, size - 8)} bytes")
            raw = bytearray(length)
            if not read_exactly(self._descriptor, raw, 8):
                self._refuse("it is shorter than its header length says, or cannot be read")
            self._data_start = 8 + length
            self._entries = self._parse_header(bytes(raw), size - self._data_start)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Closes the file; no tensor can be read afterwards. Closing twice is harmless."""
        self._mapped = None
        descriptor, self._descriptor = self._descriptor, None
        if descriptor is not None:
            os.close(descriptor)

    def __enter__(self) -> TensorFileReader:
        return self

    def __exit__(self, *exception: Any) -> None:
        self.close()

    def __del__(self) -> None:
        # A reader dropped without close (an exception between opening and a ``with``) still frees its descriptor.
        if getattr(self, "_descriptor", None) is not None:
            self.close()

    def _open_descriptor(self) -> int:
        if self._descriptor is None:
            raise CheckpointError(f"checkpoint {shown_path(self.checkpoint)}: tensor file {shown_key(self.name)} "
                                  f"was closed; open the checkpoint again to read it.")
        return self._descriptor

    def _refuse(self, problem: str) -> NoReturn:
        raise CheckpointError(f"checkpoint {shown_path(self.checkpoint)}: tensor file {shown_key(self.name)} is refused: {problem}.")

    def _parse_header(self, raw: bytes, data_length: int) -> dict[str, tuple[tuple[int, ...], torch.dtype, int, int]]:
        try:  # NaN and Infinity are not JSON, and safetensors refuses them
            header = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
        except (ValueError, RecursionError) as error:
            self._refuse(f"its header is not UTF-8 JSON ({shown(str(error))})")
        if not isinstance(header, dict):
            self._refuse(f"its header is a JSON {type(header).__name__}, not an object")
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
            self._refuse(f"its __metadata__ {shown(metadata)} is not an object of strings")
        entries = {name: self._entry(name, entry, data_length) for name, entry in header.items()}
        # As safetensors requires: the tensors' bytes follow one another and fill the data.
        end_of_previous = 0
        for name, (_, _, start, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
            if start != end_of_previous:
                self._refuse(f"tensor {shown(name)} starts at data byte {start}, where the tensor before it ends "
                             f"at {end_of_previous} (tensors must be contiguous, without overlap)")
            end_of_previous = end
        if end_of_previous != data_length:
            self._refuse(f"its tensors end at data byte {end_of_previous} of {data_length}")
        return entries

    def _entry(self, name: str, entry: Any, data_length: int) -> tuple[tuple[int, ...], torch.dtype, int, int]:
        if not _is_utf8(name):
            self._refuse(f"tensor {shown(name)} has a name that is not valid Unicode")
        if not isinstance(entry, dict):
            self._refuse(f"tensor {shown(name)} is described by {shown(entry)}, not an object")
        dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype_name, str) or dtype_name not in _TORCH_DTYPES:
            self._refuse(f"tensor {shown(name)} has dtype {shown(dtype_name)}, not one of {', '.join(_TORCH_DTYPES)}")
        if not isinstance(shape, list) or not all(type(size) is int and size >= 0 for size in shape):
            self._refuse(f"tensor {shown(name)} has shape {shown(shape)}, not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_length):
            self._refuse(f"tensor {shown(name)} has data_offsets {shown(offsets)}, not [start, end] with "
                         f"0 <= start <= end <= {data_length}")
        dtype = _TORCH_DTYPES[dtype_name]
        numel = _bounded_numel(shape)
        if numel is None or numel * dtype.itemsize != offsets[1] - offsets[0]:
            self._refuse(f"tensor {shown(name)} of shape {shown(shape)} and dtype {dtype_name} does not fill its "
                         f"{offsets[1] - offsets[0]} bytes")
        return tuple(shape), dtype, offsets[0], offsets[1]

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
        if start == end:  # the header was checked: no bytes means no elements
            return torch.zeros(shape, dtype=dtype)
        buffer = bytearray(end - start)
        if not read_exactly(self._open_descriptor(), buffer, self._data_start + start):
            self._refuse(f"tensor {shown(name)} cannot be read whole (the file is shorter now, or unreadable)")
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)

    def slice(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        """Part of a tensor (``index``: one slice per leading dimension), read without reading the rest.

        safetensors' own reader memory-maps the file; it is given the file this reader opened and
        checked (through /proc/self/fd), so it never follows a name that was swapped since.
        """
        if self._mapped is None:
            self._mapped = self._open_mapped()
        if self._mapped is False:  # no way to name an open file on this system: cut from the whole tensor
            return self.tensor(name)[index].clone()
        return self._mapped.get_slice(name)[index]

    def _open_mapped(self) -> Any:
        from safetensors import safe_open

        path = _descriptor_path(self._open_descriptor())
        try:
            return safe_open(path, framework="pt") if path is not None else False
        except Exception as error:  # safetensors raises its own error types
            self._refuse(f"safetensors cannot read it ({shown(str(error))})")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _is_utf8(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8 (JSON lets a lone surrogate through; safetensors does not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _bounded_numel(shape: list[int]) -> int | None:
    """The number of elements of ``shape``, or None when its sizes would overflow torch's int64 strides."""
    count = 1
    for size in shape:
        count *= max(size, 1)
        if count >= _NUMEL_LIMIT:
            return None
    return 0 if 0 in shape else count


def open_tensor_files(checkpoint: Path, manifest: dict[str, Any]) -> dict[str, TensorFileReader]:
    """A reader for each tensor file of a checked manifest (open: the caller closes them); a CheckpointError,
    with every file closed, if a file cannot be read or lacks a tensor of the manifest."""
    readers: dict[str, TensorFileReader] = {}
    try:
        for file in sorted(set(manifest["tensors"].values())):
            readers[file] = TensorFileReader(checkpoint, file, manifest["files"][file])
        held = {file: set(reader.names()) for file, reader in readers.items()}
        missing = [key for key, file in manifest["tensors"].items() if key not in held[file]]
        if missing:
            listed = ", ".join(shown(key) for key in missing[:3])
            raise CheckpointError(f"checkpoint {shown_path(checkpoint)} is torn: its tensor files lack {len(missing)} "
                                  f"tensors of its manifest ({listed}{' ...' if len(missing) > 3 else ''}).")
    except BaseException:
        close_all(readers.values())
        raise
    return readers


def close_all(readers: Iterable[TensorFileReader]) -> None:
    """Closes every reader."""
    for reader in readers:
        reader.close()
