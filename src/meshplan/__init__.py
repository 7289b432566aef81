"""meshplan: one parallel layout (DDP, ZeRO, tensor parallel) for Lightning, Accelerate and the HF Trainer.

Public names::

    meshplan.DDP(**options)
    meshplan.ZeRO(stage=1|2|3, offload_optimizer=False, offload_parameters=False, **options)
    meshplan.TensorParallel(tp_size=None|N, tp_plan=None, **options)
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
meshplan_zero1, meshplan_zero2, meshplan_zero3, meshplan_zero3_offload, meshplan_tp and meshplan_auto.
"""

from meshplan import testing
from meshplan.accelerate import accelerator
from meshplan.checkpoint import CheckpointError, export, latest_checkpoint
from meshplan.errors import PlanError
from meshplan.lightning import DDP, Auto, TensorParallel, ZeRO, from_plan, register_strategies
from meshplan.plan import Plan
from meshplan.planner import Estimate, LayoutChoice, estimate, plan_layout
from meshplan.recipes import read_recipe


def from_recipe(path: str) -> DDP | ZeRO | TensorParallel:
    """The strategy an Accelerate config file describes (meshplan's recipes and other valid configs).

    ``path`` is a recipe file, or the name of a recipe in the catalogue: ``"zero3"``,
    ``"zero3.yaml"`` and ``"recipes/zero3.yaml"`` all name the shipped ZeRO-3 recipe, unless a file
    of that name exists here. ``meshplan recipes`` lists the catalogue.

    Raises:
        PlanError: the recipe does not exist, cannot be read, or describes a layout meshplan cannot run.
    """
    return from_plan(read_recipe(path).plan)


__all__ = [
    "Auto", "DDP", "CheckpointError", "Estimate", "LayoutChoice", "Plan", "PlanError", "TensorParallel", "ZeRO", "accelerator",
    "estimate", "export", "from_recipe", "latest_checkpoint", "plan_layout", "testing",
]
__version__ = "0.1.0"

register_strategies()
