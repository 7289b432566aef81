"""Bytes one rank sends per optimizer step, layout by layout.

Each collective is counted as ring algorithms send it, per rank, for a group of n ranks and a
tensor of M bytes (the convention of nccl-tests' bus bandwidth): an all-reduce sends 2(n-1)/n M,
an all-gather or a reduce-scatter (n-1)/n M of the whole tensor. The volumes follow the ZeRO
paper's section 7: DDP, ZeRO-1 and ZeRO-2 move 2 copies of the model per step, ZeRO-3 3 copies
(its parameters are gathered again for the backward pass); only trainable parameters have
gradients to reduce, and ZeRO-1/2 gather back only those (frozen ones, as a LoRA model's base
weights, stay whole on every rank), while ZeRO-3 and FSDP2 gather frozen parameters as the others
for the forward and backward passes; tensor parallelism moves activations,
one all-reduce per split layer pair in each direction (Megatron's f and g operators). FSDP2
reduce-scatters the fp32 gradients and gathers the fp32 parameters of each unit for the forward
pass and, at stage 3 (it reshards after the forward pass), again for the backward pass: 3 copies of
the model at stage 3, 2 at stage 2, of the TP-local model under TP x FSDP2.
"""

from __future__ import annotations

import re

from torch import nn

from meshplan.peft import is_adapter_layer
from meshplan.plan import Plan
from meshplan.planner.gradients import gradient_flow
from meshplan.planner.memory import deepspeed_option, reused_numel, used_in_backward
from meshplan.planner.model import ROWWISE_STYLES, ModelFacts


# A module inside one of the repeated transformer layers (model.layers.3.mlp..., encoder.layer.0...),
# which gradient checkpointing recomputes.
_IN_A_LAYER = re.compile(r"\.\d+\.")


def all_reduce(nbytes: float, ranks: int) -> float:
    """Bytes a rank sends in a ring all-reduce of ``nbytes`` among ``ranks``."""
    return 2 * (ranks - 1) / ranks * nbytes if ranks > 1 else 0.0


def all_gather(nbytes: float, ranks: int) -> float:
    """Bytes a rank sends in a ring all-gather (or reduce-scatter) of a whole tensor of ``nbytes``."""
    return (ranks - 1) / ranks * nbytes if ranks > 1 else 0.0


def data_parallel_bytes(facts: ModelFacts, plan: Plan, *, dp_size: int, tp_size: int, half: bool) -> float:
    """What the data-parallel dimension sends per step: gradients reduced, ZeRO's parameters gathered."""
    if plan.uses_fsdp2:
        return fsdp2_bytes(facts, plan, dp_size=dp_size, tp_size=tp_size)
    if plan.strategy != "zero":
        # fp32 gradients, in DDP's buckets or across TP's replicas (each its local share).
        return all_reduce(4 * sum(p.local_gradient_numel(tp_size) for p in facts.parameters if p.trainable), dp_size)
    weight = 2 if half else 4
    trainable = weight * sum(p.numel for p in facts.parameters if p.trainable)
    if plan.zero_stage < 3:
        # DeepSpeed all-reduces each gradient bucket, then gathers the updated parameters once: those
        # in its flat groups, the trainable ones (a frozen parameter is whole on every rank already).
        return all_reduce(trainable, dp_size) + all_gather(trainable, dp_size)
    # ZeRO-3 reduce-scatters the gradients and gathers each parameter for the forward pass; for the
    # backward pass again only those that were released in between: DeepSpeed keeps a parameter
    # gathered when fewer than stage3_max_reuse_distance elements are gathered before its next use.
    # Parameters under the persistence threshold stay whole and are gathered once, after the step.
    # Frozen parameters are gathered as the others, but their gradients are not reduced: there are none.
    return all_gather(trainable, dp_size) + all_gather(weight * facts.numel, dp_size) + all_gather(
        weight * regathered_numel(facts, plan), dp_size)


def fsdp2_bytes(facts: ModelFacts, plan: Plan, *, dp_size: int, tp_size: int) -> float:
    """What FSDP2 sends over the data-parallel ranks per step, in fp32 (meshplan sets no MixedPrecisionPolicy).

    The parameters it shards (TP-local under TP x FSDP2) are gathered once or twice (see the module's
    docstring) and their gradients reduce-scattered; those it keeps whole (outside every Hugging Face
    model) are all-reduced, as DDP would.
    """
    whole = set(facts.sharding_units(plan.option("fsdp_layer_classes")).whole)
    sharded = [p for p in facts.parameters if p.name not in whole]
    gathers = 2 if plan.reshard_after_forward else 1
    gathered = gathers * all_gather(4 * sum(p.local_numel(tp_size) for p in sharded), dp_size)
    reduced = all_gather(4 * sum(p.local_numel(tp_size) for p in sharded if p.trainable), dp_size)
    kept_whole = all_reduce(4 * sum(p.local_numel(tp_size) for p in facts.parameters if p.name in whole and p.trainable), dp_size)
    return gathered + reduced + kept_whole


def regathered_numel(facts: ModelFacts, plan: Plan) -> int:
    """Elements ZeRO-3 gathers a second time, for the backward pass: those it did not keep, of the
    parameters the backward pass uses (DeepSpeed gathers a layer's parameters when a gradient reaches it)."""
    threshold = deepspeed_option(plan, "stage3_param_persistence_threshold")
    used = used_in_backward(facts)
    gathered = sum(p.numel for p in facts.parameters if p.numel > threshold and p.name in used)
    return gathered - min(gathered, reused_numel(facts, plan))


def tensor_parallel_bytes(facts: ModelFacts, *, tp_size: int, tokens: int, activation_bytes: int, residual_bytes: int,
                          recomputed: bool = False) -> float:
    """What the TP group sends per micro-batch: per split layer, the activations it all-reduces.

    ``facts`` are those of ``ModelFacts.with_tp_styles(tp_size)``. With gradient checkpointing
    (``recomputed``) each transformer layer runs its forward pass again in the backward pass, so the
    rowwise layers inside them reduce their outputs twice.

    A rowwise layer adds up its partial outputs in the forward pass; a colwise layer adds up its
    input's partial gradients in the backward pass, when its input needs one (in a LoRA model the
    layers before the first adapter get none: meshplan.planner.gradients); a rowwise embedding adds
    up its output; a layer whose output is gathered whole (the LM head) gathers it. A colwise
    layer's input is the residual stream, except a LoRA layer's ``lora_B``, which takes ``lora_A``'s
    output (16-bit under autocast).
    """
    if tp_size == 1:
        return 0.0
    flow = gradient_flow(facts)
    modules = dict(facts.module.named_modules())
    total = 0.0
    for name, style in facts.styles.items():
        module = modules.get(name)
        if style in ROWWISE_STYLES and isinstance(module, nn.Linear):
            runs = 2 if recomputed and _IN_A_LAYER.search(name) else 1
            total += runs * all_reduce(tokens * module.out_features * activation_bytes, tp_size)
        elif style == "embedding_rowwise" and isinstance(module, nn.Embedding):
            total += all_reduce(tokens * module.embedding_dim * residual_bytes, tp_size)
        elif style.startswith("colwise") and isinstance(module, nn.Linear):
            inside = facts.in_model(name)
            if inside is None or flow.input_needs_gradient(inside):
                input_bytes = activation_bytes if _is_lora_b(name, modules) else residual_bytes
                total += all_reduce(tokens * module.in_features * input_bytes, tp_size)
            if style in ("colwise_rep", "colwise_gather_output"):
                total += all_gather(tokens * module.out_features * activation_bytes, tp_size)
    return total


def _is_lora_b(name: str, modules: dict[str, nn.Module]) -> bool:
    """Whether the module ``name`` is the ``lora_B`` of a peft LoRA layer (``<layer>.lora_B.<adapter>``)."""
    layer, _, rest = name.rpartition(".lora_B.")
    return bool(layer) and "." not in rest and is_adapter_layer(modules.get(layer, nn.Module()))
