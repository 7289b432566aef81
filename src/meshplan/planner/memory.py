"""Model states and engine buffers per rank, layout by layout.

The accounting is the ZeRO paper's (Rajbhandari et al. 2020, section 3.1): mixed-precision Adam
holds 2 bytes of 16-bit weights, 2 of 16-bit gradients and K = 12 of optimizer states (an fp32
master copy, momentum and variance) per parameter; ZeRO-1 divides the 12 by the N data-parallel
ranks, ZeRO-2 the gradients too, ZeRO-3 everything. Where an engine departs from the paper, the
engine wins, because the planner predicts what the engine holds:

- DDP, and TP, under Lightning's and Accelerate's mixed precision keep fp32 weights and
  gradients and cast to 16 bits inside autocast: 4 + 4 + 8 bytes, plus DDP's gradient buckets
  (a second fp32 copy of the gradients unless ``gradient_as_bucket_view``).
- DeepSpeed's ZeRO-3 keeps parameters smaller than ``stage3_param_persistence_threshold``
  whole on every rank, pads each partition to a whole element per rank, and allocates its
  reduce bucket (``reduce_bucket_size`` elements) whole.
- FSDP2 (ZeRO on engine="fsdp2", and TP x FSDP2) as meshplan applies it (meshplan.fsdp, no
  MixedPrecisionPolicy): fp32 weights, gradients and AdamW states, each split over the
  data-parallel ranks, 16 bytes per parameter divided by them, with the precision's autocast
  around the forward pass as under DDP and TP. On top, the units it has gathered whole: at
  stage 3 a model's root unit and two blocks (the one running and the one prefetched), at
  stage 2 (no resharding after the forward pass) every unit, from the forward to the backward pass.
- Only trainable parameters carry gradients and optimizer states (and, under DeepSpeed, an fp32
  master copy). A frozen parameter (``requires_grad=False``: a LoRA model's base weights) is held
  as a weight alone, as each engine holds its weights: DeepSpeed casts every parameter, frozen ones
  too, to the 16-bit dtype and builds its flat groups, gradient partitions and reduce buckets of the
  trainable ones only, so ZeRO-1/2 keep a frozen weight whole on every rank (2 bytes in bf16) and
  ZeRO-3 partitions it as the others; FSDP2 shards it (fp32); DDP keeps it whole (fp32); TP splits
  it by the plan (a LoRA layer's ``base_layer`` as the layer it wraps, its ``lora_A`` and ``lora_B``
  as meshplan.peft chooses).
"""

from __future__ import annotations

from dataclasses import dataclass

from meshplan.plan import Plan
from meshplan.planner.gradients import GradientFlow, gradient_flow
from meshplan.planner.model import ModelFacts

# DeepSpeed's defaults (deepspeed/runtime/zero/config.py), used when a Plan leaves them unset.
DEEPSPEED_DEFAULTS = {
    "reduce_bucket_size": 500_000_000,
    "allgather_bucket_size": 500_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 100_000,
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_max_reuse_distance": 1_000_000_000,
    "sub_group_size": 1_000_000_000,
}
ADAM_STATE_BYTES = 8  # exp_avg and exp_avg_sq in fp32
MASTER_BYTES = 4      # the fp32 copy of the weights that mixed precision steps


@dataclass(frozen=True)
class ModelStates:
    """Bytes of one rank's model states on the device and in host memory, and its engine's buffers.

    Attributes:
        resident_buffers: buffers held through the whole step (DDP's buckets, ZeRO-3's reduce bucket).
        backward_buffers: buffers that exist only in the forward and backward passes (ZeRO-1/2's
            reduce bucket, ZeRO-3's gathered parameters).
        step_temporaries: what the optimizer step allocates beside the states: twice the largest
            fp32 tensor it updates at once (a parameter for torch's AdamW, which steps CPU
            tensors one at a time; a rank's whole flat partition for DeepSpeed: its fp32 gradient
            copy and Adam's temporary; ZeRO-3 steps it ``sub_group_size`` elements at a time).
        gradients_resident: the gradients outlive the step (ZeRO-3's partition), so they are
            there in the backward pass too.
    """

    parameters: int
    gradients: int
    optimizer_states: int
    resident_buffers: int
    backward_buffers: int
    step_temporaries: int
    host_bytes: int
    gradients_resident: bool = False

    @property
    def buffers(self) -> int:
        """Every engine buffer, resident or not."""
        return self.resident_buffers + self.backward_buffers


def deepspeed_option(plan: Plan, name: str) -> int:
    """A DeepSpeed zero_optimization setting as the engine will use it: the Plan's, else DeepSpeed's default."""
    return int(plan.option(name, DEEPSPEED_DEFAULTS[name]))


def model_states(facts: ModelFacts, plan: Plan, *, dp_size: int, tp_size: int, half: bool) -> ModelStates:
    """Bytes of parameters, gradients, optimizer states and buffers one rank holds under ``plan``.

    ``half`` says whether training runs in 16-bit mixed precision (bf16 or fp16).
    """
    if plan.uses_fsdp2:
        return _fsdp2_states(facts, plan, dp_size, tp_size)
    if plan.strategy == "zero":
        return _zero_states(facts, plan, dp_size, half)
    return _replicated_states(facts, plan, tp_size)


def _replicated_states(facts: ModelFacts, plan: Plan, tp_size: int) -> ModelStates:
    """DDP and TP: fp32 weights, gradients and Adam states for this rank's share of each tensor."""
    local = sum(p.local_numel(tp_size) for p in facts.parameters)
    trainable = sum(p.local_numel(tp_size) for p in facts.parameters if p.trainable)
    gradients = sum(p.local_gradient_numel(tp_size) for p in facts.parameters if p.trainable)
    buckets = 0
    if plan.strategy == "ddp" and not plan.option("gradient_as_bucket_view", False):
        buckets = 4 * trainable  # DDP's flat buckets hold a second copy of every gradient
    largest = max((p.local_gradient_numel(tp_size) for p in facts.parameters if p.trainable), default=0)
    return ModelStates(4 * local, 4 * gradients, ADAM_STATE_BYTES * trainable, buckets, 0, 2 * 4 * largest, 0)


def _fsdp2_states(facts: ModelFacts, plan: Plan, dp_size: int, tp_size: int) -> ModelStates:
    """FSDP2: this rank's share of fp32 weights, gradients and AdamW states, and the units gathered whole."""
    shares = fsdp2_shares(facts, plan, tp_size=tp_size, dp_size=dp_size)
    trainable = [shares[p.name] for p in facts.parameters if p.trainable]
    gathered = gathered_units_numel(facts, plan, tp_size)
    # torch's AdamW steps one CPU tensor at a time (see _replicated_states): twice the largest share.
    largest = max(trainable, default=0)
    return ModelStates(4 * sum(shares.values()), 4 * sum(trainable), ADAM_STATE_BYTES * sum(trainable), 0,
                       4 * gathered, 2 * 4 * largest, 0)


def fsdp2_shares(facts: ModelFacts, plan: Plan, *, tp_size: int, dp_size: int) -> dict[str, int]:
    """Elements of each parameter (by name) one rank holds under FSDP2: split over ``dp_size`` ranks
    after TP over ``tp_size``; those outside every Hugging Face model stay whole (meshplan.fsdp)."""
    whole = set(facts.sharding_units(plan.option("fsdp_layer_classes")).whole)
    return {p.name: p.local_numel(tp_size) if p.name in whole else p.fsdp2_numel(tp_size, dp_size) for p in facts.parameters}


def gathered_units_numel(facts: ModelFacts, plan: Plan, tp_size: int) -> int:
    """Elements FSDP2 holds gathered (TP-local) at the turn from forward to backward: every unit at
    stage 2; at stage 3 and under TP x FSDP2 the root units and two blocks, the one whose backward
    runs and the one prefetched."""
    units = facts.sharding_units(plan.option("fsdp_layer_classes"))
    local = {p.name: p.local_numel(tp_size) for p in facts.parameters}
    blocks = sorted((sum(local[name] for name in block) for block in units.blocks), reverse=True)
    roots = sum(local[name] for root in units.roots for name in root)
    if not plan.reshard_after_forward:
        return roots + sum(blocks)
    return roots + sum(blocks[:2])


def _zero_states(facts: ModelFacts, plan: Plan, dp_size: int, half: bool) -> ModelStates:
    weight = 2 if half else 4
    stage = plan.zero_stage
    trainable = [p.numel for p in facts.parameters if p.trainable]
    trainable_share = sum(_share(n, dp_size) for n in trainable)
    # DeepSpeed keeps an fp32 master copy of its partition beside the working one, in fp32 too (measured).
    optimizer = (MASTER_BYTES + ADAM_STATE_BYTES) * trainable_share
    # ZeRO-3 steps its partition a sub-group at a time (closed once it reaches sub_group_size, so up
    # to one parameter's share more); ZeRO-1/2 the whole partition.
    largest_share = max((_share(n, dp_size) for n in trainable), default=0)
    sub_group = deepspeed_option(plan, "sub_group_size") + largest_share - 1
    stepped = min(trainable_share, sub_group) if stage == 3 else trainable_share
    temporaries = 2 * 4 * stepped
    bucket = deepspeed_option(plan, "reduce_bucket_size")
    if stage < 3:
        parameters = weight * facts.numel
        # DeepSpeed reduces the gradients through its bucket and keeps only this rank's share, at
        # stage 1 as at stage 2 (measured: the same bytes); setup_buckets allocates a whole reduce
        # bucket every backward, two with overlap_comm.
        gradients = weight * trainable_share
        resident, backward = 0, weight * bucket * (2 if plan.option("overlap_comm", False) else 1)
    else:
        persistent = persistent_numel(facts, plan)
        parameters = weight * (sum(_share(p.numel, dp_size) for p in facts.parameters) + persistent)
        gradients = weight * trainable_share
        # The whole reduce bucket (stage3.py allocates reduce_bucket_size elements whatever the
        # model), and the parameters gathered whole at the peak, the turn from forward to backward:
        # those DeepSpeed keeps for their reuse, plus the prefetch (at least the largest parameter).
        resident, backward = weight * bucket, weight * kept_gathered_numel(facts, plan)
    host = 0
    if plan.offload_optimizer:
        # The optimizer steps on the CPU: master weights and Adam states there, and the gradient
        # share too (DeepSpeed allocates its partition on the offload device) with an fp32 copy.
        host += optimizer + gradients + 4 * trainable_share
        optimizer = gradients = temporaries = 0
    if plan.offload_parameters:
        host += parameters - weight * persistent
        parameters = weight * persistent
    return ModelStates(parameters, gradients, optimizer, resident, backward, temporaries, host, gradients_resident=stage == 3)


def kept_gathered_numel(facts: ModelFacts, plan: Plan) -> int:
    """Elements ZeRO-3 holds gathered at the turn from forward to backward: those it keeps for
    their reuse (at least the largest parameter, which runs whole), plus the prefetch bucket."""
    kept = max(reused_numel(facts, plan), max(p.numel for p in facts.parameters))
    return min(kept + deepspeed_option(plan, "stage3_prefetch_bucket_size"), facts.numel)


def reused_numel(facts: ModelFacts, plan: Plan) -> int:
    """Elements of gathered parameters ZeRO-3 keeps gathered from their forward to their backward use.

    Parameters run backward in the reverse order of forward, so between a parameter's two uses
    every gathered parameter after it is used twice; DeepSpeed keeps it when that distance is
    within ``stage3_max_reuse_distance`` elements, up to ``stage3_max_live_parameters`` in all.
    """
    reuse = deepspeed_option(plan, "stage3_max_reuse_distance")
    threshold = deepspeed_option(plan, "stage3_param_persistence_threshold")
    used = used_in_backward(facts)
    kept, after = 0, 0
    for parameter in reversed(facts.parameters):
        # DeepSpeed counts every parameter it walks, persistent ones too, and keeps while under the limit;
        # one the backward pass does not use (a frozen layer no gradient reaches) it releases after the forward pass.
        if parameter.numel > threshold and 2 * after < reuse and parameter.name in used:
            kept += parameter.numel
        after += parameter.numel
    return min(kept, deepspeed_option(plan, "stage3_max_live_parameters"))


def used_in_backward(facts: ModelFacts) -> set[str]:
    """The names of the parameters the backward pass uses: those of a layer a gradient reaches
    (meshplan.planner.gradients; every one in a model without frozen parameters)."""
    flow = gradient_flow(facts)
    return {p.name for p in facts.parameters if any(_reached(facts, flow, holder) for holder in facts.holders.get(p.name, ("",)))}


def _reached(facts: ModelFacts, flow: GradientFlow, module_name: str) -> bool:
    inside = facts.in_model(module_name)
    return inside is None or flow.runs_backward(inside)  # outside the transformers model: assumed reached


def persistent_numel(facts: ModelFacts, plan: Plan) -> int:
    """Elements ZeRO-3 keeps whole on every rank: parameters of at most ``stage3_param_persistence_threshold``."""
    threshold = deepspeed_option(plan, "stage3_param_persistence_threshold")
    return sum(p.numel for p in facts.parameters if p.numel <= threshold)


def _share(numel: int, ranks: int) -> int:
    """Elements one of ``ranks`` ranks holds of a tensor split evenly, padded to whole elements."""
    return -(-numel // ranks)


