"""meshplan: one parallel layout (DDP, ZeRO, tensor parallel) for Lightning, Accelerate and the HF Trainer.

Public names::

    meshplan.DDP(**options)
    meshplan.ZeRO(stage=1|2|3, offload_optimizer=False, offload_parameters=False, **options)
    meshplan.TensorParallel(tp_size=N, tp_plan=None, **options)
    meshplan.PlanError

Importing meshplan registers the strategies in Lightning's registry as meshplan_ddp,
meshplan_zero1, meshplan_zero2, meshplan_zero3, meshplan_zero3_offload and meshplan_tp.
"""

from meshplan.errors import PlanError
from meshplan.lightning import DDP, TensorParallel, ZeRO, register_strategies
from meshplan.plan import Plan

__all__ = ["DDP", "Plan", "PlanError", "TensorParallel", "ZeRO"]
__version__ = "0.1.0"

register_strategies()
