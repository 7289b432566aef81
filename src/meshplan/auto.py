"""Automatic layout: what the Lightning, Accelerate and finetune front ends share when meshplan chooses.

Each front end learns the model, the world size and the memory per process at its own moment
(Lightning once the LightningModule is connected, Accelerate when ``meshplan.accelerator("auto",
model=...)`` is called, ``meshplan finetune --recipe auto`` in the command before any worker
starts) and then asks ``choose_layout``; the planner (meshplan.planner.plan_layout) does the
choosing. Every front end announces the choice in the same words, ``announcement``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import nn

if TYPE_CHECKING:
    from meshplan.plan import Plan
    from meshplan.planner.types import LayoutChoice

AUTO = "auto"
# The sequence length planned for when none is given: 2048 tokens, or the model's own limit when lower.
DEFAULT_SEQ_LEN = 2048


def is_auto(layout: Any) -> bool:
    """Whether ``layout`` asks meshplan to choose: the string ``"auto"``."""
    return isinstance(layout, str) and layout == AUTO


def choose_layout(model: Any, *, processes_per_node: int, nodes: int = 1, device: torch.device | None = None,
                  device_memory: int | str | None = None, micro_batch_size: int | None = None, seq_len: int | None = None,
                  precision: str = "no", gradient_checkpointing: bool | None = None,
                  global_batch_size: int | None = None) -> LayoutChoice:
    """The layout the planner chooses for ``model`` on ``nodes`` x ``processes_per_node`` processes.

    Args:
        model: a transformers config, a model directory or config.json path, or a module holding a
            transformers model (a LightningModule works).
        processes_per_node: processes on each node (one per device).
        nodes: nodes in all.
        device: the device each process trains on (its memory is what must hold the layout); None:
            a CUDA device when torch sees one, else the CPU.
        device_memory: bytes (or "80GB") one process may use; None measures it with
            ``memory_per_process``: a CUDA device's total memory, or on CPU the host memory
            divided among the node's processes. On CUDA devices, what offload keeps in host
            memory must fit in the host's share per process too.
        micro_batch_size: samples per process per forward pass; None: 1.
        seq_len: tokens per sample; None: ``default_seq_len(model)``.
        precision: "no", "bf16" or "fp16" (see meshplan.plan.normalize_precision).
        gradient_checkpointing: None reads it from the module (``is_gradient_checkpointing`` of the
            transformers model inside), False for a config or path.
        global_batch_size: samples per step over all processes, when that is what is fixed: each
            layout then plans with its share per data-parallel rank (see ``plan_layout``).

    Raises:
        PlanError: no layout fits; the message names the smallest memory or device count that would.
    """
    from meshplan.planner import host_memory, memory_per_process, plan_layout

    if device_memory is None:
        device_memory = memory_per_process(processes_per_node, device)
    if gradient_checkpointing is None:
        gradient_checkpointing = checkpoints_gradients(model)
    return plan_layout(
        model, devices_per_node=processes_per_node, nodes=nodes, device_memory=device_memory,
        micro_batch_size=micro_batch_size or 1, seq_len=seq_len or default_seq_len(model), precision=precision,
        gradient_checkpointing=gradient_checkpointing, global_batch_size=global_batch_size,
        # Offload moves states from the device to the host's memory, which the node's processes share.
        host_memory=host_memory() // max(1, processes_per_node) if _is_cuda(device) else None,
        device_is_host=not _is_cuda(device),
    )


def _is_cuda(device: torch.device | None) -> bool:
    """Whether processes train on CUDA devices (``device`` None: whether torch sees one)."""
    return torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()


def without_tensor_parallel(choice: LayoutChoice, why: str) -> LayoutChoice:
    """``choice``, or when it is a TP layout (tp, tp-dp, tp-fsdp), the fastest fitting layout among its
    candidates without TP.

    For front ends that cannot run tensor parallelism; ``why`` says so, and goes into the reason.

    Raises:
        PlanError: only TP layouts fit.
    """
    return without_layouts(choice, lambda plan: plan.strategy == "tp", "tensor parallelism", why)


def without_layouts(choice: LayoutChoice, left_out: Callable[[Plan], bool], what: str, why: str) -> LayoutChoice:
    """``choice``, or when ``left_out(choice.plan)``, the fastest fitting candidate whose plan is not left out.

    For front ends that cannot run some layouts: ``what`` names them ("tensor parallelism"), ``why``
    says why not; both go into the reason.

    Raises:
        PlanError: only layouts that are left out fit.
    """
    from dataclasses import replace

    from meshplan.errors import PlanError
    from meshplan.planner import format_bytes

    if not left_out(choice.plan):
        return choice
    others = [candidate for candidate in choice.candidates if not left_out(candidate.plan)]
    fitting = [candidate for candidate in others if candidate.fits]  # the candidates come fastest first
    if not fitting:
        smallest = min(others, key=lambda candidate: candidate.estimate.total)
        raise PlanError(f"only {what} fits this model, and {why}: the smallest layout without it, "
                        f"{smallest.layout}, needs {format_bytes(smallest.estimate.total)} per device.")
    best = fitting[0]
    reason = (f"{best.layout} is the fastest layout without {what} that fits, as {why}: it needs "
              f"{format_bytes(best.estimate.total)} per device and sends {format_bytes(best.estimate.communication_bytes_per_step)} "
              f"per step ({choice.chosen} with tp_size {choice.tp_size} would be faster).")
    return replace(choice, chosen=best.layout, tp_size=best.tp_size, plan=best.plan, reason=reason)


def default_seq_len(model: Any) -> int:
    """2048 tokens, or the model's ``max_position_embeddings`` when that is lower (a config without one: 2048)."""
    config = config_of(model)
    limit = getattr(config, "max_position_embeddings", None) if config is not None else None
    return min(DEFAULT_SEQ_LEN, limit) if isinstance(limit, int) and limit > 0 else DEFAULT_SEQ_LEN


def config_of(model: Any) -> Any:
    """The transformers config of ``model`` (a config, a model directory or config.json, or a module), or None."""
    from transformers import AutoConfig, PretrainedConfig

    from meshplan.tp.plans import find_pretrained_models

    if isinstance(model, PretrainedConfig):
        return model
    if isinstance(model, nn.Module):
        found = find_pretrained_models(model)
        return found[0][1].config if found else None
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        folder = os.path.dirname(path) if os.path.basename(path) == "config.json" else path
        try:
            return AutoConfig.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError):
            return None  # the planner says what is wrong with the path
    return None


def checkpoints_gradients(model: Any) -> bool:
    """Whether a transformers model inside the module ``model`` has gradient checkpointing on (False for configs)."""
    from meshplan.tp.plans import find_pretrained_models

    if not isinstance(model, nn.Module):
        return False
    return any(found.is_gradient_checkpointing for _, found in find_pretrained_models(model))


def announcement(choice: LayoutChoice | Mapping[str, Any]) -> str:
    """The one line every front end prints on rank 0: ``meshplan: chose zero3 (tp_size 1): <reason>``.

    ``choice`` is the planner's LayoutChoice or its ``layout_record``.
    """
    record = choice if isinstance(choice, Mapping) else layout_record(choice)
    return f"meshplan: chose {record['chosen']} (tp_size {record['tp_size']}): {record['reason']}"


def layout_record(choice: LayoutChoice) -> dict[str, Any]:
    """The choice as metrics.json records it: ``{"chosen", "tp_size", "reason"}``."""
    return {"chosen": choice.chosen, "tp_size": choice.tp_size, "reason": choice.reason}
