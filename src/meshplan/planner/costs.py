"""meshplan.estimate: the bytes one rank holds, and sends, training a model under a layout."""

from __future__ import annotations

import os
from typing import Any

import torch

from meshplan.errors import PlanError
from meshplan.plan import Plan, normalize_precision
from meshplan.planner.activations import trace_activations
from meshplan.planner.communication import data_parallel_bytes, tensor_parallel_bytes
from meshplan.planner.memory import model_states
from meshplan.planner.model import ModelFacts, model_facts
from meshplan.planner.types import Estimate

PRECISIONS = ("bf16", "fp16", "fp32")


def estimate(model: Any, layout: Any, *, world_size: int, nodes: int = 1, micro_batch_size: int = 1, seq_len: int = 2048,
             precision: str = "bf16", gradient_checkpointing: bool = False) -> Estimate:
    """Bytes per rank for training ``model`` under ``layout`` with AdamW, by component.

    Args:
        model: a transformers ``PretrainedConfig``, a model directory or ``config.json`` path, or
            an ``nn.Module`` (one holding a transformers model). A config is built on the meta
            device, so a 70B model costs nothing. A model with peft adapters (LoRA), or with
            parameters frozen otherwise, is sized as it trains: a frozen parameter holds its weight
            alone, without gradient or optimizer states.
        layout: a meshplan strategy, a ``Plan``, or a recipe (a path or a catalogue name: ``"zero3"``).
        world_size: processes in all; ``nodes`` of them share ``world_size // nodes`` each.
        micro_batch_size: sequences per rank per forward pass.
        seq_len: tokens per sequence.
        precision: ``"bf16"``, ``"fp16"`` or ``"fp32"`` (Lightning's and Accelerate's spellings work too).
        gradient_checkpointing: whether each layer recomputes its activations in the backward pass.

    Raises:
        PlanError: the layout cannot run on this world size or model (a tp_size that does not
            divide the world or the model's heads, a model without a TP plan), or a bad argument.
    """
    facts = model if isinstance(model, ModelFacts) else model_facts(model)
    plan = layout_plan(layout)
    half = _half(precision)
    check_positive(world_size=world_size, nodes=nodes, micro_batch_size=micro_batch_size, seq_len=seq_len)
    if not isinstance(gradient_checkpointing, bool):
        raise PlanError(f"gradient_checkpointing={gradient_checkpointing!r} must be True or False.")
    if world_size % nodes:
        raise PlanError(f"world_size={world_size} is not a multiple of nodes={nodes}: every node runs as many processes.")
    plan.check_world_size(world_size, world_size // nodes)
    if facts.max_positions is not None and seq_len > facts.max_positions:
        raise PlanError(f"seq_len={seq_len} is longer than {facts.name} takes (max_position_embeddings={facts.max_positions}); "
                        f"plan for at most {facts.max_positions} tokens.")
    tp_size = plan.resolved_tp_size(world_size // nodes) if plan.strategy == "tp" else 1
    dp_size = world_size // tp_size
    if tp_size > 1:
        facts = facts.with_tp_styles(tp_size, plan.tp_plan)
    states = model_states(facts, plan, dp_size=dp_size, tp_size=tp_size, half=half is not None)
    activations, weight_copies, logits = _activations(facts, plan, half, micro_batch_size, seq_len, gradient_checkpointing, tp_size)
    compute_bytes = 2 if half is not None else 4
    residual_bytes = compute_bytes if plan.uses_deepspeed else 4
    # Under autocast a linear layer computes, and returns, the 16-bit dtype: TP's rowwise layers
    # reduce, and the LM head gathers, 16-bit outputs. The residual stream stays fp32, so the input
    # gradients a colwise layer reduces (before autocast's cast) and a rowwise embedding's output are fp32.
    within_tp = tensor_parallel_bytes(facts, tp_size=tp_size, tokens=micro_batch_size * seq_len,
                                      activation_bytes=compute_bytes, residual_bytes=residual_bytes,
                                      recomputed=gradient_checkpointing)
    sent = data_parallel_bytes(facts, plan, dp_size=dp_size, tp_size=tp_size, half=half is not None) + within_tp
    # Temporary full tensors of the backward pass: autocast's 16-bit copies of the weights, kept for
    # backward, and the gradient of the logits, as large as the logits.
    # The step peaks either where the backward pass starts or in the optimizer step (see Estimate.total).
    backward = activations + weight_copies + logits + states.backward_buffers
    step = (0 if states.gradients_resident else states.gradients) + states.step_temporaries
    peak = states.parameters + states.optimizer_states + states.resident_buffers + max(backward, step)
    buffers = states.buffers + max(weight_copies + logits, states.step_temporaries)
    return Estimate(
        layout=layout_name(plan, world_size, world_size // nodes), tp_size=tp_size, world_size=world_size,
        parameters=states.parameters, gradients=states.gradients, optimizer_states=states.optimizer_states,
        activations=activations, buffers=buffers, host_bytes=states.host_bytes,
        communication_bytes_per_step=round(sent), tensor_parallel_bytes_per_step=round(within_tp),
        host_traffic_bytes_per_step=host_traffic(facts, plan, dp_size, compute_bytes if plan.uses_deepspeed else 4),
        peak=peak + (states.gradients if states.gradients_resident else 0),
    )


def host_traffic(facts: ModelFacts, plan: Plan, dp_size: int, weight_bytes: int) -> int:
    """Bytes offload copies between host and device per step: offloaded parameters in for the forward
    and the backward pass, and the gradient share out to the optimizer on the CPU and the updated
    weights back (of the trainable parameters: frozen ones have neither)."""
    if not plan.uses_deepspeed:
        return 0
    traffic = 2 * -(-facts.trainable_numel // dp_size) * weight_bytes if plan.offload_optimizer else 0
    if plan.offload_parameters:
        traffic += 2 * -(-facts.numel // dp_size) * weight_bytes
    return traffic


def _activations(facts: ModelFacts, plan: Plan, half: torch.dtype | None, micro_batch_size: int, seq_len: int,
                 gradient_checkpointing: bool, tp_size: int) -> tuple[int, int, int]:
    """(activations, autocast's weight copies, logits) on one rank, in bytes."""
    # DeepSpeed casts the model to 16 bits; DDP, TP and FSDP2 keep fp32 weights and run the forward in autocast.
    if half is None:
        dtype, autocast = torch.float32, None
    elif plan.uses_deepspeed:
        dtype, autocast = half, None
    else:
        dtype, autocast = torch.float32, half
    trace = trace_activations(facts, micro_batch_size=micro_batch_size, seq_len=seq_len, dtype=dtype, autocast=autocast,
                              tp_plan=plan.tp_plan)
    copies = trace.outside.weight_copies + trace.num_layers * trace.per_layer.weight_copies
    return trace.activations(tp_size, gradient_checkpointing), -(-copies // tp_size), trace.logits_bytes


def layout_plan(layout: Any) -> Plan:
    """The Plan of a strategy, a Plan, or a recipe path or catalogue name."""
    if isinstance(layout, Plan):
        return layout
    if isinstance(getattr(layout, "plan", None), Plan):
        return layout.plan
    if isinstance(layout, (str, os.PathLike)):
        from meshplan.recipes import read_recipe

        return read_recipe(layout).plan
    raise PlanError(f"layout={type(layout).__name__} is not a layout; pass a meshplan strategy, a Plan, or a recipe path or name.")


def layout_name(plan: Plan, world_size: int, processes_per_node: int) -> str:
    """The catalogue's name for ``plan``: ddp, zero1, zero2, zero3, zero3-offload, tp (TP over every
    process) or tp-dp (TP groups, data parallel across them) and, on torch's FSDP2, fsdp2 (ZeRO-3),
    fsdp2-stage2 (ZeRO-2) and tp-fsdp (TP groups, FSDP2 across them). The catalogue names offload at
    stage 3 only: ``ZeRO(stage=2, offload_optimizer=True)`` is "zero2" (its estimate shows the offload)."""
    if plan.uses_fsdp2:
        if plan.strategy == "tp":
            return "tp-fsdp"
        return "fsdp2" if plan.zero_stage == 3 else f"fsdp2-stage{plan.zero_stage}"
    if plan.strategy == "zero":
        offloaded = plan.zero_stage == 3 and (plan.offload_optimizer or plan.offload_parameters)
        return "zero3-offload" if offloaded else f"zero{plan.zero_stage}"
    if plan.strategy == "tp":
        return "tp" if plan.resolved_tp_size(processes_per_node) == world_size else "tp-dp"
    return "ddp"


def _half(precision: str) -> torch.dtype | None:
    normalized = "no" if precision == "fp32" else normalize_precision(precision)
    if normalized is None:
        raise PlanError(f"precision={precision!r} is unknown; valid values are {', '.join(PRECISIONS)}.")
    return {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[normalized]


def check_positive(**values: Any) -> None:
    """Raises a PlanError naming the first of ``values`` that is not a positive integer."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PlanError(f"{name}={value!r} must be a positive integer.")
