"""A meshplan checkpoint -> a Hugging Face model directory, one tensor at a time.

Whatever layout wrote the checkpoint (DDP, ZeRO 1/2/3, TP, TP x DP; Lightning or Accelerate),
provided it holds a transformers PreTrainedModel, its tensors are whole, so export only copies them out: each tensor is read from the checkpoint
and appended to its output safetensors file before the next is read. Peak memory is the largest
tensor, not the model.

A checkpoint of a model with peft adapters holds only the adapters: it is exported as a peft
adapter directory, or with ``merge=True`` merged into its base model (adapter_export.py).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

from meshplan.checkpoint.adapter_export import adapter_of, write_adapter, write_merged
from meshplan.checkpoint.sharded import CheckpointReader
from meshplan.checkpoint.tensor_files import TensorFileWriter, tensor_bytes
from meshplan.errors import CheckpointError, shown

DEFAULT_MAX_SHARD_SIZE = "5GB"
_SHOWN_PREFIXES = 5
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def export(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, model: str | None = None,
           max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, merge: bool = False,
           base: str | os.PathLike | None = None) -> Path:
    """Writes the Hugging Face model in ``checkpoint`` to ``out_dir`` (config.json plus safetensors).

    Only a transformers ``PreTrainedModel`` can be exported (its config is what makes the folder
    loadable); a checkpoint of plain torch modules is read with ``CheckpointReader`` or
    ``load_training_state`` instead.

    A model trained with peft adapters (LoRA) is checkpointed without its frozen base. By default
    its adapter is written as peft writes one (adapter_config.json and adapter_model.safetensors),
    which ``PeftModel.from_pretrained(base_model, out_dir)`` loads. With ``merge=True`` the base
    model is read from ``base`` and the adapter merged into it: ``out_dir`` is then a whole model
    that ``from_pretrained`` loads.

    The model is written into a new hidden folder beside ``out_dir`` (``.NAME.partial-XXXXXXXX``)
    that is renamed to ``out_dir`` once complete; on any failure, an interrupt included, that
    folder is removed and ``out_dir`` is left as it was. Nothing that was there before is
    deleted or written over.

    Args:
        checkpoint: a meshplan checkpoint directory (from any strategy, Lightning or Accelerate) that
            holds a transformers PreTrainedModel.
        out_dir: a new (or empty) directory, not a link (missing parents are created);
            ``from_pretrained(out_dir)`` loads the model.
        model: which model, when the checkpoint holds several: its prefix, e.g. ``"model"``.
        max_shard_size: the largest safetensors file, in bytes or as "500MB"/"5GB"; a larger model
            is split into ``model-0000i-of-0000n.safetensors`` with a ``model.safetensors.index.json``.
        merge: for a model with a LoRA adapter: write the base model with the adapter merged in.
        base: the local model directory the adapter was trained on. With ``merge``, the base is read
            from it (default: the adapter config's ``base_model_name_or_path``, when that is a local
            directory); without, it is written into adapter_config.json as that path.

    Raises:
        CheckpointError: ``out_dir`` cannot be created, the checkpoint cannot be read, or it holds no
            PreTrainedModel (or several, and ``model`` names none of them); with ``merge``: the model
            has no adapter, or the base cannot be found or does not take the adapter.
        OSError: writing failed (the partial folder is removed first).
    """
    out = Path(out_dir).absolute()
    _check_target(out)  # before any work: reading the checkpoint may take long
    limit = parse_size(max_shard_size)
    with CheckpointReader(checkpoint) as reader:
        module_name, pretrained = _pick_model(reader, model)
        adapter = adapter_of(reader, module_name, pretrained)
        if merge and adapter is None:
            raise CheckpointError(f"checkpoint {shown(str(reader.path))} holds a whole model, not an adapter: there is "
                                  f"nothing to merge; export it without --merge (merge=False).")
        names = _hf_names(reader, f"{module_name}/{pretrained['prefix']}") if adapter is None else []
        shards = _split(reader, names, limit)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = _new_partial(out)
        try:
            if adapter is None:
                _write_model(reader, shards, names, pretrained, partial)
            elif merge:
                write_merged(reader, adapter, pretrained, base, partial, limit)
            else:
                write_adapter(reader, adapter, base, partial)
            # rename(2) replaces an empty directory and fails on anything else: a directory that
            # filled up meanwhile is not replaced.
            os.rename(partial, out)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)  # this call's own folder, and only that
            raise
    return out


def _check_target(out: Path) -> None:
    """A CheckpointError, before any work, when export may not create ``out``.

    Refused: a link (to a directory or to nothing: export writes a directory of its own, not
    through a link), a file or anything else that is not a directory, a non-empty directory, and
    a parent that is not a directory or cannot be written. Missing parents are created.
    """
    if out.is_symlink():
        raise CheckpointError(f"{shown(str(out))} is a symbolic link; export creates a new directory of its own: "
                              f"give a path that does not exist.")
    if os.path.lexists(out) and not out.is_dir():
        raise CheckpointError(f"{shown(str(out))} already exists and is not a directory; export writes a new one.")
    if out.is_dir() and any(out.iterdir()):
        raise CheckpointError(f"{shown(str(out))} already exists and is not an empty directory; export writes a new one.")
    # Missing parents are created, as save_pretrained does; the nearest existing one must be a writable directory.
    existing = next(folder for folder in out.parents if os.path.lexists(folder))
    if not existing.is_dir():
        raise CheckpointError(f"{shown(str(out))} cannot be created: {shown(str(existing))} is not a directory.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CheckpointError(f"{shown(str(out))} cannot be created: this user cannot write to {shown(str(existing))}.")


def _new_partial(out: Path) -> Path:
    """A new hidden folder beside ``out`` to write into; its name is new, so nothing there before is touched."""
    for _ in range(100):
        partial = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
        try:
            partial.mkdir()  # exclusive: fails if the name exists; honours the umask, unlike mkdtemp
        except FileExistsError:
            continue
        return partial
    raise CheckpointError(f"no new partial folder name for {shown(str(out))} in 100 tries; remove the old ones.")


def _write_model(reader: CheckpointReader, shards: list[list[tuple[str, str]]], names: list[tuple[str, str]],
                 pretrained: dict[str, Any], partial: Path) -> None:
    """The safetensors files, the index of a sharded model, and config.json, into ``partial``."""
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


def _pick_model(reader: CheckpointReader, wanted: str | None) -> tuple[str, dict[str, Any]]:
    found = [(module, entry) for module, entries in reader.manifest["models"].items() for entry in entries]
    if not found:
        raise _no_pretrained_model(reader)
    if wanted is not None:
        prefix = wanted.rstrip(".") + "." if wanted else ""
        found = [(module, entry) for module, entry in found if entry["prefix"] == prefix]
    if len(found) != 1:
        # The prefixes come from the manifest: a few of them, each cut short, are shown.
        where = ", ".join(shown(entry["prefix"].rstrip(".")) for _, entry in found[:_SHOWN_PREFIXES]) or "none"
        more = ", ..." if len(found) > _SHOWN_PREFIXES else ""
        raise CheckpointError(
            f"checkpoint {shown(str(reader.path))} holds {len(found)} Hugging Face models matching model={shown(wanted)} "
            f"(prefixes: {where}{more}); name one with model=PREFIX (--model PREFIX)."
        )
    return found[0]


def _no_pretrained_model(reader: CheckpointReader) -> CheckpointError:
    """The error for a checkpoint of plain torch modules: what export needs, and how to read the tensors instead."""
    names = list(reader.manifest["models"])
    modules = ", ".join(shown(name) for name in names[:_SHOWN_PREFIXES])
    modules += ", ..." if len(names) > _SHOWN_PREFIXES else ""
    example = shown(names[0]) if names else "'model'"
    return CheckpointError(
        f"checkpoint {shown(str(reader.path))} holds no transformers PreTrainedModel (export writes only those, as a "
        f"from_pretrained directory); its models ({modules or 'none'}) are plain torch modules. Read its tensors "
        f"with meshplan.checkpoint.CheckpointReader(path) (keys() and tensor(key)), or load them into your module "
        f"with meshplan.checkpoint.load_training_state(path, {{{example}: module}}, {{}})."
    )


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
    """Bytes in ``size``: a positive int, or a string such as "500MB", "5GB", "2GiB"."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = float(size) if size.bit_length() < 64 else float("inf")
    else:
        match = re.fullmatch(r"\s*(\d{1,30}(?:\.\d{1,30})?)\s*([KMGT]?I?B?)\s*", str(size).upper())
        value = float(match.group(1)) * _UNITS[match.group(2)] if match and match.group(2) in _UNITS else 0.0
    if not 1 <= value < 2**63:
        raise CheckpointError(f"max_shard_size={shown(size)} is not a size such as 500MB or 5GB.")
    return int(value)


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
