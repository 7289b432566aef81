"""Apply a TP plan (module pattern -> style) to a module on a DeviceMesh with torch DTensor.

The style names are those of transformers' ``base_model_tp_plan``; each maps to one of torch's
own ParallelStyles, so the sharding and the collectives are torch's.
"""

from __future__ import annotations

import re
from typing import Callable

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from meshplan.errors import PlanError

# Style name -> factory of the torch ParallelStyle that realizes it. "replicate" leaves the
# module whole on every rank. Megatron's pair is colwise (output stays sharded, the next layer
# consumes the shard) followed by rowwise (partial sums are all-reduced).
STYLES: dict[str, Callable[[], ParallelStyle | None]] = {
    "colwise": lambda: ColwiseParallel(),
    "rowwise": lambda: RowwiseParallel(),
    "colwise_gather_output": lambda: ColwiseParallel(output_layouts=Replicate()),
    "colwise_rep": lambda: ColwiseParallel(output_layouts=Replicate()),
    "rowwise_rep": lambda: RowwiseParallel(input_layouts=Replicate()),
    "rowwise_split_input": lambda: RowwiseParallel(input_layouts=Replicate()),
    "embedding_rowwise": lambda: RowwiseParallel(input_layouts=Replicate()),
    "replicate": lambda: None,
}


def pattern_to_regex(pattern: str) -> re.Pattern[str]:
    """Compiles a plan pattern: ``*`` stands for exactly one dotted name component."""
    parts = (r"[^.]+" if part == "*" else re.escape(part) for part in pattern.split("."))
    return re.compile(r"\.".join(parts) + r"\Z")


def match_plan(module: nn.Module, tp_plan: dict[str, str]) -> dict[str, str]:
    """Expands ``tp_plan`` into ``{module name: style}`` for the submodules of ``module``.

    Raises:
        PlanError: a pattern matches no submodule, or names a style meshplan cannot apply.
    """
    names = [name for name, _ in module.named_modules() if name]
    resolved: dict[str, str] = {}
    for pattern, style in tp_plan.items():
        if style not in STYLES:
            raise PlanError(
                f"tp_plan[{pattern!r}]={style!r}: meshplan cannot apply this style to "
                f"{type(module).__name__}; valid styles are {', '.join(STYLES)}."
            )
        regex = pattern_to_regex(pattern)
        matches = [name for name in names if regex.match(name)]
        if not matches:
            raise PlanError(f"tp_plan pattern {pattern!r} matches no submodule of {type(module).__name__}.")
        resolved.update(dict.fromkeys(matches, style))
    return resolved


def apply_tp_plan(module: nn.Module, tp_plan: dict[str, str], tp_mesh: DeviceMesh) -> dict[str, str]:
    """Shards the submodules of ``module`` named by ``tp_plan`` over the 1-D ``tp_mesh``.

    Parameters of sharded layers become DTensors; the layers' inputs and outputs stay plain
    tensors, so model code that reshapes with ``-1`` heads runs unchanged on each shard.
    Returns the ``{module name: style}`` that was applied.
    """
    resolved = match_plan(module, tp_plan)
    styles = {name: STYLES[style]() for name, style in resolved.items()}
    parallelize_module(module, tp_mesh, {name: style for name, style in styles.items() if style is not None})
    return resolved
