"""Tier 1: strategies round-trip through Accelerate config files; foreign configs are read or refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file

import meshplan
from meshplan import DDP, PlanError, TensorParallel, ZeRO
from meshplan.accelerate import resolve_plan
from meshplan.finetune.job import FinetuneJob
from meshplan.plan import Plan
from meshplan.recipes import (CATALOGUE_DIR, RECIPE_VARIABLE, Recipe, catalogue, catalogue_names, find_recipe,
                              launched_recipe_extras, plan_from_environment, read_recipe, write_recipe)

ROUND_TRIP = [
    DDP(),
    DDP(find_unused_parameters=True, static_graph=True, gradient_as_bucket_view=True, bucket_cap_mb=10,
        process_group_backend="gloo"),
    DDP(mixed_precision="bf16", gradient_accumulation_steps=4, gradient_clipping=0.5),
    DDP(mixed_precision="no"),
    ZeRO(stage=1),
    ZeRO(stage=2, overlap_comm=False, contiguous_gradients=True, reduce_bucket_size=1000, allgather_bucket_size=2000,
         round_robin_gradients=True),
    ZeRO(stage=2, offload_optimizer=True, pin_memory=True, mixed_precision="fp16"),
    ZeRO(stage=3),
    ZeRO(stage=3, offload_optimizer=True, offload_parameters=True, stage3_prefetch_bucket_size=10,
         stage3_param_persistence_threshold=20, stage3_max_live_parameters=30, stage3_max_reuse_distance=40,
         sub_group_size=50,
         gradient_accumulation_steps=2, gradient_clipping=1.0, process_group_backend="gloo"),
    TensorParallel(tp_size=2),
    TensorParallel(tp_size=1),
    TensorParallel(),
    TensorParallel(tp_size=4, tp_plan={"layers.*.self_attn.q_proj": "colwise", "lm_head": "colwise_rep"}),
    ZeRO(stage=3, engine="fsdp2"),
    ZeRO(stage=2, engine="fsdp2", fsdp_layer_classes="LlamaDecoderLayer", mixed_precision="bf16",
         gradient_accumulation_steps=2),
    TensorParallel(tp_size=2, data_parallel="shard"),
    TensorParallel(tp_size=1, data_parallel="shard"),
    TensorParallel(data_parallel="shard", fsdp_layer_classes="LlamaDecoderLayer,LlamaMLP"),
]

EXPECTED_CATALOGUE = {
    "ddp.yaml": (DDP(), 2, 1),
    "zero1.yaml": (ZeRO(stage=1), 2, 1),
    "zero2.yaml": (ZeRO(stage=2), 2, 1),
    "zero3.yaml": (ZeRO(stage=3), 2, 1),
    "zero3-offload.yaml": (ZeRO(stage=3, offload_optimizer=True, offload_parameters=True), 2, 1),
    "tp.yaml": (TensorParallel(tp_size=2), 2, 1),
    "tp-dp.yaml": (TensorParallel(tp_size=2), 4, 1),
    "ddp-2node.yaml": (DDP(), 2, 2),
    "zero3-2node.yaml": (ZeRO(stage=3), 2, 2),
    "fsdp2.yaml": (ZeRO(stage=3, engine="fsdp2"), 2, 1),
    "tp-fsdp.yaml": (TensorParallel(tp_size=2, data_parallel="shard"), 4, 1),
}


@pytest.mark.parametrize("strategy", ROUND_TRIP, ids=repr)
def test_round_trip_is_the_identity(strategy, tmp_path: Path) -> None:
    path = strategy.to_recipe(tmp_path / "recipe.yaml", num_processes=4)
    assert meshplan.from_recipe(path) == strategy
    load_config_from_file(str(path))  # what `accelerate launch --config_file` does first


def test_the_catalogue_holds_every_recipe_with_its_layout() -> None:
    recipes = catalogue()
    assert set(recipes) == set(EXPECTED_CATALOGUE)
    for name, (strategy, processes, machines) in EXPECTED_CATALOGUE.items():
        assert meshplan.from_recipe(CATALOGUE_DIR / name) == strategy, name
        assert (recipes[name].num_processes, recipes[name].num_machines) == (processes, machines), name
        assert recipes[name].description.startswith(name.removesuffix(".yaml") + ":"), name
        config = load_config_from_file(str(CATALOGUE_DIR / name))
        assert config.num_processes == processes and config.num_machines == machines


def test_the_repository_recipes_folder_is_the_catalogue() -> None:
    assert (Path(__file__).parents[1] / "recipes" / "zero3.yaml").read_text() == (CATALOGUE_DIR / "zero3.yaml").read_text()


@pytest.mark.parametrize("name", catalogue_names())
def test_every_catalogue_recipe_written_back_reads_as_itself(name: str, tmp_path: Path) -> None:
    recipe = read_recipe(CATALOGUE_DIR / name)
    path = write_recipe(recipe.plan, tmp_path / name, num_processes=recipe.num_processes,
                        num_machines=recipe.num_machines, description=recipe.description)
    assert read_recipe(path) == recipe


PLANS = [
    Plan.build("ddp", options={"bucket_cap_mb": 25, "process_group_backend": "gloo"}),
    Plan.build("zero", zero_stage=3, offload_optimizer=True, offload_parameters=True,
               options={"gradient_clipping": 0.5, "stage3_max_live_parameters": 10 ** 9, "pin_memory": True}),
    Plan.build("tp", tp_size=None, tp_plan={"layers.*.mlp.up_proj": "colwise", "layers.*.mlp.down_proj": "rowwise"}),
    Plan.build("tp", tp_size=2, options={"mixed_precision": "bf16", "gradient_accumulation_steps": 4}),
]


@pytest.mark.parametrize("plan", PLANS, ids=lambda plan: plan.strategy)
def test_a_plan_written_then_read_is_the_same_recipe(plan: Plan, tmp_path: Path) -> None:
    description = "Two machines of two processes.\nWritten by a test."
    path = write_recipe(plan, tmp_path / "recipe.yaml", num_processes=4, num_machines=2, description=description)
    assert read_recipe(path) == Recipe(plan, num_processes=4, num_machines=2, description=description)


def _write(tmp_path: Path, config: dict, name: str = "foreign.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    ("config", "strategy"),
    [
        ({"distributed_type": "MULTI_GPU", "num_processes": 8, "mixed_precision": "bf16"}, DDP(mixed_precision="bf16")),
        ({"distributed_type": "MULTI_CPU", "num_processes": 4}, DDP()),
        ({"distributed_type": "NO"}, DDP()),
        ({"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 3, "offload_optimizer_device": "cpu",
          "offload_param_device": "none", "zero3_init_flag": True, "gradient_accumulation_steps": 2}},
         ZeRO(stage=3, offload_optimizer=True, gradient_accumulation_steps=2)),
        ({"distributed_type": "MULTI_GPU", "parallelism_config": {"parallelism_config_tp_size": 4,
          "parallelism_config_dp_replicate_size": 1}}, TensorParallel(tp_size=4)),
    ],
)
def test_reads_accelerate_configs_it_did_not_write(config: dict, strategy, tmp_path: Path) -> None:
    assert meshplan.from_recipe(_write(tmp_path, config)) == strategy


def test_reads_a_deepspeed_config_file(tmp_path: Path) -> None:
    (tmp_path / "ds.json").write_text(json.dumps({
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "bf16": {"enabled": True},
        "zero_optimization": {"stage": 2, "overlap_comm": True, "reduce_bucket_size": "auto",
                              "offload_optimizer": {"device": "cpu", "pin_memory": True}},
    }))
    path = _write(tmp_path, {"distributed_type": "DEEPSPEED", "deepspeed_config": {"deepspeed_config_file": "ds.json"}})
    assert meshplan.from_recipe(path) == ZeRO(stage=2, offload_optimizer=True, overlap_comm=True, pin_memory=True,
                                              mixed_precision="bf16")


def test_a_header_tp_plan_needs_a_tp_layout(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text('# meshplan: {"tp_plan": {"a": "colwise"}}\ndistributed_type: MULTI_GPU\n')
    with pytest.raises(PlanError, match="tp_plan"):
        meshplan.from_recipe(path)


def test_to_recipe_refuses_a_process_count_the_layout_cannot_take(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="tp_size=4 does not divide the world size 2"):
        TensorParallel(tp_size=4).to_recipe(tmp_path / "r.yaml", num_processes=2)


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"distributed_type": "MULTI_GPU", "bogus_key": 1}, "'bogus_key'"),
        ({"distributed_type": "FSDP", "fsdp_config": {"fsdp_version": 2, "fsdp_offload_params": True}},
         "fsdp_config.fsdp_offload_params=True"),
        ({"distributed_type": "FSDP", "fsdp_config": {"fsdp_version": 2, "fsdp_activation_checkpointing": True}},
         "fsdp_config.fsdp_activation_checkpointing=True"),
        ({"distributed_type": "FSDP", "fsdp_config": {"fsdp_version": 2, "fsdp_cpu_ram_efficient_loading": True}},
         "fsdp_config.fsdp_cpu_ram_efficient_loading=True"),
        ({"distributed_type": "FSDP", "fsdp_config": {"fsdp_version": 2, "fsdp_auto_wrap_policy": "SIZE_BASED_WRAP"}},
         "fsdp_config.fsdp_auto_wrap_policy='SIZE_BASED_WRAP'"),
        ({"distributed_type": "FSDP", "fsdp_config": {"fsdp_version": 2, "fsdp_reshard_after_forward": "FULL_SHARD"}},
         "fsdp_config.fsdp_reshard_after_forward='FULL_SHARD'"),
        ({"distributed_type": "FSDP", "fsdp_config": {"fsdp_version": 2, "fsdp_mystery": 1}}, "fsdp_config.fsdp_mystery"),
        ({"distributed_type": "FSDP", "fsdp_config": {"fsdp_version": 2},
          "parallelism_config": {"parallelism_config_dp_replicate_size": 2}}, "parallelism_config_dp_replicate_size=2"),
        ({"distributed_type": "MEGATRON_LM"}, "distributed_type='MEGATRON_LM'"),
        ({"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 2, "offload_optimizer_device": "nvme"}},
         "offload_optimizer_device='nvme'"),
        ({"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 5}}, "stage=5"),
        ({"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 2, "moe_layers": 3}}, "deepspeed_config.moe_layers"),
        ({"distributed_type": "MULTI_GPU", "parallelism_config": {"parallelism_config_dp_shard_size": 2,
          "parallelism_config_tp_size": 2}}, "parallelism_config.parallelism_config_dp_shard_size=2"),
        ({"distributed_type": "MULTI_GPU", "num_processes": "many"}, "num_processes='many'"),
        ({"distributed_type": "MULTI_GPU", "parallelism_config": [2]}, "parallelism_config must be a mapping"),
        ({"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 2.5}}, "deepspeed_config.zero_stage=2.5"),
        ({"distributed_type": "MULTI_GPU", "dynamo_config": {"dynamo_backend": "INDUCTOR"}}, "dynamo_config.dynamo_backend"),
    ],
)
def test_what_meshplan_cannot_honour_is_a_plan_error_naming_the_key(config: dict, key: str, tmp_path: Path) -> None:
    with pytest.raises(PlanError) as error:
        meshplan.from_recipe(_write(tmp_path, config))
    assert key in str(error.value)


@pytest.mark.parametrize(
    ("config", "keys"),
    [
        ({"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 2, "offload_param_device": "cpu"}},
         ("offload_parameters=True", "stage=2")),
        ({"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 2},
          "parallelism_config": {"parallelism_config_tp_size": 2}}, ("DEEPSPEED", "parallelism_config_tp_size")),
        ({"distributed_type": "DEEPSPEED", "deepspeed_config": {"deepspeed_config_file": "ds.json", "zero_stage": 3}},
         ("deepspeed_config.zero_stage", "deepspeed_config_file")),
        ({"distributed_type": "MULTI_GPU", "deepspeed_config": {"zero_stage": 2}}, ("MULTI_GPU", "deepspeed_config")),
        ({"distributed_type": "DEEPSPEED", "mixed_precision": "fp16", "deepspeed_config": {"deepspeed_config_file": "bf16.json"}},
         ("mixed_precision='fp16'", "deepspeed_config_file")),
        ({"distributed_type": "MULTI_GPU", "fsdp_config": {"fsdp_version": 2}}, ("MULTI_GPU", "fsdp_config")),
        ({"distributed_type": "FSDP", "num_processes": 8, "fsdp_config": {"fsdp_version": 2}, "parallelism_config": {
          "parallelism_config_dp_shard_size": 2, "parallelism_config_tp_size": 2}},
         ("parallelism_config_dp_shard_size=2", "num_processes=8")),
    ],
)
def test_contradictory_pairs_name_both_keys(config: dict, keys: tuple[str, str], tmp_path: Path) -> None:
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    (tmp_path / "bf16.json").write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    with pytest.raises(PlanError) as error:
        meshplan.from_recipe(_write(tmp_path, config))
    for key in keys:
        assert key in str(error.value)


# Accelerate's native FSDP2 configs, as `accelerate config` and `accelerate to-fsdp2` write them.
NATIVE_FSDP2 = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "FSDP", "num_processes": 4,
                "mixed_precision": "bf16", "fsdp_config": {
                    "fsdp_version": 2, "fsdp_reshard_after_forward": True, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                    "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer", "fsdp_state_dict_type": "FULL_STATE_DICT",
                    "fsdp_offload_params": False, "fsdp_cpu_ram_efficient_loading": False,
                    "fsdp_activation_checkpointing": False}}


@pytest.mark.parametrize(
    ("change", "strategy"),
    [
        ({}, ZeRO(stage=3, engine="fsdp2", fsdp_layer_classes="LlamaDecoderLayer", mixed_precision="bf16")),
        ({"fsdp_reshard_after_forward": False},
         ZeRO(stage=2, engine="fsdp2", fsdp_layer_classes="LlamaDecoderLayer", mixed_precision="bf16")),
        ({"parallelism_config": {"parallelism_config_dp_shard_size": 2, "parallelism_config_tp_size": 2}},
         TensorParallel(tp_size=2, data_parallel="shard", fsdp_layer_classes="LlamaDecoderLayer", mixed_precision="bf16")),
        # A tp size of 1 (which the launcher exports with any parallelism_config) is no tensor parallelism.
        ({"parallelism_config": {"parallelism_config_dp_shard_size": 4, "parallelism_config_tp_size": 1}},
         ZeRO(stage=3, engine="fsdp2", fsdp_layer_classes="LlamaDecoderLayer", mixed_precision="bf16")),
    ],
    ids=["reshard-is-zero3", "no-reshard-is-zero2", "with-tp-is-tp-fsdp", "tp-size-1-is-zero3"],
)
def test_reads_native_fsdp2_configs(change: dict, strategy, tmp_path: Path) -> None:
    config = {**NATIVE_FSDP2, "fsdp_config": dict(NATIVE_FSDP2["fsdp_config"])}
    config["fsdp_config"].update({key: value for key, value in change.items() if key != "parallelism_config"})
    if "parallelism_config" in change:
        config["parallelism_config"] = change["parallelism_config"]
    path = _write(tmp_path, config)
    load_config_from_file(str(path))  # a valid Accelerate config
    assert meshplan.from_recipe(path) == strategy


@pytest.mark.parametrize("fsdp_config", [{"fsdp_version": 1, "fsdp_sharding_strategy": "FULL_SHARD"},
                                         {"fsdp_sharding_strategy": "FULL_SHARD"}], ids=["version-1", "no-version"])
def test_an_fsdp1_config_is_refused_with_the_conversion_command(fsdp_config: dict, tmp_path: Path) -> None:
    with pytest.raises(PlanError, match=r"fsdp_config.fsdp_version=(1|None).*accelerate to-fsdp2"):
        meshplan.from_recipe(_write(tmp_path, {"distributed_type": "FSDP", "fsdp_config": fsdp_config}))


def test_a_deepspeed_file_with_its_own_optimizer_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}))
    path = _write(tmp_path, {"distributed_type": "DEEPSPEED", "deepspeed_config": {"deepspeed_config_file": "ds.json"}})
    with pytest.raises(PlanError, match="key optimizer in DeepSpeed config '.*ds.json' is not honoured"):
        meshplan.from_recipe(path)


# The ZeRO-3 template of the transformers docs (docs/source/en/deepspeed.md): its zero_optimization
# section, with the top-level keys of the docs' complete example, whose optimizer and scheduler
# sections are tested apart below.
HF_ZERO3_TEMPLATE = """
{
    "fp16": {
        "enabled": "auto",
        "loss_scale": 0,
        "loss_scale_window": 1000,
        "initial_scale_power": 16,
        "hysteresis": 2,
        "min_loss_scale": 1
    },
    "bf16": {
        "enabled": "auto"
    },
    "zero_optimization": {
        "stage": 3,
        "offload_optimizer": {
            "device": "cpu",
            "pin_memory": true
        },
        "offload_param": {
            "device": "cpu",
            "pin_memory": true
        },
        "overlap_comm": true,
        "contiguous_gradients": true,
        "sub_group_size": 1e9,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9,
        "stage3_gather_16bit_weights_on_model_save": true
    },
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 2000,
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": false
}
"""
HF_OPTIMIZER_AND_SCHEDULER = {
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                 "warmup_num_steps": "auto"}},
}


def _recipe_with_deepspeed_file(tmp_path: Path, text: str) -> Path:
    (tmp_path / "ds.json").write_text(text)
    return _write(tmp_path, {"distributed_type": "DEEPSPEED", "deepspeed_config": {"deepspeed_config_file": "ds.json"}})


def test_reads_the_transformers_zero3_template(tmp_path: Path) -> None:
    # "auto" is the front end's value; 1e9 is an integer written as a float.
    expected = ZeRO(stage=3, offload_optimizer=True, offload_parameters=True, pin_memory=True, overlap_comm=True,
                    contiguous_gradients=True, sub_group_size=10**9, stage3_max_live_parameters=10**9,
                    stage3_max_reuse_distance=10**9)
    assert meshplan.from_recipe(_recipe_with_deepspeed_file(tmp_path, HF_ZERO3_TEMPLATE)) == expected
    zero_section = expected.training_arguments()["deepspeed"]["zero_optimization"]
    assert zero_section["sub_group_size"] == 10**9  # passed on to DeepSpeed


def test_the_template_optimizer_and_scheduler_are_refused_together_with_the_trainer_equivalents(tmp_path: Path) -> None:
    config = {**json.loads(HF_ZERO3_TEMPLATE), **HF_OPTIMIZER_AND_SCHEDULER}
    with pytest.raises(PlanError) as error:
        meshplan.from_recipe(_recipe_with_deepspeed_file(tmp_path, json.dumps(config)))
    message = str(error.value)
    assert "keys optimizer and scheduler in DeepSpeed config '" in message and "ds.json' are not honoured" in message
    assert "lr_scheduler_type='constant_with_warmup'" in message


def test_every_unknown_deepspeed_key_is_named_in_one_message(tmp_path: Path) -> None:
    config = json.loads(HF_ZERO3_TEMPLATE)
    config["zero_optimization"].update(stage3_max_live_parameter=10**9, ignore_unused_parameters=True)
    config["communication_data_type"] = "fp32"
    with pytest.raises(PlanError) as error:
        meshplan.from_recipe(_recipe_with_deepspeed_file(tmp_path, json.dumps(config)))
    message = str(error.value)
    assert "ds.json" in message
    assert ("keys communication_data_type, zero_optimization.stage3_max_live_parameter and "
            "zero_optimization.ignore_unused_parameters in DeepSpeed config '") in message


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"stage3_gather_16bit_weights_on_model_save": False},
         "zero_optimization.stage3_gather_16bit_weights_on_model_save=False is not honoured: meshplan always sets it, "
         "because without it the HF Trainer's save_model writes no model.safetensors"),
        ({"stage3_max_live_parameters": 2.5}, "stage3_max_live_parameters=2.5 must be of type int"),
    ],
)
def test_deepspeed_values_meshplan_cannot_honour_say_why(change: dict, expected: str, tmp_path: Path) -> None:
    config = json.loads(HF_ZERO3_TEMPLATE)
    config["zero_optimization"].update(change)
    with pytest.raises(PlanError) as error:
        meshplan.from_recipe(_recipe_with_deepspeed_file(tmp_path, json.dumps(config)))
    assert "DeepSpeed config '" in str(error.value) and expected in str(error.value)


def test_reads_the_transformers_zero2_template(tmp_path: Path) -> None:
    # Its allgather_partitions and reduce_scatter are DeepSpeed's defaults, which meshplan keeps.
    zero2 = {"zero_optimization": {
        "stage": 2, "offload_optimizer": {"device": "none", "pin_memory": True}, "allgather_partitions": True,
        "allgather_bucket_size": 5e8, "overlap_comm": True, "reduce_scatter": True, "reduce_bucket_size": 5e8,
        "contiguous_gradients": True, "round_robin_gradients": True}}
    assert meshplan.from_recipe(_recipe_with_deepspeed_file(tmp_path, json.dumps(zero2))) == ZeRO(
        stage=2, allgather_bucket_size=5 * 10**8, overlap_comm=True, reduce_bucket_size=5 * 10**8,
        contiguous_gradients=True, round_robin_gradients=True)


# --- Catalogue names: wherever a recipe path is accepted ---


def test_catalogue_names_work_wherever_a_recipe_path_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no recipes/ folder here, as after `pip install meshplan`
    for name in ("zero3", "zero3.yaml", "recipes/zero3.yaml"):
        assert meshplan.from_recipe(name) == ZeRO(stage=3), name
        assert resolve_plan(name) == ZeRO(stage=3).plan, name  # meshplan.accelerator(name)
    job = FinetuneJob(model="m", data="reviews", recipe="tp", framework="lightning", devices=2, max_steps=1, output="o")
    assert job.plan == TensorParallel(tp_size=2).plan  # finetune --recipe tp
    environ = {"LOCAL_RANK": "0", RECIPE_VARIABLE: "tp-dp"}  # $MESHPLAN_RECIPE
    assert launched_recipe_extras(environ=environ) == {}


def test_a_file_here_shadows_the_catalogue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, {"distributed_type": "MULTI_GPU", "mixed_precision": "bf16"}, "zero3.yaml")
    (tmp_path / "recipes").mkdir()
    _write(tmp_path / "recipes", {"distributed_type": "MULTI_GPU"}, "zero3.yaml")
    assert meshplan.from_recipe("zero3.yaml") == DDP(mixed_precision="bf16")
    assert meshplan.from_recipe("recipes/zero3.yaml") == DDP()
    assert meshplan.from_recipe("zero2") == ZeRO(stage=2)  # other names still reach the catalogue


def test_an_unknown_recipe_name_lists_the_catalogue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PlanError) as error:
        meshplan.from_recipe("zero4")
    assert str(error.value) == (
        "recipe 'zero4' does not exist, and is no catalogue name either; the catalogue holds ddp, ddp-2node, fsdp2, "
        "tp, tp-dp, tp-fsdp, zero1, zero2, zero3, zero3-2node, zero3-offload (`meshplan recipes` lists their paths).")
    with pytest.raises(PlanError, match="MESHPLAN_RECIPE='zero4' names no file and is no catalogue name either"):
        launched_recipe_extras(environ={"LOCAL_RANK": "0", RECIPE_VARIABLE: "zero4"})
    with pytest.raises(PlanError, match="does not exist"):
        meshplan.from_recipe("../catalogue/zero3.yaml")  # only a name, or recipes/NAME, reaches the catalogue


def test_a_directory_named_like_a_recipe_does_not_shadow_the_catalogue(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "zero3").mkdir()  # e.g. `meshplan finetune --recipe zero3 --output zero3`
    (tmp_path / "recipes" / "zero2.yaml").mkdir(parents=True)
    assert find_recipe("zero3") == CATALOGUE_DIR / "zero3.yaml"
    assert meshplan.from_recipe("zero3") == ZeRO(stage=3)
    assert meshplan.from_recipe("recipes/zero2.yaml") == ZeRO(stage=2)


def test_a_broken_link_named_like_a_recipe_is_named_as_what_shadows_it(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "zero2.yaml").symlink_to(tmp_path / "gone.yaml")
    with pytest.raises(PlanError) as error:
        meshplan.from_recipe("zero2.yaml")
    assert "a link that leads nowhere; it shadows the shipped recipe" in str(error.value)
    assert "is no catalogue name" not in str(error.value)


def test_meshplan_recipe_maps_only_a_bare_name_to_the_catalogue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A path names the user's own copy (with its header options): when it is missing here, that
    # is an error, never the shipped recipe of the same name in its place.
    monkeypatch.chdir(tmp_path)
    for path in ("recipes/zero3.yaml", "zero3.yaml"):
        with pytest.raises(PlanError, match="names no file"):
            launched_recipe_extras(environ={"LOCAL_RANK": "0", RECIPE_VARIABLE: path})
    custom = _write(tmp_path, {"distributed_type": "MULTI_GPU"}, "zero3.yaml")
    custom.write_text('# meshplan: {"find_unused_parameters": true}\n' + custom.read_text())
    assert launched_recipe_extras(environ={"LOCAL_RANK": "0", RECIPE_VARIABLE: "zero3.yaml"}) == {
        "find_unused_parameters": True}
    assert launched_recipe_extras(environ={"LOCAL_RANK": "0", RECIPE_VARIABLE: "zero3"}) == {}  # the shipped one


@pytest.mark.parametrize(("key", "value"), [("zero_allow_untested_optimizer", False),
                                            ("zero_force_ds_cpu_optimizer", True)])
def test_deepspeed_switches_meshplan_sets_itself_are_refused_at_other_values(key: str, value: bool,
                                                                             tmp_path: Path) -> None:
    config = {"zero_optimization": {"stage": 2}, key: value}
    with pytest.raises(PlanError, match=f"key {key}={str(value).lower()}|key {key}={value}"):
        meshplan.from_recipe(_recipe_with_deepspeed_file(tmp_path, json.dumps(config)))
    config[key] = not value
    assert meshplan.from_recipe(_recipe_with_deepspeed_file(tmp_path, json.dumps(config))) == ZeRO(stage=2)


def test_missing_and_unparsable_recipes(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="does not exist"):
        meshplan.from_recipe(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("distributed_type: [unclosed\n")
    with pytest.raises(PlanError, match="not valid YAML"):
        meshplan.from_recipe(tmp_path / "bad.yaml")


def test_the_launcher_environment_describes_the_recipe() -> None:
    # What `accelerate launch --config_file recipes/zero3-offload.yaml` exports to each worker.
    environ = {"LOCAL_RANK": "0", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
               "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "cpu",
               "ACCELERATE_MIXED_PRECISION": "no"}
    assert plan_from_environment(environ) == ZeRO(stage=3, offload_optimizer=True, offload_parameters=True).plan
    tp_environ = {"LOCAL_RANK": "1", "ACCELERATE_USE_PARALLELISM_CONFIG": "true", "PARALLELISM_CONFIG_TP_SIZE": "2"}
    assert plan_from_environment(tp_environ, extras={"tp_plan": {"a": "colwise"}}) == TensorParallel(
        tp_size=2, tp_plan={"a": "colwise"}).plan
    assert plan_from_environment({}) is None


@pytest.mark.parametrize(("recipe", "strategy"), [("fsdp2", ZeRO(stage=3, engine="fsdp2")),
                                                  ("tp-fsdp", TensorParallel(tp_size=2, data_parallel="shard"))])
def test_the_fsdp_environment_accelerate_launch_exports_describes_the_recipe(recipe: str, strategy) -> None:
    # Accelerate's own launcher code turns the catalogue recipe into the worker's environment.
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(CATALOGUE_DIR / f"{recipe}.yaml"), "train.py"])
    environ = {**prepare_multi_gpu_env(_validate_launch_command(args)[0]), "LOCAL_RANK": "0"}
    assert environ["ACCELERATE_USE_FSDP"] == "true" and environ["FSDP_VERSION"] == "2"
    assert plan_from_environment(environ) == strategy.plan
    with pytest.raises(PlanError, match="accelerate launch.*fsdp_version=1.*accelerate to-fsdp2"):
        plan_from_environment({**environ, "FSDP_VERSION": "1"})
    # The launcher's default loads the weights on rank 0 only, which meshplan does not fill in elsewhere.
    with pytest.raises(PlanError, match="fsdp_cpu_ram_efficient_loading=True"):
        plan_from_environment({**environ, "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"})


def test_launched_parallelism_sizes_are_checked_against_the_launched_world() -> None:
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(CATALOGUE_DIR / "tp-fsdp.yaml"), "train.py"])
    environ = {**prepare_multi_gpu_env(_validate_launch_command(args)[0]), "LOCAL_RANK": "0"}
    assert plan_from_environment({**environ, "WORLD_SIZE": "4"}) == TensorParallel(tp_size=2, data_parallel="shard").plan
    # `--num_processes 8` with the recipe's dp_shard_size of 2: Accelerate's mesh would not cover the world.
    with pytest.raises(PlanError, match="dp_shard_size=2 and parallelism_config_tp_size=2 contradict num_processes=8"):
        plan_from_environment({**environ, "WORLD_SIZE": "8"})
    # Replicated and sharded data parallelism (HSDP): meshplan has one data-parallel dimension, so it
    # refuses rather than shard over all four processes.
    hsdp = {**environ, "WORLD_SIZE": "4", "PARALLELISM_CONFIG_DP_REPLICATE_SIZE": "2", "PARALLELISM_CONFIG_TP_SIZE": "1"}
    with pytest.raises(PlanError, match="parallelism_config_dp_replicate_size=2 is not honoured"):
        plan_from_environment(hsdp)


def test_recipes_command_lists_each_name_with_its_path(capsys: pytest.CaptureFixture[str]) -> None:
    from meshplan.cli import main

    assert main(["recipes"]) == 0
    listing, advice = capsys.readouterr().out.split("\n\n")
    lines = listing.splitlines()
    names = [line.split()[0] for line in lines[::2]]
    assert names == sorted(name.removesuffix(".yaml") for name in EXPECTED_CATALOGUE)
    assert [line.strip() for line in lines[1::2]] == [str(CATALOGUE_DIR / f"{name}.yaml") for name in names]
    assert "ZeRO-3 shards optimizer state, gradients and parameters" in listing
    assert "meshplan.accelerator()" in advice and "rank 0 of 1" in advice
    assert '--config_file "$(meshplan recipes --path NAME)"' in advice
