"""The whole TP pipeline, shared by every front end: plan every Hugging Face model, then shard.

``plan_models`` only reads the models (it runs before any process group exists, and on meta
models); ``shard_models`` moves, shards and synchronizes them on an existing device mesh.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from meshplan.errors import PlanError
from meshplan.tp.apply import apply_tp_plan, match_plan
from meshplan.tp.plans import check_tp_size, find_pretrained_models, resolve_tp_plan
from meshplan.tp.sync import broadcast_parameters, share_random_state


def plan_models(root: nn.Module, tp_size: int, user_plan: dict[str, str] | None = None) -> dict[str, dict[str, str]]:
    """``{model name in root: {module name: style}}`` for every Hugging Face model inside ``root``.

    Raises:
        PlanError: no Hugging Face model, a tp_size a model cannot take, or no usable plan.
    """
    models = find_pretrained_models(root)
    if not models:
        raise PlanError(
            f"TensorParallel found no transformers.PreTrainedModel inside {type(root).__name__}; it shards "
            f"Hugging Face models. Keep the model as an attribute of the module you train."
        )
    plans = {}
    for name, model in models:
        check_tp_size(model, tp_size)
        plans[name] = match_plan(model, resolve_tp_plan(model, user_plan))
    return plans


def sharding_mesh(module: nn.Module) -> DeviceMesh | None:
    """The mesh ``module``'s sharded (DTensor) parameters live on, or None while it is whole."""
    for parameter in module.parameters():
        if isinstance(parameter, DTensor):
            return parameter.device_mesh
    return None


def shard_models(root: nn.Module, plans: dict[str, dict[str, str]], device: torch.device, tp_mesh: DeviceMesh,
                 dp_mesh: DeviceMesh) -> None:
    """Moves ``root`` to ``device``, shards the planned models over ``tp_mesh``, makes every
    data-parallel replica start from the weights of data-parallel rank 0, and gives each TP group
    one random stream (``share_random_state``)."""
    root.to(device)  # the collectives below run on the device's backend (nccl has no CPU tensors)
    modules = dict(root.named_modules())
    for name, plan in plans.items():
        apply_tp_plan(modules[name], plan, tp_mesh)
    broadcast_parameters(root, dp_mesh)
    share_random_state(tp_mesh)
