"""Keep the data-parallel replicas of a tensor-parallel model in step.

Each parameter is either a DTensor sharded over the TP mesh or a plain tensor replicated on
it; either way its local part is what a data-parallel peer holds too, so the data-parallel
dimension only ever sees local tensors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def share_random_state(tp_mesh: DeviceMesh) -> None:
    """Gives every rank of this tensor-parallel group its first rank's torch random generators. Collective.

    The ranks of a TP group compute the same replicated activations, and dropout on them (a LoRA
    adapter's input, a model's hidden dropout) must draw the same masks on each, or the replicated
    parameters those activations reach get other gradients on each rank and drift apart: one
    random stream per TP group, as Megatron-LM keeps for its replicated regions. Called once the
    model is sharded, and after a checkpoint put back each rank's own generators (one written by
    other ranks, or fewer, may hold none or others for some of them).
    """
    if tp_mesh.size() == 1:
        return
    group = tp_mesh.get_group()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    states = [torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None]
    dist.broadcast_object_list(states, src=dist.get_global_rank(group, 0), group=group)
    torch.set_rng_state(states[0])
    if cuda and states[1] is not None:
        torch.cuda.set_rng_state(states[1])


def share_random_state_over(mesh: DeviceMesh | None, dimension: str) -> None:
    """``share_random_state`` over the ``dimension`` of ``mesh``, when there is a mesh with that dimension (a
    layout with tensor parallelism); nothing otherwise. Collective where it acts."""
    if mesh is not None and dimension in (mesh.mesh_dim_names or ()):
        share_random_state(mesh[dimension])


@torch.no_grad()
def broadcast_parameters(module: nn.Module, dp_mesh: DeviceMesh) -> None:
    """Copies the parameters and buffers of data-parallel rank 0 to the other replicas."""
    if dp_mesh.size() == 1:
        return
    group = dp_mesh.get_group()
    source = dist.get_global_rank(group, 0)
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(_local(tensor.data), src=source, group=group)


@torch.no_grad()
def average_gradients(module: nn.Module, dp_mesh: DeviceMesh) -> None:
    """Averages the gradients of ``module`` over the data-parallel mesh, one flat all-reduce per dtype."""
    average_tensors([_local(parameter.grad) for parameter in module.parameters() if parameter.grad is not None], dp_mesh)


@torch.no_grad()
def average_tensors(tensors: list[torch.Tensor], mesh: DeviceMesh) -> None:
    """Replaces each of ``tensors`` (plain tensors) by its mean over ``mesh``, one flat all-reduce per dtype and device."""
    if mesh.size() == 1:
        return
    buckets: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for tensor in tensors:
        buckets.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for bucket in buckets.values():
        flat = torch.cat([tensor.reshape(-1) for tensor in bucket])
        dist.all_reduce(flat, group=mesh.get_group())
        flat /= mesh.size()
        offset = 0
        for tensor in bucket:
            tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()
