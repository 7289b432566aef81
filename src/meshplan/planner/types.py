"""What the planner returns: an Estimate per layout, and the LayoutChoice among candidates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshplan.plan import Plan

# The components of the memory a rank holds, in the order tables and JSON show them.
COMPONENTS = ("parameters", "gradients", "optimizer_states", "activations", "buffers")


@dataclass(frozen=True)
class Estimate:
    """Bytes one rank holds while training under a layout, by component, and what it sends per step.

    Attributes:
        layout: the catalogue's name of the layout (ddp, zero1, zero2, zero3, zero3-offload, tp, tp-dp; on
            torch's FSDP2: fsdp2, fsdp2-stage2 and tp-fsdp).
        tp_size: processes that share one tensor-parallel copy of the model (1 without TP).
        world_size: processes in all.
        parameters: bytes of parameters on the device (the engine's copy the forward uses).
        gradients: bytes of gradients on the device at their peak, before the optimizer step.
        optimizer_states: bytes of optimizer states on the device (Adam's two moments and, in mixed
            precision under ZeRO, the fp32 master weights).
        activations: bytes saved for the backward pass at the end of the forward pass.
        buffers: bytes of communication buckets, gathered ZeRO-3 parameters and temporary full
            tensors (autocast's weight copies, the gradient of the logits, the optimizer step's
            temporaries), each at its largest.
        host_bytes: bytes that offload keeps in CPU memory instead (0 without offload).
        communication_bytes_per_step: bytes this rank sends per optimizer step, counted per
            collective as ring algorithms send them (all-reduce 2(n-1)/n, all-gather and
            reduce-scatter (n-1)/n of the whole tensor, for a group of n ranks).
        tensor_parallel_bytes_per_step: the part of it sent inside a TP group (inside one node).
        host_traffic_bytes_per_step: bytes offload copies between host and device per step.
        peak: the peak ``total`` reports (see there).
    """

    layout: str
    tp_size: int
    world_size: int
    parameters: int
    gradients: int
    optimizer_states: int
    activations: int
    buffers: int
    host_bytes: int
    communication_bytes_per_step: int
    tensor_parallel_bytes_per_step: int = 0
    host_traffic_bytes_per_step: int = 0
    peak: int = 0

    @property
    def total(self) -> int:
        """Peak bytes on the device during a step.

        Parameters, optimizer states and resident buffers are there throughout; on top comes the
        larger of the two moments a step peaks: the start of the backward pass (activations and
        the backward pass's buffers) and the optimizer step (gradients and the step's
        temporaries). So ``total`` is at most the five components added up, which is what a
        step would hold if gradients stayed alive into the next forward pass (gradient
        accumulation): read ``sum(bytes_per_rank()[c] for c in COMPONENTS)`` for that bound.
        """
        return self.peak or sum(getattr(self, name) for name in COMPONENTS)

    @property
    def model_states(self) -> int:
        """Bytes of parameters, gradients and optimizer states on the device."""
        return self.parameters + self.gradients + self.optimizer_states

    def bytes_per_rank(self) -> dict[str, int]:
        """The components and their total, as the JSON of ``meshplan plan --json`` shows them."""
        return {**{name: getattr(self, name) for name in COMPONENTS}, "total": self.total}


@dataclass(frozen=True)
class Candidate:
    """One layout the planner weighed: its Plan, its estimate, whether it fits, and its step cost."""

    layout: str
    tp_size: int
    plan: Plan
    estimate: Estimate
    fits: bool
    step_seconds: float

    def to_dict(self) -> dict[str, Any]:
        """The candidate as ``meshplan plan --json`` prints it."""
        return {
            "layout": self.layout, "tp_size": self.tp_size, "engine": engine_of(self.plan), "fits": self.fits,
            "bytes_per_rank": self.estimate.bytes_per_rank(), "host_bytes": self.estimate.host_bytes,
            "communication_bytes_per_step": self.estimate.communication_bytes_per_step,
            "communication_seconds_per_step": self.step_seconds,
        }


def engine_of(plan: Plan) -> str:
    """What shards or replicates the model under ``plan``: "ddp", "deepspeed", "fsdp2" (ZeRO on FSDP2, or
    TP x FSDP2) or "dtensor" (TP whose data-parallel replicas keep whole copies)."""
    if plan.uses_fsdp2:
        return "fsdp2"
    if plan.uses_deepspeed:
        return "deepspeed"
    return "dtensor" if plan.strategy == "tp" else "ddp"


@dataclass(frozen=True)
class LayoutChoice:
    """The layout ``plan_layout`` chose, why, and every candidate it weighed (fastest first among those that fit)."""

    chosen: str
    tp_size: int
    plan: Plan
    reason: str
    candidates: tuple[Candidate, ...]

    @property
    def estimate(self) -> Estimate:
        """The chosen candidate's estimate."""
        return next(c.estimate for c in self.candidates if c.layout == self.chosen and c.tp_size == self.tp_size)

    def to_dict(self) -> dict[str, Any]:
        """``{"chosen", "reason", "candidates": [...]}``, as ``meshplan plan --json`` prints it."""
        return {"chosen": self.chosen, "tp_size": self.tp_size, "reason": self.reason,
                "candidates": [candidate.to_dict() for candidate in self.candidates]}
