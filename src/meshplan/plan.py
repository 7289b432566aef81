"""The Plan: one framework-neutral, validated description of a parallel layout.

Every front end (Lightning, Accelerate, the HF Trainer) renders the same Plan; nothing else
describes a layout. A Plan is frozen and validated on construction, so an invalid layout never
reaches a process group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from meshplan.errors import PlanError, shown, shown_key

STRATEGIES = ("ddp", "zero", "tp")
ZERO_STAGES = (1, 2, 3)
# The engines that run the ZeRO strategy: DeepSpeed, or torch's FSDP2 (fully_shard), which shards
# gradients and optimizer state always and parameters too when it reshards after each forward.
ZERO_ENGINES = ("deepspeed", "fsdp2")
FSDP2_STAGES = (2, 3)
# What TensorParallel does across its data-parallel dimension: keep a whole copy of the TP-sharded
# model on every replica, or shard it once more with FSDP2 (torchtitan's 2-D layout).
DATA_PARALLEL_MODES = ("replicate", "shard")
PROCESS_GROUP_BACKENDS = ("gloo", "nccl", "mpi", "ccl", "hccl")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
TRAINING_OPTIONS = ("mixed_precision", "gradient_accumulation_steps", "gradient_clipping")
# The styles a tp_plan may name: those of transformers' base_model_tp_plan that meshplan applies
# (meshplan.tp.apply realizes each with one of torch's ParallelStyles). Megatron's pair is
# "colwise" (the output stays split for the next layer) then "rowwise" (partial sums are added
# up); "replicate" leaves a module whole on every rank.
TP_STYLES = ("colwise", "rowwise", "colwise_gather_output", "colwise_rep", "rowwise_rep", "rowwise_split_input",
             "embedding_rowwise", "replicate")


@dataclass(frozen=True)
class _Option:
    """One engine option a strategy accepts beyond its named arguments."""

    name: str
    kind: type | tuple[type, ...]
    strategies: tuple[str, ...]
    doc: str
    zero_stages: tuple[int, ...] = ZERO_STAGES
    needs_offload: bool = False
    positive: bool = False
    choices: tuple[str, ...] | None = None
    engines: tuple[str, ...] = ZERO_ENGINES  # the ZeRO engines that honour it


_DEEPSPEED = ("deepspeed",)

_OPTIONS = {
    option.name: option
    for option in (
        _Option("process_group_backend", str, STRATEGIES, "torch.distributed backend; derived from the device when unset",
                choices=PROCESS_GROUP_BACKENDS),
        # Training settings a recipe may fix; every front end honours them or refuses a conflict.
        _Option("mixed_precision", str, STRATEGIES, "mixed precision of the training step", choices=MIXED_PRECISIONS),
        _Option("gradient_accumulation_steps", int, STRATEGIES, "micro-batches per optimizer step", positive=True),
        _Option("gradient_clipping", (int, float), STRATEGIES, "maximum gradient norm", positive=True),
        # DDP: forwarded to torch.nn.parallel.DistributedDataParallel.
        _Option("find_unused_parameters", bool, ("ddp",), "let DDP skip parameters that get no gradient"),
        _Option("static_graph", bool, ("ddp",), "tell DDP the graph is the same every step"),
        _Option("gradient_as_bucket_view", bool, ("ddp",), "let gradients alias DDP's buckets to save memory"),
        _Option("bucket_cap_mb", (int, float), ("ddp",), "size of DDP's gradient buckets in MiB", positive=True),
        # ZeRO: forwarded to DeepSpeed's zero_optimization section.
        _Option("overlap_comm", bool, ("zero",), "overlap gradient reduction with the backward pass", engines=_DEEPSPEED),
        _Option("contiguous_gradients", bool, ("zero",), "copy gradients into one buffer as they are made", engines=_DEEPSPEED),
        _Option("reduce_bucket_size", int, ("zero",), "elements reduced at a time", positive=True, engines=_DEEPSPEED),
        _Option("allgather_bucket_size", int, ("zero",), "elements gathered at a time", zero_stages=(1, 2), positive=True, engines=_DEEPSPEED),
        _Option("round_robin_gradients", bool, ("zero",), "spread the copy of offloaded gradients over the ranks", zero_stages=(1, 2), engines=_DEEPSPEED),
        _Option("stage3_prefetch_bucket_size", int, ("zero",), "elements prefetched ahead of use", zero_stages=(3,), positive=True, engines=_DEEPSPEED),
        _Option("stage3_param_persistence_threshold", int, ("zero",), "parameters smaller than this stay whole", zero_stages=(3,),
                positive=True, engines=_DEEPSPEED),
        _Option("stage3_max_live_parameters", int, ("zero",), "parameters kept gathered at once", zero_stages=(3,), positive=True, engines=_DEEPSPEED),
        _Option("stage3_max_reuse_distance", int, ("zero",), "reuse distance under which a parameter stays gathered",
                zero_stages=(3,), positive=True, engines=_DEEPSPEED),
        _Option("sub_group_size", int, ("zero",), "parameter elements the optimizer steps at a time", zero_stages=(3,), positive=True, engines=_DEEPSPEED),
        _Option("pin_memory", bool, ("zero",), "page-lock offloaded CPU buffers for faster copies", needs_offload=True, engines=_DEEPSPEED),
        # FSDP2: the module classes to shard one by one (Accelerate's fsdp_transformer_layer_cls_to_wrap),
        # comma-separated; by default the model's transformer blocks (meshplan.fsdp.sharding_units).
        _Option("fsdp_layer_classes", str, ("zero", "tp"), "comma-separated class names FSDP2 shards one by one",
                engines=("fsdp2",)),
    )
}


# ZeRO options that DeepSpeed reads, under the same name, from its zero_optimization section.
ZERO_SECTION_OPTIONS = tuple(
    name for name, option in _OPTIONS.items() if option.engines == _DEEPSPEED and name != "pin_memory"
)

# Options whose values are integers: a JSON file may write them as integral floats (1e9).
INTEGER_OPTIONS = frozenset(name for name, option in _OPTIONS.items() if option.kind is int)


def _freeze_mapping(mapping: Mapping[str, Any] | None, field: str) -> tuple[tuple[str, Any], ...] | None:
    if mapping is None:
        return None
    for key in mapping:
        if not isinstance(key, str):
            raise PlanError(f"{field} key {shown(key)} must be a string.")
    return tuple(sorted(mapping.items()))


def normalize_precision(precision: str | None) -> str | None:
    """"no", "bf16" or "fp16" for an Accelerate or Lightning precision; None for other values.

    The one table between the two vocabularies: Lightning's "32-true", "bf16-mixed", ... and the
    "no", "bf16", "fp16" of Accelerate, the HF Trainer and DeepSpeed.
    """
    return _PRECISIONS.get(str(precision)) if precision is not None else None


_PRECISIONS = {
    "no": "no", "32": "no", "32-true": "no",
    "bf16": "bf16", "bf16-mixed": "bf16", "bf16-true": "bf16",
    "fp16": "fp16", "16": "fp16", "16-mixed": "fp16", "16-true": "fp16",
}


@dataclass(frozen=True)
class Plan:
    """A validated parallel layout.

    Attributes:
        strategy: ``"ddp"``, ``"zero"`` (ZeRO sharded data parallel) or ``"tp"`` (tensor parallel via DTensor).
        zero_stage: ZeRO stage 1, 2 or 3; 0 for the strategies that are not ZeRO.
        engine: what runs ZeRO: ``"deepspeed"`` or ``"fsdp2"`` (torch's ``fully_shard``, stages 2
            and 3); None for the strategies that are not ZeRO.
        offload_optimizer: keep ZeRO's optimizer state (and step) on the CPU.
        offload_parameters: keep ZeRO-3's parameters on the CPU between uses.
        tp_size: processes that share one tensor-parallel copy of the model; the rest of the
            world is a data-parallel dimension. None means every process of one node.
        tp_plan: ``(module pattern, style)`` pairs in the syntax of ``base_model_tp_plan``, or
            None to use the model's own plan (or meshplan's inferred one).
        data_parallel: what TensorParallel does across its data-parallel dimension:
            ``"replicate"`` (every replica holds the whole TP-sharded model) or ``"shard"`` (FSDP2
            shards it over the replicas, torchtitan's 2-D layout).
        options: ``(name, value)`` pairs of engine options, sorted by name.
    """

    strategy: str
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_parameters: bool = False
    tp_size: int | None = 1
    tp_plan: tuple[tuple[str, str], ...] | None = None
    options: tuple[tuple[str, Any], ...] = field(default=())
    engine: str | None = None
    data_parallel: str = "replicate"

    def __post_init__(self) -> None:
        if self.strategy == "zero" and self.engine is None:
            object.__setattr__(self, "engine", "deepspeed")  # frozen: the default engine, set once
        _validate(self)

    @classmethod
    def build(cls, strategy: str, *, tp_plan: Mapping[str, str] | None = None,
              options: Mapping[str, Any] | None = None, **fields: Any) -> "Plan":
        """Builds a Plan from plain mappings (what the strategy constructors receive)."""
        if tp_plan is not None and not isinstance(tp_plan, Mapping):
            raise PlanError(
                f"tp_plan={shown(tp_plan)} is not a mapping; pass a dict of module pattern -> style, "
                f'e.g. tp_plan={{"layers.*.self_attn.q_proj": "colwise"}}.'
            )
        return cls(strategy, tp_plan=_freeze_mapping(tp_plan, "tp_plan"), options=_freeze_mapping(options or {}, "option"),
                   **fields)

    def option(self, name: str, default: Any = None) -> Any:
        """The value of option ``name``, or ``default`` when it was not set."""
        return dict(self.options).get(name, default)

    @property
    def engine_options(self) -> dict[str, Any]:
        """The options forwarded to the engine (DDP or DeepSpeed), without the training settings."""
        return {name: value for name, value in self.options if name not in TRAINING_OPTIONS and name != "process_group_backend"}

    @property
    def uses_deepspeed(self) -> bool:
        """True when DeepSpeed runs this layout (ZeRO with engine="deepspeed")."""
        return self.strategy == "zero" and self.engine == "deepspeed"

    @property
    def uses_fsdp2(self) -> bool:
        """True when torch's FSDP2 (``fully_shard``) shards this layout: ZeRO on FSDP2, or TP x FSDP2."""
        return (self.strategy == "zero" and self.engine == "fsdp2") or (self.strategy == "tp" and self.data_parallel == "shard")

    @property
    def reshard_after_forward(self) -> bool:
        """FSDP2's ``reshard_after_forward``: free the gathered parameters after each forward.

        True for ZeRO-3 and TP x FSDP2 (parameters stay sharded between uses); False for ZeRO-2,
        whose parameters stay gathered from the forward to the backward, as DeepSpeed's stage 2 keeps them whole.
        """
        return self.uses_fsdp2 and not (self.strategy == "zero" and self.zero_stage == 2)

    @property
    def tp_plan_dict(self) -> dict[str, str] | None:
        """The user's TP plan as a dict, or None."""
        return None if self.tp_plan is None else dict(self.tp_plan)

    def resolved_tp_size(self, processes_per_node: int) -> int:
        """The tensor-parallel size; ``tp_size=None`` means every process of one node."""
        return self.tp_size or processes_per_node

    def check_world_size(self, world_size: int, processes_per_node: int) -> None:
        """Raises a PlanError when ``world_size`` processes cannot hold this layout."""
        # A tensor-parallel group is tp_size consecutive ranks, and launchers number ranks node by
        # node: a tp_size that does not divide the processes of a node puts a group on two nodes.
        tp_size = self.resolved_tp_size(processes_per_node)
        if world_size % tp_size:
            raise PlanError(
                f"tp_size={tp_size} does not divide the world size {world_size}: the world is split "
                f"into groups of tp_size processes. Use a tp_size that divides {world_size} "
                f"({', '.join(str(d) for d in _divisors(world_size))}) or launch a multiple of {tp_size} processes."
            )
        if processes_per_node % tp_size:
            # TP communicates inside every layer; across nodes that traffic would cross the network.
            raise PlanError(
                f"tp_size={tp_size} does not divide the {processes_per_node} processes of each node: a tensor-parallel "
                f"group would span nodes. Keep each group inside one node: use a tp_size that divides {processes_per_node} "
                f"({', '.join(str(d) for d in _divisors(processes_per_node))}), or run a multiple of {tp_size} processes "
                f"on every node (torchrun --nproc_per_node, Lightning's devices); data parallelism spans the nodes."
            )


def _divisors(number: int) -> list[int]:
    return [d for d in range(1, number + 1) if number % d == 0]


def _validate(plan: Plan) -> None:
    if plan.strategy not in STRATEGIES:
        raise PlanError(f"strategy={shown(plan.strategy)} is unknown; valid strategies are {', '.join(STRATEGIES)}.")
    _validate_zero(plan)
    _validate_fsdp2(plan)
    _validate_tp(plan)
    for name, value in plan.options:
        _validate_option(plan, name, value)


def _validate_zero(plan: Plan) -> None:
    if plan.strategy != "zero":
        if plan.zero_stage or plan.offload_optimizer or plan.offload_parameters:
            raise PlanError(f"zero_stage and offload apply only to the ZeRO strategy, not to strategy={plan.strategy!r}.")
        return
    if type(plan.zero_stage) is not int or plan.zero_stage not in ZERO_STAGES:
        raise PlanError(f"stage={shown(plan.zero_stage)} is not a ZeRO stage; valid stages are 1, 2 and 3.")
    for name in ("offload_optimizer", "offload_parameters"):
        if not isinstance(getattr(plan, name), bool):
            raise PlanError(f"{name}={shown(getattr(plan, name))} must be True or False.")
    if plan.offload_parameters and plan.zero_stage != 3:
        raise PlanError(
            f"offload_parameters=True needs stage=3, but stage={plan.zero_stage}: only ZeRO-3 partitions the "
            f"parameters, so only ZeRO-3 can offload them. Use ZeRO(stage=3, offload_parameters=True) or "
            f"offload_optimizer=True alone."
        )


def _validate_fsdp2(plan: Plan) -> None:
    if plan.strategy != "zero":
        if plan.engine is not None:
            raise PlanError(f"engine={shown(plan.engine)} applies only to the ZeRO strategy, not to strategy={plan.strategy!r}.")
    elif plan.engine not in ZERO_ENGINES:
        raise PlanError(f"engine={shown(plan.engine)} is unknown; valid ZeRO engines are {', '.join(ZERO_ENGINES)}.")
    if plan.strategy == "zero" and plan.engine == "fsdp2":
        if plan.zero_stage not in FSDP2_STAGES:
            raise PlanError(
                f"stage={plan.zero_stage} with engine='fsdp2': FSDP2 always shards gradients with the optimizer state, "
                f"so it runs stages 2 and 3 only. Use ZeRO(stage=1, engine='deepspeed') to shard the optimizer "
                f"state alone, or ZeRO(stage=2, engine='fsdp2')."
            )
        if plan.offload_optimizer or plan.offload_parameters:
            raise PlanError(
                "offload_optimizer and offload_parameters need engine='deepspeed': meshplan does not offload under "
                "FSDP2. Use ZeRO(stage=3, engine='deepspeed', offload_optimizer=True, offload_parameters=True) to "
                "keep optimizer state and parameters in CPU memory."
            )
    if plan.data_parallel not in DATA_PARALLEL_MODES:
        raise PlanError(f"data_parallel={shown(plan.data_parallel)} is unknown; valid values are "
                        f"{', '.join(map(repr, DATA_PARALLEL_MODES))}.")
    if plan.strategy != "tp" and plan.data_parallel != "replicate":
        raise PlanError(
            f"data_parallel={plan.data_parallel!r} applies only to TensorParallel, not to strategy={plan.strategy!r}; "
            f"sharded data parallelism without TP is ZeRO(stage=3, engine='fsdp2') (or DeepSpeed's ZeRO)."
        )


def _validate_tp(plan: Plan) -> None:
    if plan.strategy == "tp" and plan.tp_size is None:
        pass  # resolved to the processes of one node when the world is known
    elif isinstance(plan.tp_size, bool) or not isinstance(plan.tp_size, int) or plan.tp_size < 1:
        raise PlanError(f"tp_size={shown(plan.tp_size)} must be a positive integer (or None: every process of a node).")
    if plan.strategy != "tp":
        if plan.tp_size != 1 or plan.tp_plan is not None:
            raise PlanError(f"tp_size and tp_plan apply only to TensorParallel, not to strategy={plan.strategy!r}.")
        return
    for pattern, style in plan.tp_plan or ():
        if not isinstance(pattern, str) or not pattern:
            raise PlanError(f"tp_plan key {shown(pattern)} must be a module pattern such as 'layers.*.self_attn.q_proj'.")
        if not isinstance(style, str) or style not in TP_STYLES:
            raise PlanError(f"tp_plan[{shown(pattern)}]={shown(style)} is not a style meshplan applies; valid styles "
                            f"are {', '.join(TP_STYLES)}.")


def _engine_honours(plan: Plan, spec: _Option) -> bool:
    """True when the engine that runs ``plan`` reads option ``spec`` (FSDP2 options need FSDP2)."""
    if plan.strategy == "zero":
        return plan.engine in spec.engines
    return spec.engines != ("fsdp2",) or plan.uses_fsdp2


def _positive_finite(value: int | float) -> bool:
    # NaN compares false with everything, so "value <= 0" alone would let it (and infinity) through;
    # math.isfinite cannot take an integer too large for a float, and every integer is finite.
    return value > 0 and (isinstance(value, int) or math.isfinite(value))


def _validate_option(plan: Plan, name: str, value: Any) -> None:
    spec = _OPTIONS.get(name)
    # Both sides are cut: a recipe's header may hold any name and any value.
    setting = f"{shown_key(name)}={shown(value)}"
    if spec is None or plan.strategy not in spec.strategies:
        allowed = sorted(o.name for o in _OPTIONS.values() if plan.strategy in o.strategies)
        raise PlanError(f"option {setting} is unknown for strategy={plan.strategy!r}; valid options are "
                        f"{', '.join(allowed)}.")
    if isinstance(value, bool) and spec.kind is not bool or not isinstance(value, spec.kind):
        kind = spec.kind.__name__ if isinstance(spec.kind, type) else " or ".join(k.__name__ for k in spec.kind)
        raise PlanError(f"option {setting} must be of type {kind} ({spec.doc}).")
    if spec.positive and not _positive_finite(value):
        raise PlanError(f"option {setting} must be a positive finite number ({spec.doc}).")
    if spec.choices is not None and value not in spec.choices:
        raise PlanError(f"option {setting} is unknown; valid values are {', '.join(spec.choices)}.")
    if not _engine_honours(plan, spec):
        if plan.strategy == "tp":
            raise PlanError(f"option {setting} applies only to FSDP2, which TensorParallel uses with "
                            f"data_parallel='shard', not with data_parallel={plan.data_parallel!r}.")
        raise PlanError(f"option {setting} applies only to engine={spec.engines[0]!r}, not to ZeRO with "
                        f"engine={plan.engine!r}; use ZeRO(..., engine={spec.engines[0]!r}) for it, or drop it.")
    if plan.strategy == "zero" and plan.zero_stage not in spec.zero_stages:
        stages = " or ".join(str(s) for s in spec.zero_stages)
        raise PlanError(f"option {setting} contradicts stage={plan.zero_stage}: it applies only to ZeRO stage {stages}.")
    if spec.needs_offload and not (plan.offload_optimizer or plan.offload_parameters):
        raise PlanError(
            f"option {setting} contradicts offload_optimizer=False and offload_parameters=False: "
            f"it applies only to offloaded buffers; enable an offload or drop {name}."
        )
