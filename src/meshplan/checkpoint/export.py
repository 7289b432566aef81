"""A meshplan checkpoint -> a Hugging Face model directory, one tensor at a time.

Whatever layout wrote the checkpoint (DDP, ZeRO 1/2/3, TP, TP x DP; Lightning or Accelerate),
its tensors are whole, so export only copies them out: each tensor is read from the checkpoint
and appended to its output safetensors file before the next is read. Peak memory is the largest
tensor, not the model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from meshplan.checkpoint.sharded import CheckpointReader
from meshplan.checkpoint.store import CheckpointError, TensorFileWriter, tensor_bytes

DEFAULT_MAX_SHARD_SIZE = "5GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def export(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, model: str | None = None,
           max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Writes the Hugging Face model in ``checkpoint`` to ``out_dir`` (config.json plus safetensors).

    Args:
        checkpoint: a meshplan checkpoint directory (from any strategy, Lightning or Accelerate).
        out_dir: a new (or empty) directory; ``from_pretrained(out_dir)`` loads the model.
        model: which model, when the checkpoint holds several: its prefix, e.g. ``"model"``.
        max_shard_size: the largest safetensors file, in bytes or as "500MB"/"5GB"; a larger model
            is split into ``model-0000i-of-0000n.safetensors`` with a ``model.safetensors.index.json``.
    """
    reader = CheckpointReader(checkpoint)
    module_name, pretrained = _pick_model(reader, model)
    limit = parse_size(max_shard_size)
    out = Path(out_dir).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} already exists and is not an empty directory; export writes a new one.")
    names = _hf_names(reader, f"{module_name}/{pretrained['prefix']}")
    shards = _split(reader, names, limit)
    partial = out.parent / f".{out.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        file = "model.safetensors" if len(shards) == 1 else f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(reader, shard, partial / file)
        weight_map.update({name: file for name, _ in shard})
    if len(shards) > 1:
        total = sum(tensor_bytes(reader.shape(key), reader.dtype(key)) for _, key in names)
        (partial / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = dict(pretrained["config"])
    config["architectures"] = config.get("architectures") or [pretrained["class"]]
    (partial / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if out.exists():
        out.rmdir()
    os.rename(partial, out)
    return out


def _pick_model(reader: CheckpointReader, wanted: str | None) -> tuple[str, dict[str, Any]]:
    found = [(module, entry) for module, entries in reader.manifest["models"].items() for entry in entries]
    if wanted is not None:
        prefix = wanted.rstrip(".") + "." if wanted else ""
        found = [(module, entry) for module, entry in found if entry["prefix"] == prefix]
    if len(found) != 1:
        where = ", ".join(repr(entry["prefix"].rstrip(".")) for _, entry in found) or "none"
        raise CheckpointError(
            f"checkpoint {reader.path} holds {len(found)} Hugging Face models matching model={wanted!r} "
            f"(prefixes: {where}); name one with model=PREFIX (--model PREFIX)."
        )
    return found[0]


def _hf_names(reader: CheckpointReader, prefix: str) -> list[tuple[str, str]]:
    """(name in the Hugging Face model, stored key) for the model's tensors.

    A tied weight is stored once, under the name that comes first in the state dict, which is
    the name ``save_pretrained`` keeps; its other names are aliases and are left out, unless
    the stored name lies outside the model (a weight tied to a module beside it).
    """
    names = [(key[len(prefix):], key) for key in reader.keys() if key.startswith(prefix)]
    names += [(alias[len(prefix):], key) for alias, key in reader.manifest.get("aliases", {}).items()
              if alias.startswith(prefix) and not key.startswith(prefix)]
    return names


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string such as "500MB", "5GB", "2GiB"."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if not match or match.group(2) not in _UNITS:
        raise CheckpointError(f"max_shard_size={size!r} is not a size such as 500MB or 5GB.")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def _split(reader: CheckpointReader, names: list[tuple[str, str]], limit: int) -> list[list[tuple[str, str]]]:
    shards: list[list[tuple[str, str]]] = [[]]
    size = 0
    for name, key in names:
        nbytes = tensor_bytes(reader.shape(key), reader.dtype(key))
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, key))
        size += nbytes
    return shards


def _write_shard(reader: CheckpointReader, shard: list[tuple[str, str]], path: Path) -> None:
    writer = TensorFileWriter(path, [(name, reader.shape(key), reader.dtype(key)) for name, key in shard])
    for name, key in shard:
        writer.write(name, reader.tensor(key))  # one tensor in memory at a time
    writer.close()
