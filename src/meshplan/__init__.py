"""meshplan: one parallel layout (DDP, ZeRO, FSDP2, tensor parallel) for Lightning, Accelerate and the HF Trainer.

Public names::

    meshplan.DDP(**options)
    meshplan.ZeRO(stage=1|2|3, offload_optimizer=False, offload_parameters=False, engine="deepspeed"|"fsdp2", **options)
    meshplan.TensorParallel(tp_size=None|N, tp_plan=None, data_parallel="replicate"|"shard", **options)
    meshplan.Auto(micro_batch_size=None, seq_len=None, ...)  # chooses one of the above when the Trainer runs
    meshplan.PlanError
    meshplan.Plan                              # the frozen layout behind every strategy: strategy.plan
    meshplan.from_recipe(recipe)               # an Accelerate config file, or a catalogue name ("zero3") -> strategy
    meshplan.accelerator(strategy_or_recipe)   # -> accelerate.Accelerator
    meshplan.export(checkpoint, out_dir)       # a checkpoint holding a transformers model -> a Hugging Face model directory
    meshplan.latest_checkpoint(folder)         # the newest complete checkpoint, to resume after a crash
    meshplan.CheckpointError
    meshplan.estimate(model, layout, *, world_size, ...)       # -> meshplan.Estimate: bytes per rank by component
    meshplan.plan_layout(model, *, devices_per_node, device_memory, ...)  # -> meshplan.LayoutChoice
    meshplan.testing.spawn(fn, nprocs)         # run fn in N worker processes, with a hard timeout
    strategy.to_recipe(path), strategy.training_arguments()

Importing meshplan registers the strategies in Lightning's registry as meshplan_ddp,
meshplan_zero1, meshplan_zero2, meshplan_zero3, meshplan_zero3_offload, meshplan_fsdp2, meshplan_tp,
meshplan_tp_fsdp and meshplan_auto
(at once where Lightning is imported, else the moment it is). The public names load on first use.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

from meshplan._lazy import lazy_names
from meshplan.errors import PlanError

if TYPE_CHECKING:
    from meshplan.lightning import DDP, TensorParallel, ZeRO

# Where each public name lives. They load on first use, so that `import meshplan` (and every
# `meshplan` command, and every Accelerate or HF Trainer worker) does not pay for Lightning,
# DeepSpeed and the planner it does not use: Lightning alone takes about 5 s to import.
_PUBLIC_NAMES = {
    "DDP": "meshplan.lightning", "ZeRO": "meshplan.lightning", "TensorParallel": "meshplan.lightning",
    "Auto": "meshplan.lightning", "from_plan": "meshplan.lightning", "register_strategies": "meshplan.lightning",
    "accelerator": "meshplan.accelerate",
    "CheckpointError": "meshplan.errors", "export": "meshplan.checkpoint", "latest_checkpoint": "meshplan.checkpoint",
    "Plan": "meshplan.plan", "read_recipe": "meshplan.recipes",
    "Estimate": "meshplan.planner", "LayoutChoice": "meshplan.planner", "estimate": "meshplan.planner",
    "plan_layout": "meshplan.planner",
}


__getattr__, __dir__ = lazy_names(__name__, _PUBLIC_NAMES)


def from_recipe(path: str) -> DDP | ZeRO | TensorParallel:
    """The strategy an Accelerate config file describes (meshplan's recipes and other valid configs).

    ``path`` is a recipe file, or the name of a recipe in the catalogue: ``"zero3"``,
    ``"zero3.yaml"`` and ``"recipes/zero3.yaml"`` all name the shipped ZeRO-3 recipe, unless a file
    of that name exists here. ``meshplan recipes`` lists the catalogue.

    Raises:
        PlanError: the recipe does not exist, cannot be read, or describes a layout meshplan cannot run.
    """
    from meshplan.lightning import from_plan
    from meshplan.recipes import read_recipe

    return from_plan(read_recipe(path).plan)


class _RegisterWithLightning(importlib.abc.MetaPathFinder):
    """Registers meshplan's strategies once ``lightning.pytorch`` has been imported, whenever that happens.

    A Lightning user names a strategy (``Trainer(strategy="meshplan_zero3")``) only after importing
    Lightning, so registering then keeps the promise of ``import meshplan`` without importing
    Lightning in processes that never use it. The finder stands aside for every other module.
    """

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "lightning.pytorch":
            return None
        sys.meta_path.remove(self)  # once; the other finders find the real module
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            execute = spec.loader.exec_module

            def execute_then_register(module: Any) -> None:
                execute(module)
                if "meshplan.lightning" not in sys.modules:  # else it is loading, and registers as it finishes
                    importlib.import_module("meshplan.lightning")

            spec.loader.exec_module = execute_then_register
        return spec


def _register_strategies_with_lightning() -> None:
    if "lightning.pytorch" in sys.modules:
        importlib.import_module("meshplan.lightning")  # registers the strategies
    elif not any(isinstance(finder, _RegisterWithLightning) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterWithLightning())


__all__ = [
    "Auto", "DDP", "CheckpointError", "Estimate", "LayoutChoice", "Plan", "PlanError", "TensorParallel", "ZeRO", "accelerator",
    "estimate", "export", "from_recipe", "latest_checkpoint", "plan_layout", "testing",
]
__version__ = "0.1.0"

_register_strategies_with_lightning()
