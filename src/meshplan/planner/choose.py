"""meshplan.plan_layout: every layout meshplan can run on the hardware, ranked, and the choice."""

from __future__ import annotations

from typing import Any

from meshplan.errors import PlanError
from meshplan.plan import Plan
from meshplan.planner.costs import check_positive, estimate
from meshplan.planner.hardware import Links, format_bytes, parse_memory
from meshplan.planner.memory import DEEPSPEED_DEFAULTS
from meshplan.planner.model import ModelFacts, model_facts
from meshplan.planner.types import Candidate, Estimate, LayoutChoice

# The order of docs/choosing-a-layout.md: layouts that keep whole weights on every device first
# (their gradient traffic overlaps the backward pass; FSDP2's stage 2 keeps them gathered from the
# forward to the backward pass), then those that shard the weights (ZeRO-3 on either engine, TP and
# TP x FSDP2, which communicate inside every layer), then offload (bound by the host link).
TIERS = {"ddp": 0, "zero1": 0, "zero2": 0, "fsdp2-stage2": 0, "tp": 1, "tp-dp": 1, "tp-fsdp": 1, "zero3": 1, "fsdp2": 1,
         "zero3-offload": 2}
# When two layouts of a tier cost the same time, the simpler one wins (ZeRO-2 holds less than ZeRO-1),
# and DeepSpeed before FSDP2 for the same stage: it is ZeRO's default engine.
PREFERENCE = ("ddp", "zero2", "zero1", "fsdp2-stage2", "tp", "tp-dp", "zero3", "fsdp2", "tp-fsdp", "zero3-offload")
# How far plan_layout looks for a node count that fits, when none does on the hardware given.
MAX_NODES_SEARCHED = 128


def candidate_plans(facts: ModelFacts, devices_per_node: int, nodes: int = 1) -> list[Plan]:
    """The layouts meshplan can run on ``nodes`` of ``devices_per_node``: DDP, ZeRO 1-3 on DeepSpeed,
    ZeRO-3 with offload, ZeRO 2 and 3 on FSDP2, TP over each divisor of the node that the model's
    heads and MLP allow, and, where that leaves data-parallel ranks, TP x FSDP2 over them."""
    buckets = bucket_options(facts)
    plans = [Plan("ddp"), *(Plan.build("zero", zero_stage=stage, options=buckets.get(stage)) for stage in (1, 2, 3)),
             Plan.build("zero", zero_stage=3, offload_optimizer=True, offload_parameters=True, options=buckets.get(3))]
    if _takes_fsdp2(facts):
        plans += [Plan("zero", zero_stage=stage, engine="fsdp2") for stage in (2, 3)]
    for tp_size in range(2, devices_per_node + 1):
        if devices_per_node % tp_size == 0 and _takes_tp(facts, tp_size):
            plans.append(Plan("tp", tp_size=tp_size))
            if tp_size < devices_per_node * nodes and _takes_fsdp2(facts):
                plans.append(Plan("tp", tp_size=tp_size, data_parallel="shard"))
    return plans


def bucket_options(facts: ModelFacts) -> dict[int, dict[str, int]]:
    """DeepSpeed bucket sizes for a model smaller than its buckets, by ZeRO stage.

    DeepSpeed allocates its whole reduce bucket (5e8 elements: 1 GB in bf16, 2 GB in fp32) and
    prefetches up to 5e7 elements whatever the model; a model with fewer trainable elements than
    the reduce bucket (it reduces only gradients), or fewer elements than the prefetch bucket (it
    gathers frozen parameters too), gains nothing from the rest, so the planner's ZeRO layouts size
    them to the model. Larger models keep DeepSpeed's defaults (an empty mapping).
    """
    trainable = max(1, facts.trainable_numel)
    reduce = {"reduce_bucket_size": trainable} if trainable < DEEPSPEED_DEFAULTS["reduce_bucket_size"] else {}
    prefetch = ({"stage3_prefetch_bucket_size": facts.numel}
                if facts.numel < DEEPSPEED_DEFAULTS["stage3_prefetch_bucket_size"] else {})
    return {1: reduce, 2: reduce, 3: {**reduce, **prefetch}}


def _takes_fsdp2(facts: ModelFacts) -> bool:
    """Whether FSDP2 can shard the model: meshplan shards the Hugging Face models it holds."""
    try:
        facts.sharding_units()
    except PlanError:
        return False
    return True


def _takes_tp(facts: ModelFacts, tp_size: int) -> bool:
    try:
        facts.with_tp_styles(tp_size)
    except PlanError:
        return False
    return True


def plan_layout(model: Any, *, devices_per_node: int, nodes: int = 1, device_memory: int | str, micro_batch_size: int = 1,
                seq_len: int = 2048, precision: str = "bf16", gradient_checkpointing: bool = False,
                host_memory: int | str | None = None, device_is_host: bool = False, global_batch_size: int | None = None,
                links: Links = Links()) -> LayoutChoice:
    """Ranks every layout meshplan can run on ``nodes`` x ``devices_per_node`` devices and picks one.

    A layout fits when its estimate's ``total`` is within ``device_memory`` (and, with offload, its
    ``host_bytes`` within ``host_memory`` per process, when given). Among those that fit, layouts
    that keep whole weights on every device (ddp, zero1, zero2, fsdp2-stage2) come first, then
    those that shard the weights (zero3, fsdp2, tp, tp-dp, tp-fsdp), then offload; within each, the
    one whose communication and offload traffic take the least time per step wins (computation is
    the same for all), and ties go to the simpler layout, and to DeepSpeed before FSDP2.

    Args:
        model: as for ``meshplan.estimate``.
        devices_per_node: processes (GPUs) per machine; TP groups stay inside one.
        device_memory: bytes per device, or a size such as ``"80GB"``.
        host_memory: CPU memory per process for what offload keeps there; None: not checked.
        device_is_host: the processes train on the CPU, so offloading frees nothing: what offload
            keeps in host memory counts against ``device_memory`` too.
        global_batch_size: sequences per step over all processes; when given, each layout plans
            with its own micro-batch, this divided among its data-parallel ranks (a TP group
            shares one), in place of ``micro_batch_size``.
        links: bandwidths that turn bytes into seconds (``meshplan.planner.Links``).

    Raises:
        PlanError: nothing fits; the message names the smallest device memory, and the smallest
            number of nodes, that would fit.
    """
    check_positive(devices_per_node=devices_per_node, nodes=nodes)
    facts = model if isinstance(model, ModelFacts) else model_facts(model)
    memory = parse_memory(device_memory)
    host = parse_memory(host_memory) if host_memory is not None else None
    if global_batch_size is not None:
        check_positive(global_batch_size=global_batch_size)
    settings = dict(micro_batch_size=micro_batch_size, seq_len=seq_len, precision=precision,
                    gradient_checkpointing=gradient_checkpointing, global_batch_size=global_batch_size)
    if device_is_host:
        host = 0  # checked by _fits against device_memory instead
    candidates = _ranked(facts, devices_per_node, nodes, memory, host, links, settings)
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        raise PlanError(_nothing_fits(facts, candidates, devices_per_node, nodes, memory, host, links, settings))
    best = fitting[0]
    return LayoutChoice(best.layout, best.tp_size, best.plan, _reason(best, candidates, memory), tuple(candidates))


def _ranked(facts: ModelFacts, devices_per_node: int, nodes: int, memory: int, host: int | None, links: Links,
            settings: dict[str, Any]) -> list[Candidate]:
    world_size = devices_per_node * nodes
    settings = dict(settings)
    global_batch_size = settings.pop("global_batch_size")
    candidates = []
    for plan in candidate_plans(facts, devices_per_node, nodes):
        if global_batch_size is not None:
            replicas = world_size // (plan.tp_size if plan.strategy == "tp" else 1)
            settings["micro_batch_size"] = max(1, -(-global_batch_size // replicas))
        result = estimate(facts, plan, world_size=world_size, nodes=nodes, **settings)
        fits = _fits(result, memory, host)
        candidates.append(Candidate(result.layout, result.tp_size, plan, result, fits, step_seconds(result, nodes, links)))
    # Fitting layouts by tier and step time, then the simpler first; the rest by how much they need.
    return sorted(candidates, key=lambda c: (not c.fits, TIERS[c.layout] if c.fits else 0, c.step_seconds if c.fits else 0,
                                             PREFERENCE.index(c.layout) if c.fits else 0, c.estimate.total, c.tp_size))


def _fits(result: Estimate, memory: int, host: int | None) -> bool:
    # host == 0: the device is the host, so offloaded bytes share its memory.
    if host == 0:
        return result.total + result.host_bytes <= memory
    return result.total <= memory and (host is None or result.host_bytes <= host)


def step_seconds(result: Estimate, nodes: int, links: Links) -> float:
    """Seconds a step spends communicating and copying to and from the host, at the links' speeds.

    TP groups stay inside a node; data-parallel collectives cross nodes when there are several,
    and a ring runs at the speed of its slowest link.
    """
    data_parallel = result.communication_bytes_per_step - result.tensor_parallel_bytes_per_step
    across = links.inter_node if nodes > 1 else links.intra_node
    return (data_parallel / across + result.tensor_parallel_bytes_per_step / links.intra_node
            + result.host_traffic_bytes_per_step / links.host)


def _reason(best: Candidate, candidates: list[Candidate], memory: int) -> str:
    name, tier = _named(best), TIERS[best.layout]
    need = f"it needs {format_bytes(best.estimate.total)} of {format_bytes(memory)} per device"
    sent = f"{format_bytes(best.estimate.communication_bytes_per_step)} sent per step"
    if tier == 0:
        return f"{name} keeps whole weights on every device and fits ({need}); of those that do, it communicates least ({sent})."
    replicated = min(c.estimate.total for c in candidates if TIERS[c.layout] == 0)
    if tier == 1:
        return (f"{name} fits once the weights are sharded ({need}; the layouts that keep whole weights need at least "
                f"{format_bytes(replicated)}); of the sharded layouts it communicates least ({sent}).")
    sharded = min(c.estimate.total for c in candidates if TIERS[c.layout] < 2)
    return (f"{name} is the only layout that fits ({need}, and {format_bytes(best.estimate.host_bytes)} in host memory): "
            f"every layout that keeps its states on the device needs at least {format_bytes(sharded)}.")


def _named(candidate: Candidate) -> str:
    return f"{candidate.layout} (tp_size {candidate.tp_size})" if candidate.layout.startswith("tp") else candidate.layout


def _nothing_fits(facts: ModelFacts, candidates: list[Candidate], devices_per_node: int, nodes: int, memory: int,
                  host: int | None, links: Links, settings: dict[str, Any]) -> str:
    within_host = [c for c in candidates if not host or c.estimate.host_bytes <= host] or candidates
    smallest = min(within_host, key=lambda c: c.estimate.total + (c.estimate.host_bytes if host == 0 else 0))
    host_text = f" and {format_bytes(host)} of host memory per process" if host else ""
    text = (f"No layout fits {facts.name} ({facts.numel / 1e9:.2f}B parameters) in {format_bytes(memory)} per device{host_text} "
            f"on {nodes} node(s) of {devices_per_node} devices: the least any layout needs is {_named(smallest)}'s "
            f"{format_bytes(smallest.estimate.total)}, so it fits with {format_bytes(smallest.estimate.total)} per device")
    for more_nodes in range(nodes + 1, MAX_NODES_SEARCHED + 1):
        fitting = [c for c in _ranked(facts, devices_per_node, more_nodes, memory, host, links, settings) if c.fits]
        if fitting:
            text += f", or on {more_nodes} nodes of {devices_per_node} devices ({_named(fitting[0])})"
            break
    else:
        text += f"; no number of nodes up to {MAX_NODES_SEARCHED} makes it fit"
    if not settings["gradient_checkpointing"]:
        return text + "; gradient checkpointing would shrink the activations."
    return text + "; a shorter sequence or a smaller micro-batch would shrink the activations."
