"""Apply a TP plan (module pattern -> style) to a module on a DeviceMesh with torch DTensor.

The style names are the Plan's vocabulary (``meshplan.plan.TP_STYLES``, those of transformers'
``base_model_tp_plan``); each maps to one of torch's own ParallelStyles, so the sharding and the
collectives are torch's.
"""

from __future__ import annotations

import re
from typing import Callable

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from meshplan.errors import PlanError
from meshplan.peft import is_adapter_layer, tp_plan_for_lora_layer
from meshplan.plan import TP_STYLES

# Each style of the Plan's vocabulary (TP_STYLES) -> factory of the torch ParallelStyle that
# realizes it; None for "replicate", which leaves the module whole on every rank.
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

# The module classes torch's ColwiseParallel and RowwiseParallel can shard.
SHARDABLE = (nn.Linear, nn.Embedding)


def pattern_to_regex(pattern: str) -> re.Pattern[str]:
    """Compiles a plan pattern: ``*`` stands for exactly one dotted name component."""
    parts = (r"[^.]+" if part == "*" else re.escape(part) for part in pattern.split("."))
    return re.compile(r"\.".join(parts) + r"\Z")


def match_plan(module: nn.Module, tp_plan: dict[str, str]) -> dict[str, str]:
    """Expands ``tp_plan`` into ``{module name: style}`` for the submodules of ``module``.

    Raises:
        PlanError: a pattern matches no submodule, names a style meshplan cannot apply, or would
            shard a module that is not an ``nn.Linear`` or ``nn.Embedding``.

    A peft LoRA layer the plan names is expanded into its base layer and its adapter's two linear
    layers (meshplan.peft.tp_plan_for_lora_layer), so a model's own plan holds once it has adapters.
    """
    modules = {name: submodule for name, submodule in module.named_modules() if name}
    resolved: dict[str, str] = {}
    for pattern, style in tp_plan.items():
        if style not in TP_STYLES:
            raise PlanError(
                f"tp_plan[{pattern!r}]={style!r}: meshplan cannot apply this style to "
                f"{type(module).__name__}; valid styles are {', '.join(TP_STYLES)}."
            )
        regex = pattern_to_regex(pattern)
        matches = [name for name in modules if regex.match(name)]
        if not matches:
            raise PlanError(f"tp_plan pattern {pattern!r} matches no submodule of {type(module).__name__}.")
        if style == "replicate":  # leaves a module whole, whatever its class
            resolved.update(dict.fromkeys(matches, style))
            continue
        for name in matches:
            if is_adapter_layer(modules[name]):  # a peft LoRA layer: its inner layers, split consistently
                resolved.update(tp_plan_for_lora_layer(name, modules[name], style, pattern))
                continue
            _check_shardable(module, pattern, name, modules[name])
            resolved[name] = style
    return resolved


def _check_shardable(model: nn.Module, pattern: str, name: str, module: nn.Module) -> None:
    """A PlanError when the style torch would apply to ``module`` cannot take it.

    torch's Colwise/RowwiseParallel shard the weight of an nn.Linear or nn.Embedding and refuse
    anything else, only once the process group exists; meshplan refuses it before that.
    """
    if isinstance(module, SHARDABLE):
        return
    cls = type(module)
    what = f"tp_plan pattern {pattern!r} matches {name}, a {cls.__name__} ({cls.__module__}.{cls.__qualname__})"
    inner = [inner_name for inner_name, inner in module.named_modules() if inner_name and isinstance(inner, nn.Linear)]
    if inner:
        advice = f"point the pattern at the nn.Linear layers inside it: {listed([f'{pattern}.{n}' for n in inner])}."
    elif linear_layer_patterns(model):
        advice = (f"leave it out of tp_plan; the nn.Linear layers of {type(model).__name__}'s blocks are "
                  f"{listed(linear_layer_patterns(model))}.")
    else:
        advice = (f"{type(model).__name__}'s blocks hold no nn.Linear layer, so no TP plan can work; use DDP or "
                  f"ZeRO for this model.")
    raise PlanError(f"{what}: torch's tensor parallel styles shard only nn.Linear and nn.Embedding; {advice}")


def linear_layer_patterns(module: nn.Module) -> list[str]:
    """Patterns, in plan syntax, for the ``nn.Linear`` layers inside the repeated blocks of ``module``.

    A layer in a block has a numbered name (``layer.0.attention.q_lin``); each number becomes
    ``*``, so every block's copy of a layer gives one pattern, in the order the model holds them.
    """
    patterns = (_numbers_to_stars(name) for name, inner in module.named_modules() if isinstance(inner, nn.Linear))
    return list(dict.fromkeys(pattern for pattern in patterns if "*" in pattern))


def unshardable_layer_names(module: nn.Module) -> list[str]:
    """Names of the matrix-holding layers in ``module``'s blocks that no TP style can shard.

    Such a layer has a 2-D weight but is neither an nn.Linear nor an nn.Embedding, like GPT-2's
    Conv1D; norms (1-D weights) and containers are not counted.
    """
    names = []
    for name, inner in module.named_modules():
        weight = getattr(inner, "weight", None)
        if ("*" in _numbers_to_stars(name) and isinstance(weight, nn.Parameter) and weight.dim() == 2
                and not isinstance(inner, SHARDABLE)):
            names.append(name)
    return names


def _numbers_to_stars(name: str) -> str:
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def listed(names: list[str], limit: int = 6) -> str:
    """The first ``limit`` of ``names`` for a message, and how many there are in all when that is more."""
    first = ", ".join(names[:limit])
    return first + (f", ... ({len(names)} in all)" if len(names) > limit else "")


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
