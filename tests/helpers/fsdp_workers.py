"""Spawn workers for meshplan.fsdp: clipping gradients that are DTensors on several meshes."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from meshplan.fsdp import clip_grad_norm


def clip_uneven_shards() -> tuple[float, float]:
    """Clips, on a 2 x 2 (dp, tp) mesh, a 1-row gradient (empty on data-parallel rank 1) beside a
    4 x 4 one split both ways, all ones; returns the norm and the largest gradient entry after."""
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("data_parallel", "tensor_parallel"))
    small = torch.nn.Parameter(distribute_tensor(torch.ones(1, 4), mesh, [Shard(0), Replicate()]))
    large = torch.nn.Parameter(distribute_tensor(torch.ones(4, 4), mesh, [Shard(0), Shard(1)]))
    small.grad = distribute_tensor(torch.ones(1, 4), mesh, [Shard(0), Replicate()])
    large.grad = distribute_tensor(torch.ones(4, 4), mesh, [Shard(0), Shard(1)])
    norm = clip_grad_norm([small, large], 1.0)
    largest = max(float(parameter.grad.full_tensor().max()) for parameter in (small, large))
    dist.destroy_process_group()
    return float(norm), largest
