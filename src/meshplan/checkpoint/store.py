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

Checkpoints travel (downloads, shared filesystems), so reading one trusts none of its bytes: the
manifest is checked by type before any value is used, a file is opened only if the manifest
lists it in ``files`` under a plain name, inside the checkpoint, without following a symbolic
link and only if it is a regular file; tensor-file headers are checked as strictly as
safetensors checks them, so no read goes outside a file's data and nothing is allocated that
the file does not hold. Every refusal is a CheckpointError naming the checkpoint and the entry.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import re
import reprlib
import shutil
import stat
import struct
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterable, NoReturn

import torch

MANIFEST = "meshplan-checkpoint.json"
FORMAT = "meshplan-checkpoint"
VERSION = 1
MAX_MANIFEST_BYTES = 64 * 2**20
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on a header

_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written: incomplete, torn, unsafe, or not meshplan's."""


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlong, _REPR.maxlist, _REPR.maxdict, _REPR.maxlevel = 80, 80, 40, 6, 4, 2


def shown(value: Any) -> str:
    """``value`` for an error message: one line, at most about 80 characters."""
    text = _REPR.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _place(path: Path) -> str:
    """A path for an error message, on one line."""
    text = str(path)
    return text if text.isprintable() else repr(text)


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


# ---------------------------------------------------------------- opening a checkpoint's files


def is_plain_name(name: Any) -> bool:
    """Whether ``name`` names a file directly inside a directory: no separator, no ``..``, no NUL."""
    return (isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")
            and not os.path.isabs(name))


def open_member(checkpoint: Path, name: str, size: int) -> int:
    """A read-only descriptor of the regular file ``name`` directly inside ``checkpoint``, of ``size`` bytes.

    ``name`` must be a plain name (the manifest's ``files`` are checked to be). A symbolic link is
    never followed (O_NOFOLLOW: the name has no other component a link could hide in), and a FIFO
    or device is refused without blocking (O_NONBLOCK, then fstat).
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(checkpoint / name, flags)
    except OSError as error:
        why = "it is a symbolic link, never followed" if error.errno == errno.ELOOP else error.strerror or str(error)
        raise CheckpointError(f"checkpoint {_place(checkpoint)}: {_name(name)} cannot be opened as a regular file "
                              f"of the checkpoint ({why}).") from None
    status = os.fstat(descriptor)
    if not stat.S_ISREG(status.st_mode) or status.st_size != size:
        os.close(descriptor)
        what = "is not a regular file" if not stat.S_ISREG(status.st_mode) else "changed size since the manifest was checked"
        raise CheckpointError(f"checkpoint {_place(checkpoint)}: {_name(name)} {what}.")
    return descriptor


def _read_exactly(descriptor: int, buffer: bytearray | memoryview, offset: int) -> bool:
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


_TORCH_DTYPES = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}
_NUMEL_LIMIT = 2**63  # torch's sizes and strides are int64


class TensorFileReader:
    """Reads whole tensors from a safetensors file of a checkpoint with plain reads, one at a time.

    Unlike a memory map, a read leaves nothing of the file resident in the process: reading a
    tensor costs the tensor's size, whatever was read before. The header is checked as strictly
    as safetensors checks it before anything else is read, so every tensor's bytes lie inside the
    file and match its shape and dtype; ``size`` is the file's size as the manifest gives it.
    """

    def __init__(self, checkpoint: str | os.PathLike, name: str, size: int) -> None:
        self.checkpoint = Path(checkpoint)
        self.name = name
        self.path = self.checkpoint / name
        self._size = size
        self._mapped: Any = None  # safetensors' own reader, for slices
        descriptor = open_member(self.checkpoint, name, size)
        try:
            prefix = bytearray(8)
            if not _read_exactly(descriptor, prefix, 0):
                self._refuse(f"it has {size} bytes, fewer than the 8 of a header length")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or length > size - 8:
                self._refuse(f"its header length {length} exceeds {min(MAX_HEADER_BYTES, size - 8)} bytes")
            raw = bytearray(length)
            if not _read_exactly(descriptor, raw, 8):
                self._refuse("it is shorter than its header length says, or cannot be read")
        finally:
            os.close(descriptor)
        self._data_start = 8 + length
        self._entries = self._parse_header(bytes(raw), size - self._data_start)

    def _refuse(self, problem: str) -> NoReturn:
        raise CheckpointError(f"checkpoint {_place(self.checkpoint)}: tensor file {_name(self.name)} is refused: {problem}.")

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
        descriptor = open_member(self.checkpoint, self.name, self._size)
        try:
            complete = _read_exactly(descriptor, buffer, self._data_start + start)
        finally:
            os.close(descriptor)
        if not complete:
            self._refuse(f"tensor {shown(name)} cannot be read whole (the file is shorter now, or unreadable)")
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)

    def slice(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        """Part of a tensor (``index``: one slice per leading dimension), read without reading the rest.

        safetensors' own reader memory-maps the file; it is given the file this reader opened
        (through /proc/self/fd), so it never follows a name that was swapped for a link since.
        """
        if self._mapped is None:
            self._mapped = self._open_mapped()
        if self._mapped is False:  # no way to name an open file on this system: cut from the whole tensor
            return self.tensor(name)[index].clone()
        return self._mapped.get_slice(name)[index]

    def _open_mapped(self) -> Any:
        from safetensors import safe_open

        descriptor = open_member(self.checkpoint, self.name, self._size)
        try:
            path = _descriptor_path(descriptor)
            return safe_open(path, framework="pt") if path is not None else False
        except Exception as error:  # safetensors raises its own error types
            self._refuse(f"safetensors cannot read it ({shown(str(error))})")
        finally:
            os.close(descriptor)


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
    """A reader for each tensor file of a checked manifest; a CheckpointError if a file lacks a tensor of the manifest."""
    readers = {file: TensorFileReader(checkpoint, file, manifest["files"][file])
               for file in sorted(set(manifest["tensors"].values()))}
    held = {file: set(reader.names()) for file, reader in readers.items()}
    missing = [key for key, file in manifest["tensors"].items() if key not in held[file]]
    if missing:
        listed = ", ".join(shown(key) for key in missing[:3])
        raise CheckpointError(f"checkpoint {_place(checkpoint)} is torn: its tensor files lack {len(missing)} tensors "
                              f"of its manifest ({listed}{' ...' if len(missing) > 3 else ''}).")
    return readers


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


def load_safe_object(checkpoint: Path, name: str, size: int) -> Any:
    """The plain data in the ``.pt`` file ``name`` of ``checkpoint`` (``size`` bytes, as its manifest says).

    Only an archive as torch.save writes it is read: its records stored uncompressed, so loading
    costs no more memory than the file's size, then torch.load with ``weights_only=True``: plain
    data and tensors only, never arbitrary objects.
    """
    with os.fdopen(open_member(checkpoint, name, size), "rb") as file:
        try:
            records = zipfile.ZipFile(file).infolist()
        except Exception as error:  # zipfile raises several types on a malformed archive
            raise CheckpointError(
                f"checkpoint {_place(checkpoint)}: {_name(name)} is not an archive written by torch.save "
                f"({shown(str(error))}); meshplan never unpickles a checkpoint's files, it loads them with "
                f"weights_only=True."
            ) from None
        if any(record.compress_type != zipfile.ZIP_STORED for record in records) or sum(r.file_size for r in records) > size:
            raise CheckpointError(f"checkpoint {_place(checkpoint)}: {_name(name)} holds compressed records, which "
                                  f"torch.save never writes; refused.")
        file.seek(0)
        try:
            return torch.load(file, weights_only=True, map_location="cpu")
        except Exception as error:
            raise CheckpointError(
                f"checkpoint {_place(checkpoint)}: {_name(name)} holds objects that loading would have to unpickle by "
                f"running code; refused (torch.load(weights_only=True): {shown(_first_line(error))})."
            ) from None


def _first_line(error: Exception) -> str:
    """The telling line of an error: torch's weights-only refusals name the global they refused."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    telling = [line for line in lines if "Unsupported global" in line or "Unsupported operand" in line]
    return (telling or lines or [type(error).__name__])[0]


# ---------------------------------------------------------------- saving: partial folders, publishing, deleting


def partial_path(final: Path) -> Path:
    """The hidden folder a save writes into before it is published as ``final``."""
    return final.parent / f".{final.name}.partial"


def replaced_path(final: Path) -> Path:
    """The hidden folder a previous checkpoint at ``final`` is moved to while its replacement is published."""
    return final.parent / f".{final.name}.replaced"


def check_replaceable(final: Path) -> None:
    """Refuses to save over a directory that holds something other than a meshplan checkpoint, or where an
    earlier save left a hidden ``.NAME.partial`` or ``.NAME.replaced`` folder that holds something meshplan
    did not write (meshplan would have to delete it)."""
    if final.is_file() and not final.is_symlink():
        raise CheckpointError(f"{final} is a file; a meshplan checkpoint is a directory: remove it or save elsewhere.")
    problem = _removal_problem(final) if final.is_dir() and not final.is_symlink() and any(final.iterdir()) else None
    if problem is not None:
        raise CheckpointError(
            f"{final} is a directory that holds something other than a meshplan checkpoint ({problem}); saving there "
            f"would replace its contents. Save to a new or empty directory."
        )
    for leftover in (partial_path(final), replaced_path(final)):
        problem = _removal_problem(leftover) if os.path.lexists(leftover) else None
        if problem is not None:
            raise CheckpointError(f"{_place(leftover)} is in the way of saving {final}: {problem}. meshplan deletes only "
                                  f"what it wrote; remove it, then save again.")


def prepare_partial(final: Path) -> Path:
    """Clears what an interrupted save of ``final`` left behind and creates the folder to write into.

    A leftover ``.NAME.partial`` is deleted only if it holds nothing but files meshplan writes; anything
    else is a CheckpointError naming it (``check_replaceable`` finds this on every rank first).
    """
    partial = partial_path(final)
    if os.path.lexists(partial) and not delete_checkpoint(partial):
        raise CheckpointError(f"{_place(partial)} is left from an earlier save of {final} and {_removal_problem(partial)}; "
                              f"meshplan deletes only what it wrote: remove it, then save again.")
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
    replaced = replaced_path(final)
    if final.exists():
        if os.path.lexists(replaced) and not delete_checkpoint(replaced):
            raise CheckpointError(f"{_place(replaced)} {_removal_problem(replaced)}; meshplan deletes only what it wrote: "
                                  f"remove it, then save again (the new checkpoint is in {_place(partial)}).")
        os.rename(final, replaced)
    os.rename(partial, final)
    if os.path.lexists(replaced) and not delete_checkpoint(replaced):
        warnings.warn(f"meshplan kept {_place(replaced)}, the checkpoint {final} replaced: {_removal_problem(replaced)}.",
                      stacklevel=2)
    _fsync_directory(final.parent)


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# The names of the files meshplan writes into a checkpoint (and its hidden partial and replaced folders).
_WRITTEN_NAMES = re.compile(r"tensors-\d+-of-\d+\.safetensors|rank-\d+\.pt|state\.pt|"
                            + re.escape(MANIFEST) + r"(\.tmp)?")
_HIDDEN_FOLDER = re.compile(r"\..+\.(partial|replaced)")


def delete_checkpoint(path: Path) -> bool:
    """Deletes ``path`` if it is a folder meshplan wrote, and says whether it did.

    That is a directory (not a symbolic link) holding only files meshplan writes, and either a
    manifest (a checkpoint, even a torn one) or a hidden ``.NAME.partial`` or ``.NAME.replaced``
    name (what a save leaves behind). Anything else is left where it is: False, for the caller to
    say so. ``_removal_problem`` says why.
    """
    if _removal_problem(path) is not None:
        return False
    shutil.rmtree(path)
    return True


def _removal_problem(path: Path) -> str | None:
    """Why ``path`` is not a folder meshplan wrote (None if it is one)."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return "it is not a directory" if not os.path.islink(path) else "it is a symbolic link"
        names = os.listdir(path)
    except OSError as error:
        return f"it cannot be inspected ({error.strerror or error})"
    foreign = [name for name in names if not _WRITTEN_NAMES.fullmatch(name) or not _is_regular(path / name)]
    if foreign:
        listed = ", ".join(shown(name) for name in foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        return f"it holds {listed}, which meshplan does not write"
    if _HIDDEN_FOLDER.fullmatch(path.name):
        return None
    try:
        manifest = json.loads(_read_limited(path, MANIFEST, MAX_MANIFEST_BYTES))
    except (CheckpointError, ValueError, RecursionError):
        return f"it holds no readable {MANIFEST}"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return f"its {MANIFEST} is not a meshplan manifest"
    return None


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _read_limited(checkpoint: Path, name: str, limit: int) -> bytes:
    """The bytes of the regular file ``name`` inside ``checkpoint``, opened without following a link; at most ``limit``."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(checkpoint / name, flags)
    except FileNotFoundError:
        raise CheckpointError(
            f"{_place(checkpoint)} is not a complete meshplan checkpoint: {name} is missing (a save that did not "
            f"finish leaves none)."
        ) from None
    except OSError as error:
        raise CheckpointError(f"checkpoint {_place(checkpoint)}: {name} cannot be opened as a regular file "
                              f"({error.strerror or error}); a symbolic link is never followed.") from None
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise CheckpointError(f"checkpoint {_place(checkpoint)}: {name} is not a regular file.")
        if status.st_size > limit:
            raise CheckpointError(f"checkpoint {_place(checkpoint)}: {name} has {status.st_size} bytes, more than the "
                                  f"{limit} meshplan reads.")
        buffer = bytearray(status.st_size)
        if not _read_exactly(descriptor, buffer, 0):
            raise CheckpointError(f"checkpoint {_place(checkpoint)}: {name} shrank while it was read, or cannot be read.")
        return bytes(buffer)
    finally:
        os.close(descriptor)


# ---------------------------------------------------------------- the manifest


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a complete checkpoint, checked; a CheckpointError naming what is missing or wrong otherwise.

    Every entry is checked by type before any value is used (``_check_manifest``), and every file
    it lists must be a regular file of the size it gives, directly inside the checkpoint (looked
    at with lstat: a symbolic link is refused, never followed). ``aliases``, ``models`` and
    ``optimizers`` are ``{}`` when the manifest has none.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {_place(path)}.")
    if not path.is_dir():
        raise CheckpointError(
            f"{_place(path)} is a file, not a meshplan checkpoint directory; meshplan strategies do not load "
            f"pickled checkpoints (they could run arbitrary code)."
        )
    raw = _read_limited(path, MANIFEST, MAX_MANIFEST_BYTES)
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as error:
        raise CheckpointError(f"{_place(path / MANIFEST)} is not valid JSON: {shown(str(error))}.") from None
    _check_manifest(path, manifest)
    for optional in ("aliases", "models", "optimizers"):
        manifest.setdefault(optional, {})
    _check_files(path, manifest["files"])
    return manifest


def _name(name: str) -> str:
    """A file or tensor name for an error message: as is when short and printable, cut and quoted otherwise."""
    return name if isinstance(name, str) and name.isprintable() and len(name) <= 80 else shown(name)


def _manifest_error(path: Path, entry: str, problem: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {_place(path)}: manifest entry {entry} {problem}.")


def is_number(value: Any) -> bool:
    """Whether ``value`` is an int or a float (a bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """Whether ``value`` is a number a float can hold, not NaN or infinite."""
    try:
        return is_number(value) and math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _check_manifest(path: Path, manifest: Any) -> None:
    """Checks every entry meshplan reads by type and by what it may point at (a file of ``files``, a key of ``tensors``)."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or type(manifest.get("version")) is not int \
            or manifest["version"] != VERSION:
        raise CheckpointError(f"{_place(path / MANIFEST)} is not a version-{VERSION} meshplan checkpoint manifest.")
    if not is_finite_number(manifest.get("saved_at")):
        raise _manifest_error(path, "saved_at", f"is {shown(manifest.get('saved_at'))}, not a finite number")
    for name, least in (("step", 0), ("world_size", 1)):
        value = manifest.get(name, least)
        if type(value) is not int or value < least:
            raise _manifest_error(path, name, f"is {shown(value)}, not an integer of at least {least}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise _manifest_error(path, "files", f"is {shown(files)}, not an object of file names and sizes")
    for name, size in files.items():
        if not is_plain_name(name):
            raise _manifest_error(path, f"files[{shown(name)}]", "is not a plain file name inside the checkpoint")
        if type(size) is not int or size < 0:
            raise _manifest_error(path, f"files[{shown(name)}]", f"is {shown(size)}, not a size in bytes")
    tensors = _checked_object(path, manifest, "tensors", required=True)
    for key, file in tensors.items():
        if not isinstance(file, str) or file not in files:
            raise _manifest_error(path, f"tensors[{shown(key)}]", f"names {shown(file)}, not a file of the manifest's files")
    for alias, target in _checked_object(path, manifest, "aliases").items():
        if not isinstance(target, str) or target not in tensors:
            raise _manifest_error(path, f"aliases[{shown(alias)}]",
                                  f"names {shown(target)}, not a tensor of this checkpoint")
    for name, entries in _checked_object(path, manifest, "models").items():
        for index, entry in enumerate(_checked_list(path, f"models[{shown(name)}]", entries)):
            where = f"models[{shown(name)}][{index}]"
            _check_fields(path, where, entry, {"prefix": str, "class": str, "config": dict})
    for name, groups in _checked_object(path, manifest, "optimizers").items():
        for index, group in enumerate(_checked_list(path, f"optimizers[{shown(name)}]", groups)):
            where = f"optimizers[{shown(name)}][{index}]"
            _check_fields(path, where, group, {"hyperparameters": dict, "params": list})
            stray = [key for key in group["params"] if not isinstance(key, str) or key not in tensors]
            if stray:
                raise _manifest_error(path, f"{where}['params']",
                                      f"holds {shown(stray[0])}, not a tensor of this checkpoint")


def _checked_object(path: Path, manifest: dict[str, Any], name: str, required: bool = False) -> dict[str, Any]:
    value = manifest.get(name) if required or name in manifest else {}
    if not isinstance(value, dict):
        raise _manifest_error(path, name, f"is {shown(value)}, not an object")
    return value


def _checked_list(path: Path, where: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise _manifest_error(path, where, f"is {shown(value)}, not a list")
    return value


def _check_fields(path: Path, where: str, value: Any, fields: dict[str, type]) -> None:
    if not isinstance(value, dict):
        raise _manifest_error(path, where, f"is {shown(value)}, not an object")
    for field, kind in fields.items():
        if not isinstance(value.get(field), kind):
            what = {dict: "an object", list: "a list", str: "a string"}[kind]
            raise _manifest_error(path, f"{where}[{field!r}]", f"is {shown(value.get(field))}, not {what}")


def _check_files(path: Path, files: dict[str, int]) -> None:
    """Each listed file must be a regular file of its listed size (lstat: a link is refused, its target never looked at)."""
    torn = []
    for name, size in files.items():
        try:
            status = os.lstat(path / name)
        except FileNotFoundError:
            torn.append(f"{_name(name)} is missing")
            continue
        except OSError as error:
            raise CheckpointError(
                f"checkpoint {_place(path)}: {_name(name)} cannot be inspected ({error.strerror or error})."
            ) from None
        if stat.S_ISLNK(status.st_mode):
            raise CheckpointError(f"checkpoint {_place(path)}: {_name(name)} is a symbolic link; meshplan reads only "
                                  f"regular files inside a checkpoint and never follows a link out of it.")
        if not stat.S_ISREG(status.st_mode):
            raise CheckpointError(f"checkpoint {_place(path)}: {_name(name)} is not a regular file.")
        if status.st_size != size:
            torn.append(f"{_name(name)} has {status.st_size} bytes, the manifest says {size}")
    if torn:
        more = f"; and {len(torn) - 3} more" if len(torn) > 3 else ""
        raise CheckpointError(f"checkpoint {_place(path)} is torn: {'; '.join(torn[:3])}{more}.")


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a checkpoint whose files are all there."""
    try:
        read_manifest(path)
    except CheckpointError:
        return False
    return True


def latest_checkpoint(directory: str | os.PathLike) -> str | None:
    """The most recent complete checkpoint directly inside ``directory``, or None.

    Partial saves (hidden folders) and folders without a manifest are passed over; a checkpoint
    that cannot be read (torn, or with a manifest or tensor header that does not check out) is
    skipped with a warning that names it and says why, so after a crash this is the checkpoint
    to resume from. A checkpoint that was being replaced when the process died is found in its
    ``.NAME.replaced`` folder. Checkpoints are ordered by the training step they were saved at,
    then by the time they were published.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = []
    for path in sorted(directory.iterdir()):
        # A ".NAME.replaced" folder is a complete checkpoint whose replacement was cut short.
        hidden = path.name.startswith(".") and not path.name.endswith(".replaced")
        if hidden or not path.is_dir() or not os.path.lexists(path / MANIFEST):
            continue
        try:
            manifest = read_manifest(path)
            open_tensor_files(path, manifest)
        except CheckpointError as error:
            warnings.warn(f"latest_checkpoint skips {_place(path)}: {error}", stacklevel=2)
            continue
        found.append((manifest.get("step", 0), manifest["saved_at"], str(path)))
    return max(found)[2] if found else None
