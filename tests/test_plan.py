"""Tier 1: layouts are validated on construction, and every error names the field at fault."""

from __future__ import annotations

import pytest
from lightning.pytorch.strategies import StrategyRegistry

import meshplan
from meshplan import DDP, PlanError, TensorParallel, ZeRO
from meshplan._compat.lightning import ddp_keyword_arguments
from meshplan.deepspeed_config import deepspeed_config
from meshplan.plan import Plan


def test_plan_error_is_a_value_error() -> None:
    assert issubclass(PlanError, ValueError)


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: ZeRO(stage=4), "stage=4"),
        (lambda: ZeRO(stage=0), "stage=0"),
        (lambda: ZeRO(stage="3"), "stage='3'"),
        (lambda: ZeRO(stage=2, offload_parameters=True), "offload_parameters=True"),
        (lambda: ZeRO(stage=1, offload_parameters=True, offload_optimizer=True), "offload_parameters=True"),
        (lambda: ZeRO(stage=3, offload_optimizer="yes"), "offload_optimizer='yes'"),
        (lambda: TensorParallel(tp_size=0), "tp_size=0"),
        (lambda: TensorParallel(tp_size=2.0), "tp_size=2.0"),
        (lambda: TensorParallel(tp_size=2, tp_plan=["q_proj"]), "tp_plan=['q_proj']"),
        (lambda: TensorParallel(tp_size=2, tp_plan={"layers.*.q_proj": "diagonal"}), "tp_plan['layers.*.q_proj']='diagonal'"),
        (lambda: DDP(find_unused_parameter=True), "find_unused_parameter=True"),
        (lambda: DDP(bucket_cap_mb=-1), "bucket_cap_mb=-1"),
        (lambda: DDP(static_graph="yes"), "static_graph='yes'"),
        (lambda: DDP(process_group_backend="tcp"), "process_group_backend='tcp'"),
        (lambda: ZeRO(stage=2, overlap_comm=1), "overlap_comm=1"),
        (lambda: ZeRO(stage=2, reduce_bucket_size=0), "reduce_bucket_size=0"),
        (lambda: ZeRO(stage=2, find_unused_parameters=True), "find_unused_parameters=True"),
        (lambda: TensorParallel(tp_size=2, overlap_comm=True), "overlap_comm=True"),
    ],
)
def test_invalid_layouts_raise_plan_errors_naming_the_field(build, field: str) -> None:
    with pytest.raises(PlanError) as error:
        build()
    assert field in str(error.value)


@pytest.mark.parametrize(
    ("build", "fields"),
    [
        # Options that only make sense for another stage, or without the offload they tune.
        (lambda: ZeRO(stage=2, stage3_prefetch_bucket_size=10), ("stage3_prefetch_bucket_size=10", "stage=2")),
        (lambda: ZeRO(stage=3, allgather_bucket_size=10), ("allgather_bucket_size=10", "stage=3")),
        (lambda: ZeRO(stage=2, sub_group_size=10), ("sub_group_size=10", "stage=2")),
        (lambda: ZeRO(stage=3, round_robin_gradients=True), ("round_robin_gradients=True", "stage=3")),
        (lambda: ZeRO(stage=3, pin_memory=True), ("pin_memory=True", "offload_optimizer=False")),
    ],
)
def test_contradictory_options_name_both_sides(build, fields: tuple[str, str]) -> None:
    with pytest.raises(PlanError, match="contradicts") as error:
        build()
    for field in fields:
        assert field in str(error.value)


# The Plan itself, as recipes and the strategies build it: every invalid field is refused by name.
@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: Plan("fsdp"), "strategy='fsdp'"),
        (lambda: Plan("ddp", zero_stage=2), "zero_stage"),
        (lambda: Plan("tp", offload_optimizer=True), "offload"),
        (lambda: Plan("zero", zero_stage=True), "stage=True"),
        (lambda: Plan("zero", zero_stage=3, offload_parameters="yes"), "offload_parameters='yes'"),
        (lambda: Plan("ddp", tp_size=2), "tp_size"),
        (lambda: Plan("tp", tp_size=True), "tp_size=True"),
        (lambda: Plan("tp", tp_size=-2), "tp_size=-2"),
        (lambda: Plan.build("zero", zero_stage=1, tp_plan={"lm_head": "colwise"}), "tp_plan"),
        (lambda: Plan.build("tp", tp_plan="q_proj=colwise"), "tp_plan='q_proj=colwise'"),
        (lambda: Plan.build("tp", tp_plan={1: "colwise"}), "tp_plan key 1"),
        (lambda: Plan.build("tp", tp_plan={"": "colwise"}), "tp_plan key ''"),
        (lambda: Plan.build("tp", tp_plan={"lm_head": None}), "tp_plan['lm_head']=None"),
        (lambda: Plan.build("ddp", options={3: True}), "option key 3"),
        (lambda: Plan.build("ddp", options={"mixed_precision": "fp8"}), "mixed_precision='fp8'"),
        (lambda: Plan.build("ddp", options={"gradient_accumulation_steps": True}), "gradient_accumulation_steps=True"),
        (lambda: Plan.build("zero", zero_stage=2, options={"gradient_clipping": float("nan")}), "gradient_clipping=nan"),
        (lambda: Plan.build("tp", options={"static_graph": True}), "static_graph=True"),
    ],
)
def test_each_invalid_plan_field_is_a_plan_error_naming_it(build, field: str) -> None:
    with pytest.raises(PlanError) as error:
        build()
    assert field in str(error.value)


# The two ZeRO engines and TensorParallel's two data-parallel modes: what each refuses, and why.
@pytest.mark.parametrize(
    ("build", "fields"),
    [
        (lambda: Plan("zero", zero_stage=1, engine="fsdp2"), ("stage=1", "engine='fsdp2'", "engine='deepspeed'")),
        (lambda: Plan("zero", zero_stage=3, engine="fsdp2", offload_optimizer=True), ("offload_optimizer", "engine='deepspeed'")),
        (lambda: Plan("zero", zero_stage=3, engine="fsdp2", offload_parameters=True), ("offload_parameters", "engine='deepspeed'")),
        (lambda: Plan("zero", zero_stage=3, engine="fsdp"), ("engine='fsdp'", "deepspeed, fsdp2")),
        (lambda: Plan("ddp", engine="fsdp2"), ("engine='fsdp2'", "strategy='ddp'")),
        (lambda: Plan("tp", engine="deepspeed"), ("engine='deepspeed'", "strategy='tp'")),
        (lambda: Plan("tp", data_parallel="shared"), ("data_parallel='shared'", "'replicate', 'shard'")),
        (lambda: Plan("zero", zero_stage=3, data_parallel="shard"), ("data_parallel='shard'", "engine='fsdp2'")),
        (lambda: Plan("ddp", data_parallel="shard"), ("data_parallel='shard'", "TensorParallel")),
        (lambda: Plan.build("zero", zero_stage=3, engine="fsdp2", options={"overlap_comm": True}),
         ("overlap_comm=True", "engine='deepspeed'", "engine='fsdp2'")),
        (lambda: Plan.build("zero", zero_stage=3, engine="fsdp2", options={"stage3_prefetch_bucket_size": 10}),
         ("stage3_prefetch_bucket_size=10", "engine='deepspeed'")),
        (lambda: Plan.build("zero", zero_stage=3, options={"fsdp_layer_classes": "LlamaDecoderLayer"}),
         ("fsdp_layer_classes='LlamaDecoderLayer'", "engine='fsdp2'", "engine='deepspeed'")),
        (lambda: Plan.build("tp", tp_size=2, options={"fsdp_layer_classes": "LlamaDecoderLayer"}),
         ("fsdp_layer_classes='LlamaDecoderLayer'", "data_parallel='shard'")),
        (lambda: Plan.build("ddp", options={"fsdp_layer_classes": "LlamaDecoderLayer"}), ("fsdp_layer_classes",)),
    ],
)
def test_engines_and_data_parallel_modes_refuse_what_they_cannot_run(build, fields: tuple[str, ...]) -> None:
    with pytest.raises(PlanError) as error:
        build()
    for field in fields:
        assert field in str(error.value)


def test_zero_runs_on_deepspeed_unless_told_otherwise() -> None:
    assert Plan("zero", zero_stage=2).engine == "deepspeed"
    assert Plan("zero", zero_stage=2) == Plan("zero", zero_stage=2, engine="deepspeed")
    assert Plan("ddp").engine is None and Plan("tp").engine is None
    assert Plan("zero", zero_stage=3).uses_deepspeed and not Plan("zero", zero_stage=3).uses_fsdp2


@pytest.mark.parametrize(
    ("plan", "reshards"),
    [
        (Plan("zero", zero_stage=3, engine="fsdp2"), True),   # parameters sharded between uses, as ZeRO-3
        (Plan("zero", zero_stage=2, engine="fsdp2"), False),  # parameters kept whole from forward to backward
        (Plan("tp", tp_size=2, data_parallel="shard"), True),
    ],
)
def test_fsdp2_layouts_reshard_after_forward_as_their_stage_says(plan: Plan, reshards: bool) -> None:
    assert plan.uses_fsdp2 and not plan.uses_deepspeed
    assert plan.reshard_after_forward is reshards


def test_fsdp2_layouts_take_fsdp_layer_classes_and_the_training_settings() -> None:
    plan = Plan.build("tp", tp_size=2, data_parallel="shard",
                      options={"fsdp_layer_classes": "LlamaDecoderLayer", "gradient_clipping": 1.0})
    assert plan.option("fsdp_layer_classes") == "LlamaDecoderLayer" and plan.option("gradient_clipping") == 1.0
    assert not Plan("tp", tp_size=2).uses_fsdp2 and not Plan("tp", tp_size=2).reshard_after_forward


def test_unknown_option_lists_the_valid_ones() -> None:
    with pytest.raises(PlanError) as error:
        DDP(bucket_cap=25)
    assert "bucket_cap_mb" in str(error.value) and "find_unused_parameters" in str(error.value)


def test_world_size_not_divisible_by_tp_size() -> None:
    plan = TensorParallel(tp_size=3).plan
    with pytest.raises(PlanError, match=r"tp_size=3 does not divide the world size 4"):
        plan.check_world_size(4, processes_per_node=4)
    plan.check_world_size(6, processes_per_node=6)


def test_a_tensor_parallel_group_split_across_nodes_is_refused() -> None:
    # Two nodes of one process: tp_size=2 divides the world of 2, but each TP group would span both nodes.
    with pytest.raises(PlanError, match=r"tp_size=2 does not divide the 1 processes of each node: a tensor-parallel "
                                        r"group would span nodes") as error:
        TensorParallel(tp_size=2).plan.check_world_size(2, processes_per_node=1)
    assert "run a multiple of 2 processes on every node" in str(error.value)
    with pytest.raises(PlanError, match="tp_size=4 does not divide the 2 processes of each node"):
        TensorParallel(tp_size=4).plan.check_world_size(8, processes_per_node=2)
    TensorParallel(tp_size=2).plan.check_world_size(4, processes_per_node=2)  # tp-dp: TP inside each node, DP across
    TensorParallel().plan.check_world_size(6, processes_per_node=3)  # None: every process of one node
    DDP().plan.check_world_size(2, processes_per_node=1)  # nothing to split without TP


def test_tp_size_none_means_every_process_of_a_node() -> None:
    plan = TensorParallel().plan
    assert plan.tp_size is None
    assert plan.resolved_tp_size(processes_per_node=4) == 4


def test_strategies_compare_by_plan() -> None:
    assert ZeRO(stage=3, offload_optimizer=True) == ZeRO(stage=3, offload_optimizer=True)
    assert ZeRO(stage=3) != ZeRO(stage=2)
    assert DDP(static_graph=True) != DDP()
    assert TensorParallel(tp_size=2, tp_plan={"a": "colwise"}) == TensorParallel(tp_size=2, tp_plan={"a": "colwise"})
    assert DDP() != ZeRO(stage=1)


def test_options_reach_the_engines() -> None:
    assert ddp_keyword_arguments(DDP(static_graph=True, bucket_cap_mb=50)) == {"bucket_cap_mb": 50, "static_graph": True}
    assert DDP(process_group_backend="gloo").process_group_backend == "gloo"
    zero = ZeRO(stage=3, offload_optimizer=True, pin_memory=True, stage3_max_live_parameters=1000)
    assert zero.config["zero_optimization"] == {
        "stage": 3,
        "stage3_max_live_parameters": 1000,
        "stage3_gather_16bit_weights_on_model_save": True,  # what the front ends' documented saves need
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
    }
    assert "stage3_gather_16bit_weights_on_model_save" not in ZeRO(stage=2).config["zero_optimization"]


def test_registered_names_resolve_to_meshplan_strategies() -> None:
    expected = {
        "meshplan_ddp": DDP(),
        "meshplan_zero1": ZeRO(stage=1),
        "meshplan_zero2": ZeRO(stage=2),
        "meshplan_zero3": ZeRO(stage=3),
        "meshplan_zero3_offload": ZeRO(stage=3, offload_optimizer=True, offload_parameters=True),
        "meshplan_tp": TensorParallel(tp_size=None),
    }
    for name, strategy in expected.items():
        assert StrategyRegistry.get(name) == strategy, name


def test_deepspeed_config_renders_one_plan_for_every_front_end() -> None:
    plan = Plan.build("zero", zero_stage=2, options={"overlap_comm": False})
    config = deepspeed_config(
        plan, micro_batch_size=4, gradient_accumulation_steps=2, gradient_clipping=1.0, precision="bf16-mixed"
    )
    assert config == {
        "zero_optimization": {"stage": 2, "overlap_comm": False},
        "zero_allow_untested_optimizer": True,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
    }


def test_offload_keeps_the_users_optimizer() -> None:
    config = deepspeed_config(ZeRO(stage=3, offload_optimizer=True, offload_parameters=True).plan)
    assert config["zero_force_ds_cpu_optimizer"] is False
    assert config["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": False}


def test_deepspeed_config_refuses_other_strategies_and_precisions() -> None:
    with pytest.raises(PlanError, match="strategy='ddp'"):
        deepspeed_config(DDP().plan)
    with pytest.raises(PlanError, match="precision='fp8'"):
        deepspeed_config(ZeRO(stage=1).plan, precision="fp8")


def test_public_names() -> None:
    for name in ("DDP", "ZeRO", "TensorParallel", "PlanError", "from_recipe", "accelerator"):
        assert hasattr(meshplan, name)
    assert callable(meshplan.testing.spawn)
    for strategy in (DDP(), ZeRO(stage=1), TensorParallel(tp_size=2)):
        assert callable(strategy.to_recipe) and callable(strategy.training_arguments)
