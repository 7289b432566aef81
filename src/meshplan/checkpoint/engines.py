"""Whole tensors out of, and back into, every engine's layout: plain (DDP), ZeRO 1/2/3, DTensor (TP,
FSDP2, TP x FSDP2).

Saving gathers one whole tensor at a time (a collective for ZeRO and DTensor: every rank takes
part, in the same order). Loading takes from each whole tensor only the part this rank keeps,
with no collective at all: DTensor shards are read as slices, ZeRO partitions are cut out.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
from accelerate.optimizer import AcceleratedOptimizer
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from meshplan._compat import deepspeed as deepspeed_compat
from meshplan._compat.deepspeed import full_shape, has_fp32_master, is_zero3_parameter, is_zero_optimizer
from meshplan._compat.torch import local_indices
from meshplan.checkpoint.state_checks import count_problem, is_count
from meshplan.errors import CheckpointError, shown, shown_key
from meshplan.peft import checkpointed


@dataclass
class Entry:
    """One tensor of a checkpoint: its name, its whole shape and dtype, and how to gather it."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]
    collective: bool  # every rank must call ``read``, in the same order


# ---------------------------------------------------------------- engines' own objects


def innermost_optimizer(optimizer: Any) -> Any:
    """The optimizer that holds the state, through Lightning's and Accelerate's wrappers (each public
    ``optimizer``; Accelerate's DeepSpeedOptimizerWrapper is an AcceleratedOptimizer).

    A ZeRO optimizer is where this stops: the torch optimizer inside it only sees flat partitions.
    """
    while not is_zero_optimizer(optimizer) and isinstance(optimizer, _optimizer_wrappers()):
        optimizer = optimizer.optimizer
    return optimizer


def _optimizer_wrappers() -> tuple[type, ...]:
    """Accelerate's optimizer wrapper, and Lightning's where Lightning is imported (else none can exist).

    Looked up here rather than imported: importing Lightning takes seconds that Accelerate and HF
    Trainer processes have no use for.
    """
    lightning_optimizer = sys.modules.get("lightning.pytorch.core.optimizer")
    if lightning_optimizer is None:
        return (AcceleratedOptimizer,)
    return AcceleratedOptimizer, lightning_optimizer.LightningOptimizer


# ---------------------------------------------------------------- model tensors


def reshard_fully_sharded(models: dict[str, nn.Module]) -> None:
    """Frees the whole parameters FSDP2 still holds in ``models`` (after a forward pass without a backward,
    or under ZeRO stage 2's ``reshard_after_forward=False``), so that the module's parameters are its
    sharded DTensors: what a checkpoint gathers from and loads into. Local, no collective."""
    for module in models.values():
        for inner in module.modules():
            if isinstance(inner, FSDPModule):
                inner.reshard()


def model_entries(prefix: str, module: nn.Module) -> tuple[list[Entry], dict[str, str], dict[int, str]]:
    """The entries of ``module``'s state dict under ``prefix``, the aliases of tied tensors
    (alias key -> stored key), and the stored key of each tensor by ``id``.

    A module with peft adapters contributes only the tensors that train (meshplan.peft.checkpointed).
    """
    entries: list[Entry] = []
    aliases: dict[str, str] = {}
    keys: dict[int, str] = {}
    for name, tensor in checkpointed(module).items():
        key = f"{prefix}/{name}"
        if id(tensor) in keys:
            aliases[key] = keys[id(tensor)]
            continue
        keys[id(tensor)] = key
        entries.append(_model_entry(key, tensor))
    return entries, aliases, keys


def _model_entry(key: str, tensor: torch.Tensor) -> Entry:
    if tensor.requires_grad and has_fp32_master(tensor):  # the fp32 master copy: what training continues from
        import deepspeed

        return Entry(key, full_shape(tensor), torch.float32, lambda: deepspeed.utils.safe_get_full_fp32_param(tensor), True)
    if is_zero3_parameter(tensor):
        return Entry(key, full_shape(tensor), tensor.dtype, lambda: _gathered(tensor), True)
    if isinstance(tensor, DTensor):
        return Entry(key, tuple(tensor.shape), tensor.dtype, lambda: tensor.full_tensor(), True)
    return Entry(key, tuple(tensor.shape), tensor.dtype, lambda: tensor.detach(), False)


def _gathered(parameter: torch.Tensor) -> torch.Tensor:
    import deepspeed

    with deepspeed.zero.GatheredParameters([parameter]):
        return parameter.data.detach().cpu().clone()


def load_model_tensor(tensor: torch.Tensor, reader: Any, key: str) -> None:
    """Puts the stored tensor ``key`` into ``tensor``, keeping only this rank's part of it."""
    with torch.no_grad():
        if isinstance(tensor, DTensor):
            tensor.to_local().copy_(local_slice(reader, key, tensor))
            return
        full = reader.tensor(key)
        if is_zero3_parameter(tensor):
            deepspeed_compat.set_zero3_partition(tensor, full)
        else:
            tensor.data.copy_(full.to(tensor.dtype))
        if tensor.requires_grad and has_fp32_master(tensor):
            _set_zero_master(tensor, full)


def _as_master(parameter: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """A whole tensor as ZeRO 1/2's setters take it: fp32, on the master copy's device."""
    return full.float().to(parameter.device)


def _set_zero_master(parameter: torch.Tensor, full: torch.Tensor, state_name: str | None = None) -> None:
    """Sets this rank's part of a parameter's fp32 master copy (``state_name`` None) or optimizer state.

    ZeRO-3's own full setter cuts the partition from the whole tensor unpadded, and fails on the
    last rank when the process count does not divide the parameter's size; the partition is cut
    here as DeepSpeed cuts parameters (the last one zero-padded) and set with the local setter.
    """
    import deepspeed

    if not is_zero3_parameter(parameter):
        if state_name is None:
            deepspeed.utils.safe_set_full_fp32_param(parameter, _as_master(parameter, full))
        else:
            deepspeed.utils.safe_set_full_optimizer_state(parameter, _as_master(parameter, full), state_name)
        return
    local = deepspeed_compat.zero3_local_part(parameter, full.float())
    if state_name is None:
        deepspeed.utils.safe_set_local_fp32_param(parameter, local)
    else:
        deepspeed.utils.safe_set_local_optimizer_state(parameter, local, state_name)


def local_slice(reader: Any, key: str, tensor: DTensor) -> torch.Tensor:
    """The part of stored tensor ``key`` that this rank holds of ``tensor``'s layout.

    Each dimension's part is read as one slice when it is a block of the whole tensor (TP, FSDP2 and
    TP x FSDP2 shards are), else as the block around it, picked from in the shard's order.

    Raises:
        CheckpointError: ``layout_problem(tensor)`` is not None (checked for every model tensor
            before anything is loaded: this is the last guard).
    """
    indices = local_indices(tensor)
    problem = _indices_problem(tensor, indices)
    if problem is not None:
        raise CheckpointError(f"cannot load {shown_key(key)}: {problem}.")
    if any(len(index) == 0 for index in indices):
        return torch.empty(tuple(len(index) for index in indices), dtype=reader.dtype(key))
    blocks = tuple(slice(int(index.min()), int(index.max()) + 1) for index in indices)
    part = reader.slice(key, blocks)
    for dimension, (index, block) in enumerate(zip(indices, blocks)):
        if not torch.equal(index, torch.arange(block.start, block.stop)):
            part = part.index_select(dimension, index - block.start)
    return part


def layout_problem(tensor: torch.Tensor) -> str | None:
    """Why this rank cannot take its part of a whole tensor for ``tensor``, or None (always None for a
    tensor that is not a DTensor). Local, no collective.

    meshplan cuts DTensor shards by their placements: Replicate, Shard and the strided shards FSDP2
    makes of TP's. A Partial placement (a sum still to be reduced) has no part of the whole tensor to
    take, and a shard whose shape is not what its placements give would be filled with wrong values.
    """
    if not isinstance(tensor, DTensor):
        return None
    return _indices_problem(tensor, local_indices(tensor))


def _indices_problem(tensor: DTensor, indices: list[torch.Tensor] | None) -> str | None:
    """``layout_problem`` of ``tensor``, given its ``local_indices``."""
    local_shape = tuple(tensor.to_local().shape)
    if indices is not None and tuple(len(index) for index in indices) == local_shape:
        return None
    return (f"a DTensor placed {shown(tensor.placements)} on a mesh of shape {shown(tuple(tensor.device_mesh.shape))} "
            f"(this rank's shard {list(local_shape)}) is not a layout meshplan can load: it loads shards placed "
            f"Replicate or Shard (FSDP2's and TP's), whose shape is what their placements say")


# ---------------------------------------------------------------- optimizer state


def optimizer_entries(prefix: str, optimizer: Any, keys: dict[int, str]) -> list[Entry]:
    """Entries ``{prefix}/{parameter key}/{state name}`` for every parameter's optimizer state."""
    if is_zero_optimizer(optimizer):
        return _zero_optimizer_entries(prefix, optimizer, keys)
    entries = []
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            for name, value in sorted(optimizer.state.get(parameter, {}).items()):
                value = value if torch.is_tensor(value) else torch.tensor(value)
                key = f"{prefix}/{keys[id(parameter)]}/{name}"
                if isinstance(value, DTensor):
                    entries.append(Entry(key, tuple(value.shape), value.dtype, value.full_tensor, True))
                else:
                    entries.append(Entry(key, tuple(value.shape), value.dtype, value.detach, False))
    return entries


def _zero_optimizer_entries(prefix: str, optimizer: Any, keys: dict[int, str]) -> list[Entry]:
    import deepspeed

    entries = []
    flat_state = deepspeed_compat.zero_flat_state(optimizer)
    groups, partitions = deepspeed_compat.zero_partition_groups(optimizer), deepspeed_compat.zero_flat_partitions(optimizer)
    for parameters, flat in zip(groups, partitions):
        state = flat_state.get(flat, {})
        for parameter in parameters:
            shape = full_shape(parameter)
            for name, value in sorted(state.items()):
                key = f"{prefix}/{keys[id(parameter)]}/{name}"
                if torch.is_tensor(value) and value.dim() > 0:  # partitioned like the parameter
                    read = functools.partial(deepspeed.utils.safe_get_full_optimizer_state, parameter, name)
                    entries.append(Entry(key, shape, value.dtype, read, True))
                else:  # a per-group scalar such as Adam's step
                    scalar = value.detach() if torch.is_tensor(value) else torch.tensor(value)
                    entries.append(Entry(key, tuple(scalar.shape), scalar.dtype, lambda scalar=scalar: scalar, False))
    return entries


def is_unstored_frozen(parameter: torch.Tensor, keys: dict[int, str]) -> bool:
    """Whether ``parameter`` is a frozen base weight of a peft model, which a checkpoint does not store: a torch
    optimizer may still list it, but it never has optimizer state (it has no gradient)."""
    return id(parameter) not in keys and not parameter.requires_grad


def load_optimizer_state(optimizer: Any, keys: dict[int, str], prefix: str, reader: Any) -> None:
    """Sets every parameter's optimizer state from the stored tensors ``{prefix}/{key}/{name}``."""
    if is_zero_optimizer(optimizer):
        _load_zero_optimizer_state(optimizer, keys, prefix, reader)
        return
    for group in optimizer.param_groups:
        on_device = bool(group.get("capturable") or group.get("fused"))
        for parameter in group["params"]:
            if is_unstored_frozen(parameter, keys):
                continue
            stored = reader.states_of(f"{prefix}/{keys[id(parameter)]}")
            if stored:
                optimizer.state[parameter] = {name: _state_like(parameter, reader, key, on_device)
                                              for name, key in stored.items()}


def _state_like(parameter: torch.Tensor, reader: Any, key: str, scalars_on_device: bool) -> torch.Tensor:
    """A stored state tensor as torch's optimizers keep it: shaped like ``parameter`` (its
    dtype, device and, for a DTensor, its shard), smaller than it (Adafactor's row and column
    statistics: its stored dtype, the parameter's device), or a scalar such as Adam's step (on
    the CPU unless the optimizer is capturable or fused)."""
    shape = reader.shape(key)
    if shape == tuple(parameter.shape) and len(parameter.shape) > 0:
        if isinstance(parameter, DTensor):
            local = local_slice(reader, key, parameter).to(parameter.to_local().device, parameter.dtype)
            return DTensor.from_local(local, parameter.device_mesh, parameter.placements, run_check=False,
                                      shape=parameter.shape, stride=parameter.stride())
        return reader.tensor(key).to(parameter.device, parameter.dtype)
    scalar = reader.tensor(key)
    if len(shape) > 0:  # only a plain parameter's state may be smaller than it (sharded._state_problem)
        return scalar.to(parameter.device)
    if scalars_on_device:
        device = parameter.to_local().device if isinstance(parameter, DTensor) else parameter.device
        return scalar.to(device)
    return scalar


def _load_zero_optimizer_state(optimizer: Any, keys: dict[int, str], prefix: str, reader: Any) -> None:
    flat_state = deepspeed_compat.zero_flat_state(optimizer)
    groups = deepspeed_compat.zero_partition_groups(optimizer)
    created = False
    for parameters, flat in zip(groups, deepspeed_compat.zero_flat_partitions(optimizer)):
        stored = {parameter: reader.states_of(f"{prefix}/{keys[id(parameter)]}") for parameter in parameters}
        names = next((names for names in stored.values() if names), None)
        if names is None:
            continue
        state = flat_state.setdefault(flat, {})
        for name, key in names.items():
            if len(reader.shape(key)) > 0:
                if name not in state:
                    state[name] = torch.zeros_like(flat)
                    created = True
            else:
                state[name] = reader.tensor(key)
    if created:
        # ZeRO 1/2 points each parameter at its fragment of the flat state after the first step;
        # the state made here must be linked the same way.
        deepspeed_compat.link_zero12_optimizer_state(optimizer)
    for parameters in groups:
        for parameter in parameters:
            for name, key in reader.states_of(f"{prefix}/{keys[id(parameter)]}").items():
                if len(reader.shape(key)) > 0:
                    _set_zero_master(parameter, reader.tensor(key), name)


# ---------------------------------------------------------------- DeepSpeed's own counters

_DEEPSPEED_COUNTERS = deepspeed_compat.ENGINE_COUNTERS


def deepspeed_counters(engine: Any) -> dict[str, int]:
    """The step counters of a DeepSpeed engine, saved with the checkpoint."""
    return deepspeed_compat.engine_counters(engine)


def deepspeed_counters_problem(saved: Any) -> str | None:
    """What is wrong with ``saved`` (from a checkpoint) for ``restore_deepspeed_counters``, or None.

    None (a checkpoint of another layout) or exactly the counters, each a non-negative integer:
    each name becomes an attribute of the engine, so no other name may come from a checkpoint.
    """
    if saved is None:
        return None
    if not isinstance(saved, dict) or set(saved) != set(_DEEPSPEED_COUNTERS):
        return f"is {shown(saved)}, not a dict of {', '.join(_DEEPSPEED_COUNTERS)}"
    for name in _DEEPSPEED_COUNTERS:
        if not is_count(saved[name]):
            return f"[{name!r}] {count_problem(saved[name])}"
    return None


def restore_deepspeed_counters(engine: Any, saved: dict[str, int] | None, steps: int) -> None:
    """Sets the engine's counters: the saved ones, or (a checkpoint of another layout) those of ``steps`` steps.

    ``saved`` must have passed ``deepspeed_counters_problem``.
    """
    counters = saved or {"global_steps": steps, "global_samples": steps * engine.train_batch_size(),
                         "micro_steps": steps * engine.gradient_accumulation_steps(), "skipped_steps": 0}
    deepspeed_compat.set_engine_counters(engine, counters)
