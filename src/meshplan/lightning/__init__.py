"""meshplan's Lightning strategies and the names they are registered under."""

from lightning.pytorch.strategies import StrategyRegistry

from meshplan.lightning.auto import Auto
from meshplan.lightning.ddp import DDP
from meshplan.lightning.fsdp2 import FSDP2
from meshplan.lightning.tensor_parallel import TensorParallel
from meshplan.lightning.zero import ZeRO
from meshplan.plan import Plan

__all__ = ["Auto", "DDP", "FSDP2", "TensorParallel", "ZeRO", "REGISTERED_STRATEGIES", "from_plan", "register_strategies"]

# name -> (strategy class, preset arguments, description). tp_size=None in meshplan_tp and
# meshplan_tp_fsdp means "every process of a node", the common layout of TP within a node.
REGISTERED_STRATEGIES = {
    "meshplan_ddp": (DDP, {}, "meshplan DDP: replicate the model, average gradients"),
    "meshplan_zero1": (ZeRO, {"stage": 1}, "meshplan ZeRO-1: shard optimizer state (DeepSpeed)"),
    "meshplan_zero2": (ZeRO, {"stage": 2}, "meshplan ZeRO-2: shard optimizer state and gradients (DeepSpeed)"),
    "meshplan_zero3": (ZeRO, {"stage": 3}, "meshplan ZeRO-3: shard optimizer state, gradients and parameters (DeepSpeed)"),
    "meshplan_zero3_offload": (
        ZeRO,
        {"stage": 3, "offload_optimizer": True, "offload_parameters": True},
        "meshplan ZeRO-3 with optimizer state and parameters offloaded to CPU memory (DeepSpeed)",
    ),
    "meshplan_fsdp2": (ZeRO, {"stage": 3, "engine": "fsdp2"},
                       "meshplan ZeRO-3 on torch's FSDP2: shard optimizer state, gradients and parameters (fully_shard)"),
    "meshplan_tp": (TensorParallel, {"tp_size": None}, "meshplan tensor parallel over the processes of each node (DTensor)"),
    "meshplan_tp_fsdp": (
        TensorParallel,
        {"tp_size": None, "data_parallel": "shard"},
        "meshplan tensor parallel over the processes of each node, FSDP2 sharding across nodes (DTensor x fully_shard)",
    ),
    "meshplan_auto": (Auto, {}, "meshplan chooses the layout from the model, world size and memory per process"),
}


def from_plan(plan: Plan, *, ddp: type = DDP, zero: type = ZeRO,
              tensor_parallel: type = TensorParallel) -> DDP | ZeRO | FSDP2 | TensorParallel:
    """The Lightning strategy that runs ``plan``: what ``ddp``, ``zero`` or ``tensor_parallel`` builds from it.

    The classes default to meshplan's (``ZeRO`` builds an FSDP2 strategy for engine "fsdp2");
    meshplan.ray passes its subclasses of them.
    """
    options = dict(plan.options)
    if plan.strategy == "zero":
        return zero(stage=plan.zero_stage, offload_optimizer=plan.offload_optimizer,
                    offload_parameters=plan.offload_parameters, engine=plan.engine, **options)
    if plan.strategy == "tp":
        return tensor_parallel(tp_size=plan.tp_size, tp_plan=plan.tp_plan_dict, data_parallel=plan.data_parallel,
                               **options)
    return ddp(**options)


def register_strategies() -> None:
    """Adds meshplan's names to Lightning's strategy registry (idempotent)."""
    for name, (strategy, preset, description) in REGISTERED_STRATEGIES.items():
        StrategyRegistry.register(name, strategy, description=description, override=True, **preset)


register_strategies()  # whoever imports meshplan's strategies can name them too
