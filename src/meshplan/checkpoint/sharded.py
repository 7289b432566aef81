"""Saving and loading a training state (models, optimizers, the front end's own state) in any layout.

``save_training_state`` and ``load_training_state`` are collective: every rank calls them. They
are what the Lightning strategies and ``meshplan.accelerator()`` call; the format is in store.py
(writing), manifest.py and tensor_files.py.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from meshplan._compat import deepspeed as deepspeed_compat
from meshplan._compat.deepspeed import full_shape, is_zero_optimizer, zero_param_group_members
from meshplan.checkpoint.engines import (
    Entry,
    innermost_optimizer,
    is_unstored_frozen,
    layout_problem,
    load_model_tensor,
    load_optimizer_state,
    model_entries,
    optimizer_entries,
    reshard_fully_sharded,
)
from meshplan.checkpoint.manifest import is_finite_number, is_number, read_manifest
from meshplan.checkpoint.state_checks import count_problem, is_plain_scalar, like_problem
from meshplan.checkpoint.store import (
    check_replaceable,
    check_safe_object,
    load_safe_object,
    partial_path,
    prepare_partial,
    publish,
    save_safe_object,
)
from meshplan.checkpoint.tensor_files import (
    TensorFileReader,
    TensorFileWriter,
    check_storable,
    close_all,
    open_tensor_files,
    tensor_bytes,
)
from meshplan.errors import CheckpointError, shown, shown_key, shown_path
from meshplan.peft import adapter_manifest, checkpointed, frozen_fingerprint, is_peft_model

STATE_FILE = "state.pt"


def rank_file(rank: int) -> str:
    """The name of the file that holds the per-process state of ``rank``."""
    return f"rank-{rank:05d}.pt"


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_training_state(path: str | os.PathLike, models: dict[str, nn.Module], optimizers: dict[str, Any],
                        state: dict[str, Any], rank_state: dict[str, Any] | None = None,
                        manifest: dict[str, Any] | None = None) -> Path:
    """Writes a checkpoint at ``path`` (a directory) and publishes it once complete. Collective.

    Args:
        models: the models by name (unwrapped: no DDP or DeepSpeed engine around them).
        optimizers: the optimizers by name; their parameters must belong to ``models``.
        state: the front end's own state, as plain data (written by rank 0).
        rank_state: this process's own state (random number generators), if any.
        manifest: extra manifest fields (front end, layout, step).
    """
    final = Path(path).absolute()
    rank, world = _rank_and_world()
    reshard_fully_sharded(models)
    entries, aliases, keys = _all_model_entries(models)
    for name, optimizer in optimizers.items():
        entries += optimizer_entries(name, innermost_optimizer(optimizer), keys)
    # What can be wrong is found on every rank before anything is written: a rank that raised
    # alone would leave the others waiting in the next gather.
    check_replaceable(final)
    check_storable((entry.key, entry.dtype) for entry in entries)
    check_safe_object(state, "the training state")
    if rank_state is not None:
        check_safe_object(rank_state, "the per-process state")
    if rank == 0:
        prepare_partial(final)
    _barrier()
    partial = partial_path(final)
    written, failure = _write_tensors(partial, entries, rank, world)
    try:
        if rank_state is not None:
            save_safe_object(rank_state, partial / rank_file(rank), "the per-process state")
        if rank == 0:
            save_safe_object(state, partial / STATE_FILE, "the training state")
    except OSError as error:
        failure = failure or error
    sizes = _agree_on_success(failure, written)  # every rank learns whether every rank succeeded
    if rank == 0:
        publish(partial, final, sizes, {
            **(manifest or {}),
            "world_size": world,
            "tensors": {entry.key: _tensor_file(owner, world) for entry, owner in zip(entries, _balanced_owners(entries, world))},
            "aliases": aliases,
            "models": {name: _pretrained_models(module) for name, module in models.items()},
            **_adapters(models, keys),
            "optimizers": {name: _param_groups(innermost_optimizer(optimizer), keys) for name, optimizer in optimizers.items()},
        })
    _barrier()
    return final


def _tensor_file(rank: int, world: int) -> str:
    return f"tensors-{rank:05d}-of-{world:05d}.safetensors"


def _write_tensors(partial: Path, entries: list[Entry], rank: int, world: int) -> tuple[dict[str, int], Exception | None]:
    """Gathers every tensor (taking part in every collective) and writes this rank's share.

    A failed write (a full disk) does not stop this rank from taking part in the gathers that
    follow; it is returned, for all ranks to agree on, instead of raised.
    """
    owners = _balanced_owners(entries, world)
    path = partial / _tensor_file(rank, world)
    failure: Exception | None = None
    try:
        writer = TensorFileWriter(path, [(e.key, e.shape, e.dtype) for e, owner in zip(entries, owners) if owner == rank])
    except OSError as error:
        writer, failure = None, error
    for entry, owner in zip(entries, owners):
        if entry.collective or owner == rank:
            value = entry.read()  # every rank takes part in a gather, in the same order
            if owner == rank and failure is None:
                try:
                    writer.write(entry.key, value.to(entry.dtype))
                except OSError as error:
                    failure = error
    if writer is not None and failure is None:
        try:
            writer.close()
        except OSError as error:
            failure = error
    return ({path.name: path.stat().st_size} if failure is None else {}), failure


def _agree_on_success(failure: Exception | None, written: dict[str, int]) -> dict[str, int]:
    """The files every rank wrote and their sizes, or a CheckpointError on every rank if any failed."""
    if not (dist.is_available() and dist.is_initialized()):
        if failure is not None:
            raise CheckpointError(f"saving the checkpoint failed: {failure}") from failure
        return written
    reports: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, (str(failure) if failure is not None else None, written))
    errors = [f"rank {rank}: {error}" for rank, (error, _) in enumerate(reports) if error is not None]
    if errors:
        raise CheckpointError("saving the checkpoint failed, and nothing was published: " + "; ".join(errors))
    return {name: size for _, files in reports for name, size in files.items()}


def _all_model_entries(models: dict[str, nn.Module]) -> tuple[list[Entry], dict[str, str], dict[int, str]]:
    entries: list[Entry] = []
    aliases: dict[str, str] = {}
    keys: dict[int, str] = {}
    for name, module in models.items():
        more, more_aliases, more_keys = model_entries(name, module)
        entries += more
        aliases.update(more_aliases)
        keys.update({identity: key for identity, key in more_keys.items() if identity not in keys})
    return entries, aliases, keys


def _balanced_owners(entries: list[Entry], world: int) -> list[int]:
    """Which rank writes each tensor: the one with the fewest bytes so far (the same answer on every rank)."""
    written = [0] * world
    owners = []
    for entry in entries:
        owner = min(range(world), key=lambda rank: (written[rank], rank))
        written[owner] += tensor_bytes(entry.shape, entry.dtype) + 64
        owners.append(owner)
    return owners


def _pretrained_models(module: nn.Module) -> list[dict[str, Any]]:
    """The Hugging Face models inside ``module``: where they sit and their configs, for export."""
    from meshplan.tp.plans import find_pretrained_models

    return [
        {"prefix": f"{name}." if name else "", "class": type(model).__name__, "config": model.config.to_dict()}
        for name, model in find_pretrained_models(module)
    ]


def _adapters(models: dict[str, nn.Module], keys: dict[int, str]) -> dict[str, Any]:
    """The manifest's ``adapters`` entry for the models with peft adapters (none: no entry).

    Per model: ``frozen``, the fingerprint of its frozen base (meshplan.peft.frozen_fingerprint),
    which a resume must match, and ``peft_models``, what export writes an adapter directory from
    (meshplan.peft.adapter_manifest).
    """
    adapters = {}
    for name, module in models.items():
        if not is_peft_model(module):
            continue
        stored = {tensor_name: keys[id(tensor)] for tensor_name, tensor in checkpointed(module).items() if id(tensor) in keys}
        adapters[name] = {"frozen": frozen_fingerprint(module), "peft_models": adapter_manifest(module, stored)}
    return {"adapters": adapters} if adapters else {}


def _param_groups(optimizer: Any, keys: dict[int, str]) -> list[dict[str, Any]]:
    """Each parameter group's hyperparameters and the keys of its parameters."""
    groups = []
    members = zero_param_group_members(optimizer) if is_zero_optimizer(optimizer) else [g["params"] for g in optimizer.param_groups]
    for group, parameters in zip(optimizer.param_groups, members):
        hyperparameters = {name: _plain(value) for name, value in group.items() if name != "params"}
        # Only what is trained: ZeRO leaves frozen parameters out of its groups, torch keeps them.
        groups.append({"hyperparameters": hyperparameters, "params": [keys[id(p)] for p in parameters if p.requires_grad]})
    return groups


def _plain(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return value


class CheckpointReader:
    """Reads the tensors of a complete checkpoint by name, whole or a slice at a time.

    Construction checks the manifest and every tensor file's header (manifest.read_manifest,
    tensor_files.open_tensor_files): a checkpoint that does not check out is a CheckpointError before
    anything is read, and afterwards every read stays inside the files the manifest lists.

    The tensor files stay open, and are read only through the descriptors that were checked, until
    ``close`` (or the end of a ``with`` block); the state files can still be read after it.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self._files: dict[str, TensorFileReader] = open_tensor_files(self.path, self.manifest)
        self._shapes = {key: self._files[file].shape(key) for key, file in self.manifest["tensors"].items()}
        self._by_owner: dict[str, dict[str, str]] = {}  # "optimizer/parameter" -> {state name: key}
        for key in self._shapes:
            owner, _, name = key.rpartition("/")
            self._by_owner.setdefault(owner, {})[name] = key

    def close(self) -> None:
        """Closes the tensor files (one per rank that wrote them); ``state`` and ``rank_state`` still work."""
        close_all(self._files.values())

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exception: Any) -> None:
        self.close()

    def keys(self) -> list[str]:
        """Every stored tensor's key, in the order they were saved."""
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        """The whole shape of a stored tensor."""
        return self._shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        """The dtype of a stored tensor."""
        return self._files[self.manifest["tensors"][key]].dtype(key)

    def tensor(self, key: str) -> torch.Tensor:
        """A stored tensor, whole, on the CPU (read, not memory-mapped: it alone is resident)."""
        return self._files[self.manifest["tensors"][key]].tensor(key)

    def slice(self, key: str, index: tuple[slice, ...]) -> torch.Tensor:
        """Part of a stored tensor, read without reading the rest."""
        if not index:
            return self.tensor(key)
        return self._files[self.manifest["tensors"][key]].slice(key, index)

    def states_of(self, owner: str) -> dict[str, str]:
        """``{name: key}`` for the stored keys ``owner/name``: the optimizer states of one parameter."""
        return self._by_owner.get(owner, {})

    def state(self) -> dict[str, Any]:
        """The front end's own state (a dict), read without unpickling code."""
        if STATE_FILE not in self.manifest["files"]:
            raise CheckpointError(f"checkpoint {self.path} holds no {STATE_FILE}: its manifest does not list one.")
        return self._state_dict(STATE_FILE)

    def rank_state(self, rank: int) -> dict[str, Any] | None:
        """The per-process state (a dict) saved by ``rank``, or None when that rank did not exist then."""
        name = rank_file(rank)
        return self._state_dict(name) if name in self.manifest["files"] else None

    def _state_dict(self, name: str) -> dict[str, Any]:
        state = load_safe_object(self.path, name, self.manifest["files"][name])
        if not isinstance(state, dict):
            raise CheckpointError(f"checkpoint {self.path}: {name} holds {type(state).__name__}, not the dict meshplan saves.")
        return state


def load_training_state(path: str | os.PathLike | CheckpointReader, models: dict[str, nn.Module],
                        optimizers: dict[str, Any]) -> CheckpointReader:
    """Loads models and optimizers from a checkpoint written in any layout into this one.

    Every name is checked before anything is changed: a model tensor missing from the checkpoint
    (or present with another shape), optimizer state that does not fit its parameters, or a
    hyperparameter the optimizer would refuse is a CheckpointError naming it. ``path`` may be a
    reader the front end opened to check its own state first (it closes that one). Returns the
    reader, for the front end's own state; a reader opened here has its tensor files closed.
    """
    if isinstance(path, CheckpointReader):
        _load_training_state(path, models, optimizers)
        return path
    with CheckpointReader(path) as reader:
        _load_training_state(reader, models, optimizers)
    return reader


def _load_training_state(reader: CheckpointReader, models: dict[str, nn.Module], optimizers: dict[str, Any]) -> None:
    reshard_fully_sharded(models)  # loaded into the sharded parameters, not into whole copies FSDP2 would drop
    aliases = reader.manifest.get("aliases", {})
    targets = []
    keys: dict[int, str] = {}
    for name, module in models.items():
        tensors = checkpointed(module)
        _check_adapters(reader, name, module, tensors)
        for tensor_name, tensor in tensors.items():
            if id(tensor) in keys:
                continue
            key = f"{name}/{tensor_name}"
            stored = aliases.get(key, key)
            keys[id(tensor)] = stored
            targets.append((stored, tensor))
    _check_targets(reader, targets)
    hyperparameters = {}
    for name, optimizer in optimizers.items():  # every check before anything is changed
        inner = innermost_optimizer(optimizer)
        _check_optimizer(reader, name, inner, keys)
        hyperparameters[name] = _checked_hyperparameters(reader, name, inner)
        _check_optimizer_state(reader, name, inner, keys, hyperparameters[name])
    zero3 = deepspeed_compat.zero3_optimizers(tensor for _, tensor in targets)
    for optimizer in zero3:  # persistent (always gathered) parameters are released first...
        deepspeed_compat.release_zero3_parameters(optimizer)
    for stored, tensor in targets:
        load_model_tensor(tensor, reader, stored)
    for optimizer in zero3:  # ... and gathered again from the loaded partitions
        deepspeed_compat.regather_zero3_parameters(optimizer)
    for name, optimizer in optimizers.items():
        inner = innermost_optimizer(optimizer)
        load_optimizer_state(inner, keys, name, reader)
        _set_hyperparameters(inner, hyperparameters[name])
    _barrier()


def _check_adapters(reader: CheckpointReader, name: str, module: nn.Module, tensors: dict[str, Any]) -> None:
    """A CheckpointError unless the checkpoint and ``module`` agree on peft adapters: both have them or neither,
    on the same frozen base (names, shapes and ties: meshplan.peft.frozen_fingerprint), training the same tensors
    (``tensors``: what ``checkpointed(module)`` gives)."""
    saved = reader.manifest["adapters"].get(name)
    where = f"checkpoint {shown_path(reader.path)}: model {shown(name)}"
    if not is_peft_model(module):
        if saved is not None:
            raise CheckpointError(f"{where} was saved with peft adapters and holds only their weights; wrap the model "
                                  f"as it was (peft.get_peft_model with the same config) before loading it.")
        return
    if saved is None:
        raise CheckpointError(f"{where} was saved without peft adapters, and this model has them; load it into the model "
                              f"it was saved from, or export it and build the adapters on the exported model.")
    if saved["frozen"] != frozen_fingerprint(module):
        raise CheckpointError(f"{where}: the frozen base model's parameters (names, shapes, tied weights) differ from "
                              f"those the checkpoint's adapters were trained on; build the same base model (and adapter "
                              f"config) before loading.")
    trained = {f"{name}/{tensor_name}" for tensor_name in tensors}
    stored = {key for key in reader.keys() if key.startswith(f"{name}/")}
    extra = sorted(stored - trained)
    if extra:
        raise CheckpointError(f"{where} holds trained tensors this model does not train ({', '.join(map(shown_key, extra[:5]))}"
                              f"{' ...' if len(extra) > 5 else ''}); build the adapters with the config they were saved with.")


def _check_targets(reader: CheckpointReader, targets: list[tuple[str, torch.Tensor]]) -> None:
    missing = [key for key, _ in targets if key not in reader.manifest["tensors"]]
    if missing:
        raise CheckpointError(
            f"checkpoint {reader.path} has no tensor for {len(missing)} of the model's tensors: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}."
        )
    wrong = [f"{key} {shown(reader.shape(key))} (the model has {full_shape(t)})" for key, t in targets
             if reader.shape(key) != full_shape(t)]
    if wrong:
        raise CheckpointError(f"checkpoint {reader.path} holds tensors of other shapes: {'; '.join(wrong[:5])}.")
    for key, tensor in targets:
        problem = layout_problem(tensor)
        if problem is not None:
            raise CheckpointError(f"cannot load checkpoint {shown_path(reader.path)} into {shown_key(key)}: {problem}.")


def _check_optimizer(reader: CheckpointReader, name: str, optimizer: Any, keys: dict[int, str]) -> None:
    saved = reader.manifest["optimizers"].get(name)
    if saved is None:
        raise CheckpointError(
            f"checkpoint {reader.path} holds no state for optimizer {name!r} (it holds "
            f"{shown(sorted(reader.manifest['optimizers'])) if reader.manifest['optimizers'] else 'the model weights only'})."
        )
    current = {key for group in _param_groups(optimizer, keys) for key in group["params"]}
    stored = {key for group in saved for key in group["params"]}
    if current != stored:
        differing = sorted(current ^ stored)
        raise CheckpointError(
            f"optimizer {name!r} holds other parameters than the checkpoint's ({', '.join(map(shown, differing[:5]))}); "
            f"build the optimizer as it was when the checkpoint was saved."
        )


def _check_optimizer_state(reader: CheckpointReader, name: str, optimizer: Any, keys: dict[int, str],
                           applied: list[dict[str, Any]]) -> None:
    """Refuses stored optimizer state that the optimizer's next ``step()`` would fail on.

    Every layout stores each state tensor whole (ZeRO's partitions and DTensor shards are
    gathered before saving): shaped like its parameter, or a scalar (Adam's ``step``), or, for a
    plain parameter only, no larger than it (``_fits_within``: Adafactor's row and column
    statistics). Within a param group every parameter that has state has the same state names
    as the others with as many dimensions (one that never had a gradient has none; a checkpoint
    saved before the first step has none at all; Adafactor keeps other names for vectors than
    for matrices). ``step`` is a scalar of at least 0, and is required where this optimizer
    already keeps one. AMSGrad (the hyperparameter ``amsgrad`` as it will be set: ``applied``)
    needs ``max_exp_avg_sq``.
    """
    zero = is_zero_optimizer(optimizer)
    members = zero_param_group_members(optimizer) if zero else [g["params"] for g in optimizer.param_groups]
    keeps_step = _keeps_step(optimizer)
    for index, (group, parameters, hyperparameters) in enumerate(zip(optimizer.param_groups, members, applied)):
        where = f"checkpoint {shown_path(reader.path)}: optimizer {name!r} param group {index}"
        # The first parameter with state of each number of dimensions, and its state names.
        first: dict[int, tuple[str, set[str]]] = {}
        for parameter in parameters:
            if is_unstored_frozen(parameter, keys):
                continue
            key = keys[id(parameter)]
            stored = reader.states_of(f"{name}/{key}")
            if not stored:
                continue
            # ZeRO sets and DTensor shards state cut like its parameter: no other shape fits them.
            exact = zero or isinstance(parameter, DTensor)
            for state_name, state_key in stored.items():
                problem = _state_problem(reader, state_name, state_key, full_shape(parameter), exact)
                if problem is not None:
                    raise CheckpointError(f"{where}: state {shown_key(state_key)} {problem}.")
            dimensions = len(full_shape(parameter))
            if dimensions not in first:
                first[dimensions] = (key, set(stored))
            elif set(stored) != first[dimensions][1]:
                other, names = first[dimensions]
                raise CheckpointError(f"{where}: parameter {shown_key(key)} has state {shown(sorted(stored))}, parameter "
                                      f"{shown_key(other)} has {shown(sorted(names))}; every parameter of a group with "
                                      f"as many dimensions has the same.")
        for _, names in first.values():
            if keeps_step and "step" not in names:
                raise CheckpointError(f"{where}: the stored state has no 'step', which this optimizer keeps for every parameter.")
            if hyperparameters.get("amsgrad", group.get("amsgrad")) is True and "max_exp_avg_sq" not in names:
                raise CheckpointError(f"{where}: amsgrad is on, but the stored state has no 'max_exp_avg_sq' for it.")


def _keeps_step(optimizer: Any) -> bool:
    """Whether the optimizer's own state (if it has any yet) holds a ``step`` for some parameter."""
    state = deepspeed_compat.zero_flat_state(optimizer) if is_zero_optimizer(optimizer) else optimizer.state
    return any("step" in per_parameter for per_parameter in state.values())


def _state_problem(reader: CheckpointReader, state_name: str, key: str, parameter_shape: tuple[int, ...],
                   exact: bool) -> str | None:
    """What is wrong with the stored state tensor ``key`` of a parameter of ``parameter_shape``, or None.

    ``exact``: only the parameter's shape or a scalar's fit (ZeRO's and DTensor's parameters);
    otherwise any shape ``_fits_within`` the parameter's does too.
    """
    shape = reader.shape(key)
    if exact and shape not in (parameter_shape, ()):
        return f"has shape {shown(list(shape))}, neither its parameter's {list(parameter_shape)} nor a scalar's []"
    if not exact and not _fits_within(shape, parameter_shape):
        return (f"has shape {shown(list(shape))}, larger than its parameter's {list(parameter_shape)} (state is at most "
                f"as large, dimension by dimension)")
    if reader.dtype(key) == torch.bool:
        return "is a bool tensor, not numbers"
    if state_name == "step":
        if shape != ():
            return f"has shape {shown(list(shape))}, not a scalar's []"
        value = reader.tensor(key).item()  # a scalar: cheap to read now
        if not (math.isfinite(value) and value >= 0):
            return f"is {shown(value)}, not a step count of at least 0"
    return None


def _fits_within(shape: tuple[int, ...], parameter_shape: tuple[int, ...]) -> bool:
    """Whether state of ``shape`` is no larger than its parameter: each of its dimensions, in order, is
    matched to one of the parameter's of at least that size (a scalar, the parameter's own shape,
    Adafactor's ``[rows, 1]`` and ``[rows]``, ``[columns]``). Such state never takes more memory than
    the parameter itself."""
    remaining = iter(parameter_shape)
    # Matching each dimension to the first one that can hold it leaves the most for those after it.
    return all(any(size <= available for available in remaining) for size in shape)


# Hyperparameters torch's LR schedulers add to a param group when they are created (every
# scheduler: initial_lr; OneCycleLR: max_lr, min_lr, max_momentum, base_momentum; SWALR:
# swa_lr). A checkpoint saved with a scheduler holds them even when this run creates its
# scheduler after loading, or has none; refusing them would refuse a valid resume, so they are
# accepted where the group lacks them, as finite numbers only.
_SCHEDULER_KEYS = frozenset({"initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum", "swa_lr"})

# Metadata, not hyperparameters: torch 2.6's optimizers built from named_parameters() keep each
# group's parameter names. The live optimizer's own (or none) are kept; the checkpoint's are not
# set, whatever they are.
_METADATA_KEYS = frozenset({"param_names"})

# A group's own step count (DeepSpeed's FusedAdam keeps one, added at its first step): restored
# where this run's group has none yet, as a non-negative integer.
_GROUP_STEP = "step"

# Flags that choose how this run's optimizer computes (foreach or fused kernels, CUDA-graph
# capture, autograd through the step), not what it computes. They depend on this run's devices
# and torch, and None means "torch picks": the value this run's optimizer was built with is kept,
# whatever the checkpoint says (a bool or None; anything else is refused as a sign of tampering).
_IMPLEMENTATION_FLAGS = frozenset({"foreach", "fused", "capturable", "differentiable"})

# The ranges torch's optimizer constructors check; a value outside them fails the next step() or
# makes it divide by zero (a beta of 1), so it is refused before anything is loaded.
_NON_NEGATIVE = frozenset({"step", "lr", "eps", "weight_decay", "momentum", "lr_decay", "initial_accumulator_value",
                           "momentum_decay", "initial_lr", "max_lr", "min_lr", "swa_lr"})
_UNIT_INTERVAL = frozenset({"betas"})  # each in [0, 1)


def _checked_hyperparameters(reader: CheckpointReader, name: str, optimizer: Any) -> list[dict[str, Any]]:
    """The hyperparameters to set in each of ``optimizer``'s param groups, each checked against the group.

    Only names the group has (or a scheduler's, or the group's ``step``, above), never ``params``,
    each of a type the group's own value has and in the range torch's optimizers accept; a
    CheckpointError naming the optimizer, group and name otherwise. Left out (the group keeps its
    own value): the implementation flags, ``param_names``, and None where the group has a bool. A name this torch's optimizer
    does not have (a checkpoint from a newer torch) is skipped with one warning if its value is a
    plain scalar, and refused otherwise.
    """
    saved = reader.manifest["optimizers"][name]
    if len(saved) != len(optimizer.param_groups):
        raise CheckpointError(f"checkpoint {reader.path}: optimizer {name!r} was saved with {len(saved)} param groups; "
                              f"this one has {len(optimizer.param_groups)}. Build it as it was when the checkpoint was saved.")
    applied: list[dict[str, Any]] = []
    skipped: list[str] = []
    for index, (group, stored) in enumerate(zip(optimizer.param_groups, saved)):
        kept = {}
        for key, value in stored["hyperparameters"].items():
            if key in _METADATA_KEYS:
                continue
            if _is_unknown_scalar(key, value, group):
                if key not in skipped:
                    skipped.append(key)
                continue
            problem = _hyperparameter_problem(key, value, group)
            if problem is not None:
                raise CheckpointError(f"checkpoint {reader.path}: optimizer {name!r} param group {index} hyperparameter "
                                      f"{shown(key)} {problem}.")
            if key not in _IMPLEMENTATION_FLAGS and value is not None:
                kept[key] = value
        applied.append(kept)
    if skipped:
        listed = ", ".join(shown_key(key) for key in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        warnings.warn(f"checkpoint {shown_path(reader.path)}: optimizer {name!r} was saved with hyperparameters this "
                      f"{type(optimizer).__name__} does not have ({listed}); they are ignored.", stacklevel=4)
    return applied


def _is_unknown_scalar(key: str, value: Any, group: dict[str, Any]) -> bool:
    """A name the group lacks (saved by another torch version) whose value is a plain scalar: skipped, not refused."""
    if key in ("params", _GROUP_STEP) or key in group or key in _SCHEDULER_KEYS:
        return False
    return is_plain_scalar(value)


def _hyperparameter_problem(key: str, value: Any, group: dict[str, Any]) -> str | None:
    """What is wrong with setting ``group[key] = value`` from a checkpoint, or None."""
    if key == "params":
        return "is the group's parameter list, which a checkpoint may not set"
    if key == _GROUP_STEP and not (key in group and torch.is_tensor(group[key])):
        return count_problem(value)  # an int, in the group or not; a tensor step is checked as the group's is
    if key not in group:
        if key in _SCHEDULER_KEYS:
            return _range_problem(key, value) if is_finite_number(value) else f"is {shown(value)}, not a finite number"
        return f"is {shown(value)}, not a plain value, and not one of this optimizer's hyperparameters"
    current = group[key]
    if value is None and (current is None or isinstance(current, bool)):
        return None  # an unset flag: the group keeps its own value
    return like_problem(value, current, "the optimizer") or _range_problem(key, value)


def _range_problem(key: str, value: Any) -> str | None:
    """What is wrong with ``value`` (of the right type) for ``key`` in the ranges torch's optimizers check, or None."""
    numbers = value if isinstance(value, (list, tuple)) else [value]
    if key in _NON_NEGATIVE and any(is_number(number) and number < 0 for number in numbers):
        return f"is {shown(value)}, below 0, which torch's optimizers refuse"
    if key in _UNIT_INTERVAL and any(is_number(number) and not 0 <= number < 1 for number in numbers):
        return f"is {shown(value)}, not in [0, 1) as torch's optimizers require"
    return None


def _set_hyperparameters(optimizer: Any, checked: list[dict[str, Any]]) -> None:
    """Sets the hyperparameters ``_checked_hyperparameters`` returned."""
    for group, stored in zip(optimizer.param_groups, checked):
        for name, value in stored.items():
            current = group.get(name)
            if torch.is_tensor(current):
                current.fill_(value)
            elif isinstance(current, tuple):
                group[name] = tuple(value)
            else:
                group[name] = value
