"""Tier 1: strategies round-trip through Accelerate config files; foreign configs are read or refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file

import meshplan
from meshplan import DDP, PlanError, TensorParallel, ZeRO
from meshplan.recipes import CATALOGUE_DIR, catalogue, plan_from_environment

ROUND_TRIP = [
    DDP(),
    DDP(find_unused_parameters=True, static_graph=True, gradient_as_bucket_view=True, bucket_cap_mb=10,
        process_group_backend="gloo"),
    DDP(mixed_precision="bf16", gradient_accumulation_steps=4, gradient_clipping=0.5),
    DDP(mixed_precision="no"),
    ZeRO(stage=1),
    ZeRO(stage=2, overlap_comm=False, contiguous_gradients=True, reduce_bucket_size=1000, allgather_bucket_size=2000),
    ZeRO(stage=2, offload_optimizer=True, pin_memory=True, mixed_precision="fp16"),
    ZeRO(stage=3),
    ZeRO(stage=3, offload_optimizer=True, offload_parameters=True, stage3_prefetch_bucket_size=10,
         stage3_param_persistence_threshold=20, stage3_max_live_parameters=30, stage3_max_reuse_distance=40,
         gradient_accumulation_steps=2, gradient_clipping=1.0, process_group_backend="gloo"),
    TensorParallel(tp_size=2),
    TensorParallel(tp_size=1),
    TensorParallel(),
    TensorParallel(tp_size=4, tp_plan={"layers.*.self_attn.q_proj": "colwise", "lm_head": "colwise_rep"}),
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
        ({"distributed_type": "FSDP", "fsdp_config": {"fsdp_version": 2}}, "'fsdp_config'"),
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
    ],
)
def test_contradictory_pairs_name_both_keys(config: dict, keys: tuple[str, str], tmp_path: Path) -> None:
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    (tmp_path / "bf16.json").write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    with pytest.raises(PlanError) as error:
        meshplan.from_recipe(_write(tmp_path, config))
    for key in keys:
        assert key in str(error.value)


def test_a_deepspeed_file_with_its_own_optimizer_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}))
    path = _write(tmp_path, {"distributed_type": "DEEPSPEED", "deepspeed_config": {"deepspeed_config_file": "ds.json"}})
    with pytest.raises(PlanError, match="'optimizer'"):
        meshplan.from_recipe(path)


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


def test_recipes_command_lists_the_catalogue(capsys: pytest.CaptureFixture[str]) -> None:
    from meshplan.cli import main

    assert main(["recipes"]) == 0
    listing, advice = capsys.readouterr().out.split("\n\n")
    assert [line.split()[0] for line in listing.splitlines()] == sorted(EXPECTED_CATALOGUE)
    assert "ZeRO-3 shards optimizer state, gradients and parameters" in listing
    assert "meshplan.accelerator()" in advice and "rank 0 of 1" in advice
