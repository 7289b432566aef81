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
