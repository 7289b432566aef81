"""FSDP2 for meshplan's layouts: which modules torch's ``fully_shard`` shards, and doing it.

Shared by every front end. ZeRO(engine="fsdp2") shards each Hugging Face model over all processes;
TensorParallel(data_parallel="shard") shards the TP-sharded model once more over the data-parallel
dimension of its (data_parallel, tensor_parallel) mesh, after TP, in the order torchtitan uses.

The sharding units are the model's transformer blocks, found without user code: the classes
transformers lists in the model's ``_no_split_modules`` (the blocks it never splits across
devices), else the repeated entries of its ``nn.ModuleList`` s. Each unit is gathered just
before it runs and freed after, so at most one block is whole at a time; the model itself is the
last unit, holding what is left (embeddings, final norm, head).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from meshplan.errors import PlanError
from meshplan.plan import Plan
from meshplan.tp.apply import listed
from meshplan.tp.plans import find_pretrained_models
from meshplan.tp.sync import average_tensors, broadcast_parameters


def layer_classes(model: nn.Module, requested: str | None = None) -> set[str]:
    """The class names of ``model``'s sharding units.

    ``requested`` is the ``fsdp_layer_classes`` option (comma-separated names, Accelerate's
    ``fsdp_transformer_layer_cls_to_wrap``); without it, the model's ``_no_split_modules``.

    Raises:
        PlanError: a requested class is not a class of any submodule of ``model``.
    """
    present = {type(module).__name__ for module in model.modules()}
    if requested is not None:
        names = {name.strip() for name in requested.split(",") if name.strip()}
        missing = sorted(names - present)
        if missing or not names:
            raise PlanError(
                f"fsdp_layer_classes={requested!r} names {listed(missing) or 'no class'}, which {type(model).__name__} "
                f"does not contain; name the classes of its transformer blocks (its submodules' classes include "
                f"{listed(sorted(present))}), or leave the option out to shard the blocks meshplan finds."
            )
        return names
    return {name for name in getattr(model, "_no_split_modules", None) or () if name in present}


def sharding_units(model: nn.Module, requested: str | None = None) -> list[nn.Module]:
    """The submodules of ``model`` that FSDP2 shards one by one, outermost first.

    A unit whose parameters are shared with a module outside it (a tied weight) is left to the
    model's own unit: FSDP2 cannot shard one parameter in two units.
    """
    classes = layer_classes(model, requested)
    if classes:
        candidates = [module for name, module in model.named_modules() if name and type(module).__name__ in classes]
    else:
        candidates = _repeated_blocks(model)
    units: list[nn.Module] = []
    inside_units: set[int] = set()
    for unit in candidates:
        if id(unit) in inside_units:
            continue  # a unit inside another unit (a nested block class) stays with the outer one
        if _shares_parameters_outside(model, unit):
            continue
        units.append(unit)
        inside_units.update(id(inner) for inner in unit.modules())
    return units


def _repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The entries of every ``nn.ModuleList`` of two or more modules of one class (a stack of blocks)."""
    blocks = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(entry) for entry in module}) == 1:
            blocks.extend(entry for entry in module if any(True for _ in entry.parameters()))
    return blocks


def _shares_parameters_outside(model: nn.Module, unit: nn.Module) -> bool:
    inside = {id(parameter) for parameter in unit.parameters()}
    unit_modules = {id(module) for module in unit.modules()}
    for module in model.modules():
        if id(module) in unit_modules:
            continue
        if any(id(parameter) in inside for parameter in module.parameters(recurse=False)):
            return True
    return False


def fsdp2_models(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name in root, model)`` for the models FSDP2 shards inside ``root``: its Hugging Face models.

    Raises:
        PlanError: ``root`` holds no Hugging Face model.
    """
    models = find_pretrained_models(root)
    if not models:
        raise PlanError(
            f"FSDP2 found no transformers.PreTrainedModel inside {type(root).__name__}; meshplan shards the Hugging "
            f"Face models a module holds, block by block. Keep the model as an attribute of the module you train, "
            f"or use ZeRO(engine='deepspeed'), which shards any module."
        )
    return models


def check_fsdp2_model(root: nn.Module, plan: Plan) -> None:
    """Checks, before any process group exists, that FSDP2 can shard the models in ``root`` under ``plan``.

    Raises:
        PlanError: no Hugging Face model, or ``fsdp_layer_classes`` names a class a model lacks.
    """
    for _, model in fsdp2_models(root):
        layer_classes(model, plan.option("fsdp_layer_classes"))


def fully_shard_models(root: nn.Module, plan: Plan, mesh: DeviceMesh) -> None:
    """Shards every Hugging Face model inside ``root`` with FSDP2 over the 1-D ``mesh``.

    Each sharding unit first, then the model itself (its root unit, which gathers what the units
    leave out). Parameters of ``root`` outside its models stay whole on every process; their
    gradients must be averaged over ``mesh`` (``average_plain_gradients``).
    """
    for _, model in fsdp2_models(root):
        for unit in sharding_units(model, plan.option("fsdp_layer_classes")):
            fully_shard(unit, mesh=mesh, reshard_after_forward=plan.reshard_after_forward)
        # The root unit's parameters are used first in the forward and last in the backward; torch
        # keeps a root gathered after the forward when reshard_after_forward is None (its default
        # for the root), which only saves the re-gather of the embeddings and head.
        fully_shard(model, mesh=mesh, reshard_after_forward=plan.reshard_after_forward)


def fully_shard_whole_models(root: nn.Module, plan: Plan, device: torch.device, mesh: DeviceMesh) -> None:
    """Moves ``root`` to ``device``, makes every process start from the weights of ``mesh``'s first rank,
    then shards its models (``fully_shard_models``): ZeRO on FSDP2, where no TP sharding came first.

    fully_shard keeps each process's own slice of its own copy of a weight, so copies that differ
    (a model built with another seed on each rank) would be mixed into one model.
    """
    root.to(device)  # the collectives below run on the device's backend (nccl has no CPU tensors)
    broadcast_parameters(root, mesh)
    fully_shard_models(root, plan, mesh)


def is_fully_sharded(module: nn.Module) -> bool:
    """True when FSDP2 has sharded ``module`` or a module inside it."""
    return any(isinstance(inner, FSDPModule) for inner in module.modules())


@torch.no_grad()
def average_plain_gradients(parameters: Iterable[nn.Parameter], mesh: DeviceMesh) -> None:
    """Averages over ``mesh`` the gradients of the parameters that are not DTensors.

    FSDP2 reduces the gradients of what it shards; a parameter it does not hold (one outside the
    Hugging Face models) is a whole copy on each process, as under DDP, and is averaged here.
    """
    average_tensors([parameter.grad for parameter in parameters
                     if parameter.grad is not None and not isinstance(parameter.grad, DTensor)], mesh)


@torch.no_grad()
def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Clips the gradients to a total ``norm_type``-norm of ``max_norm``; returns the norm before clipping.

    The norm is that of the whole model: each gradient's local part is counted once, summed over
    the mesh dimensions it is sharded along. Gradients may be plain tensors (the same on every
    process) or DTensors on different meshes (FSDP2's 1-D one, TP x FSDP2's 2-D one), which
    ``torch.nn.utils.clip_grad_norm_`` cannot mix.
    """
    grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
    norm_type = float(norm_type)
    if not grads:
        return torch.tensor(0.0)
    if norm_type not in (2.0, math.inf):
        raise ValueError(f"clip_grad_norm supports the 2-norm and the inf-norm under FSDP2, not norm_type={norm_type}.")
    device = _local(grads[0]).device
    # One partial result per (mesh, sharded dimensions): a collective per group, not per gradient.
    parts: dict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, DeviceMesh | None]] = {}
    for grad in grads:
        local = _local(grad).detach().float().to(device)
        # FSDP2 leaves the last ranks' shards of a small tensor empty (5 rows over 4 ranks: 2, 2, 1, 0);
        # they still add their (zero) part, so that every rank joins the same all-reduces in one order.
        if local.numel() == 0:
            part = torch.zeros((), device=device)
        else:
            part = local.abs().max() if norm_type == math.inf else local.pow(2).sum()
        mesh, dimensions = _sharded_dimensions(grad)
        key = (id(mesh), dimensions)
        if key in parts:
            earlier = parts[key][0]
            part = torch.maximum(earlier, part) if norm_type == math.inf else earlier + part
        parts[key] = (part, mesh)
    operation = dist.ReduceOp.MAX if norm_type == math.inf else dist.ReduceOp.SUM
    total = torch.zeros((), device=device, dtype=torch.float32)
    for (_, dimensions), (part, mesh) in parts.items():
        for dimension in dimensions:
            dist.all_reduce(part, op=operation, group=mesh.get_group(dimension))
        total = torch.maximum(total, part) if norm_type == math.inf else total + part
    norm = total if norm_type == math.inf else total.sqrt()
    coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for grad in grads:
        _local(grad).mul_(coefficient.to(_local(grad).device, _local(grad).dtype))
    return norm


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _sharded_dimensions(grad: torch.Tensor) -> tuple[DeviceMesh | None, tuple[int, ...]]:
    """The mesh of ``grad`` and the dimensions of it that ``grad`` is split along (none for a plain tensor)."""
    if not isinstance(grad, DTensor):
        return None, ()
    # Not isinstance(placement, Shard): FSDP2 splits a TP-sharded dimension again with torch's private
    # strided placement, which in torch 2.13 is no Shard. Whatever neither replicates nor holds
    # partial sums is split along that mesh dimension.
    return grad.device_mesh, tuple(dimension for dimension, placement in enumerate(grad.placements)
                                   if not (placement.is_replicate() or placement.is_partial()))
