"""Ray Train: meshplan's layouts in Ray's own train functions, on a local Ray cluster of CPU workers.

One Ray cluster serves the module, and one ``TorchTrainer.fit`` of two workers carries every run
(tests/helpers/ray_train.all_runs; starting a worker group costs more than training the tiny model):

- front ends: the Lightning train function of Ray's documentation, with only its strategy
  swapped for ``meshplan.ray.strategy(layout)``, under ddp, zero2, zero3 and tp; then an
  Accelerate loop through ``meshplan.accelerator(recipe)`` and the HF Trainer through
  ``training_arguments()``. Each must train with Ray's world (two ranks) and match its
  single-process reference.
- killed and resumed: then the same Lightning function with Ray's documented resume; rank 1 is
  SIGKILLed mid-training, ``FailureConfig(max_failures=1)`` restarts the group (whose function
  skips the front ends the second time), and the job must continue from the last checkpoint
  Ray registered to the reference's weights.

Ray Train V2 (the default of ray 2.60) runs the function.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import lightning.pytorch as pl
import pytest
import ray
import ray.train
import torch
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.lightning import RayDDPStrategy, RayDeepSpeedStrategy, RayFSDPStrategy
from ray.train.torch import TorchConfig, TorchTrainer
from transformers import LlamaForCausalLM

import meshplan
import meshplan.ray
from helpers import parity, ray_train, trainer_train
from helpers.parity import load_reference
from meshplan import PlanError
from meshplan.checkpoint.manifest import read_manifest
from meshplan.recipes import catalogue

TESTS = Path(__file__).resolve().parent
SOURCE = TESTS.parent / "src" / "meshplan"
RAY_CLASSES = (RayDDPStrategy, RayFSDPStrategy, RayDeepSpeedStrategy)  # what prepare_trainer accepts
# A collective that waits on a dead worker fails after this long instead of Ray's 30 minutes.
COLLECTIVE_TIMEOUT_S = 120


# ---------------------------------------------------------------- without a cluster


# The catalogue's FSDP2 layouts (fsdp2, tp-fsdp) are refused: Ray Train has no strategy for them.
RAY_CATALOGUE = sorted(name for name, recipe in catalogue().items() if not recipe.plan.uses_fsdp2)
FSDP2_CATALOGUE = sorted(name for name, recipe in catalogue().items() if recipe.plan.uses_fsdp2)


@pytest.mark.parametrize("name", RAY_CATALOGUE)
def test_every_catalogue_layout_becomes_a_strategy_that_prepare_trainer_accepts(name: str) -> None:
    expected = meshplan.from_recipe(name)
    built = meshplan.ray.strategy(name)
    assert built.plan == expected.plan
    assert isinstance(built, type(expected))  # the meshplan strategy, with everything it does
    assert isinstance(built, RAY_CLASSES)


@pytest.mark.parametrize("layout", [
    meshplan.ZeRO(stage=3, engine="fsdp2"), meshplan.ZeRO(stage=2, engine="fsdp2").plan,
    meshplan.TensorParallel(tp_size=2, data_parallel="shard"), *FSDP2_CATALOGUE,
], ids=["zero3-fsdp2", "zero2-fsdp2-plan", "tp-shard", *FSDP2_CATALOGUE])
def test_fsdp2_layouts_are_a_plan_error_that_names_the_layouts_ray_runs(layout: Any) -> None:
    with pytest.raises(PlanError, match=r"does not run .*RayFSDPStrategy is FSDP1.*DDP, ZeRO with engine='deepspeed'"):
        meshplan.ray.strategy(layout)


def test_the_catalogue_holds_fsdp2_layouts_ray_refuses() -> None:
    # Otherwise the refusal above would be checked on hand-built layouts only.
    assert FSDP2_CATALOGUE == ["fsdp2.yaml", "tp-fsdp.yaml"]


def test_strategies_plans_and_recipe_files_name_the_same_layout(tmp_path: Path) -> None:
    recipe = meshplan.ZeRO(stage=3, offload_optimizer=True).to_recipe(tmp_path / "offload.yaml")
    for layout in (meshplan.ZeRO(stage=3, offload_optimizer=True), meshplan.ZeRO(stage=3, offload_optimizer=True).plan, str(recipe)):
        built = meshplan.ray.strategy(layout)
        assert type(built) is meshplan.ray.RayZeRO and built.plan == meshplan.ZeRO(stage=3, offload_optimizer=True).plan
    tp = meshplan.ray.strategy(meshplan.TensorParallel(tp_size=2, tp_plan={"layers.*.mlp.up_proj": "colwise"}))
    assert tp.plan.tp_plan_dict == {"layers.*.mlp.up_proj": "colwise"}


def test_what_is_not_a_layout_is_a_plan_error() -> None:
    for value in (None, "auto", meshplan.Auto()):
        with pytest.raises(PlanError, match=r"needs a layout: .*meshplan.plan_layout"):
            meshplan.ray.strategy(value)
    with pytest.raises(PlanError, match="does not exist"):
        meshplan.ray.strategy("zero4")
    with pytest.raises(PlanError, match="neither a meshplan strategy nor a recipe"):
        meshplan.ray.strategy(42)


def test_outside_a_ray_train_worker_the_strategy_says_where_it_runs() -> None:
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=meshplan.ray.strategy("ddp"), max_steps=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    # Lightning sets LOCAL_RANK, MASTER_ADDR, ... in this process before the strategy refuses.
    with _environment_restored(), pytest.raises(PlanError, match=r"inside Ray Train's training function .*meshplan.from_recipe"):
        trainer.fit(parity.ParityModule("llama", parity.GLOBAL_BATCH))


def _imported_modules(nodes: Iterable[ast.AST]) -> set[str]:
    """The modules that the import statements among ``nodes`` name."""
    names = {alias.name for node in nodes if isinstance(node, ast.Import) for alias in node.names}
    return names | {node.module for node in nodes if isinstance(node, ast.ImportFrom) and node.module}


def _is_ray(module: str) -> bool:
    return module in ("ray", "meshplan.ray") or module.startswith("ray.")


@pytest.mark.parametrize(("layout", "workers_per_node", "refusal"), [
    (meshplan.TensorParallel(), [2, 2, 2, 2], None),  # tp_size None: every worker of a node
    (meshplan.TensorParallel(), [2, 2, 1], "Ray placed 1, 2 workers on different nodes"),
    (meshplan.TensorParallel(tp_size=2), [4, 4, 4, 4, 2, 2], None),
    (meshplan.TensorParallel(tp_size=2), [3, 3, 3, 1], "would span nodes"),
    (meshplan.DDP(), [3, 3, 3, 1], None),  # data parallelism does not care where workers are
], ids=["tp-even", "tp-none-uneven", "tp2-divides-each", "tp2-does-not-divide-3", "ddp-uneven"])
def test_a_tensor_parallel_layout_must_fit_the_workers_ray_placed_on_each_node(layout, workers_per_node, refusal) -> None:
    if refusal is None:
        meshplan.ray.check_workers_per_node(layout.plan, workers_per_node)
    else:
        with pytest.raises(PlanError, match=refusal):
            meshplan.ray.check_workers_per_node(layout.plan, workers_per_node)


def test_ray_tensor_parallel_is_a_virtual_ray_ddp_strategy_and_so_a_lightning_ddp_strategy() -> None:
    # Documented (meshplan.ray.RayTensorParallel): the registration that passes prepare_trainer
    # reaches Lightning's DDPStrategy, while no DDP method joins the class.
    from lightning.pytorch.strategies import DDPStrategy

    assert issubclass(meshplan.ray.RayTensorParallel, RayDDPStrategy) and issubclass(meshplan.ray.RayTensorParallel, DDPStrategy)
    assert DDPStrategy not in meshplan.ray.RayTensorParallel.__mro__


def test_ray_stays_optional() -> None:
    # Only meshplan.ray and its compat module import Ray, and nothing imports meshplan.ray: `import meshplan`
    # works without the extra. The compat module imports Ray inside its functions only.
    trees = {str(path.relative_to(SOURCE)): ast.parse(path.read_text()) for path in SOURCE.rglob("*.py")}
    importers = sorted(name for name, tree in trees.items() if any(map(_is_ray, _imported_modules(list(ast.walk(tree))))))
    assert importers == ["_compat/ray.py", "ray.py"]
    assert not any(map(_is_ray, _imported_modules(trees["_compat/ray.py"].body)))


# ---------------------------------------------------------------- the cluster and its runs


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A local Ray cluster for the module: 4 logical CPUs (2 workers and Ray's controller on 2 cores), its
    files and the workers' temporary files (RayTrainReportCallback's) in a temporary directory."""
    folder = tmp_path_factory.mktemp("r")  # short: Ray's socket paths live below it (at most 107 bytes)
    worker_tmp = folder / "tmp"
    worker_tmp.mkdir()
    python_path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))  # workers import helpers
    # ray.init writes variables of its own into this process's environment (RAY_USAGE_STATS_ENABLED,
    # PYTHONBREAKPOINT, ...) and leaves them; the tests after these run in the environment they had.
    with _environment_restored(), pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_TMPDIR", str(folder))  # Ray's sessions, logs and sockets
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"PYTHONPATH": python_path, "TMPDIR": str(worker_tmp), "OMP_NUM_THREADS": "1"}})
        try:
            yield folder
        finally:
            ray.shutdown()


@contextlib.contextmanager
def _environment_restored() -> Iterator[None]:
    """Puts os.environ back as it was, whatever the code inside wrote to it."""
    before = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(before)


@pytest.fixture(scope="module")
def trainer_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[float], str]:
    """The single-process reference of the HF Trainer runs (their optimizer and clipping differ from parity's)."""
    path = tmp_path_factory.mktemp("trainer-reference") / "reference.pt"
    torch.save(trainer_train.plain_loop_reference(), path)
    return torch.load(path, weights_only=True)[0], str(path)


@pytest.fixture(scope="module")
def runs(ray_cluster: Path, reference_paths: dict[str, str], trainer_reference: tuple[list[float], str],
         deepspeed_ops: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The module's one fit (tests/helpers/ray_train.all_runs): two workers, one restart allowed."""
    folder = tmp_path_factory.mktemp("runs")
    out = folder / "out"
    out.mkdir()
    trainer = TorchTrainer(
        ray_train.all_runs,
        train_loop_config={"out": str(out), "reference": reference_paths["llama"], "trainer_reference": trainer_reference[1]},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False), torch_config=TorchConfig(timeout_s=COLLECTIVE_TIMEOUT_S),
        run_config=RunConfig(storage_path=str(folder / "storage"), name="runs", failure_config=FailureConfig(max_failures=1)),
    )
    try:
        result, error = trainer.fit(), None
    except ray.train.TrainingFailedError as failure:  # each test says what it lacks; the front ends may be whole
        result, error = None, failure
    ranks = [json.loads(path.read_text()) for path in sorted(out.glob("rank-*.json"))]
    attempts_log = out / "attempts.jsonl"
    attempts = [json.loads(line) for line in attempts_log.read_text().splitlines()] if attempts_log.exists() else []
    return {"result": result, "error": error, "ranks": ranks, "attempts": attempts, "out": out}


@pytest.fixture(scope="module")
def front_ends(runs: dict[str, Any]) -> dict[str, Any]:
    """The fit's results, once both workers finished the front ends (the killed run may still have failed)."""
    assert len(runs["ranks"]) == 2, f"the front ends did not finish: {runs['error']}"
    return runs


@pytest.fixture(scope="module")
def killed(runs: dict[str, Any]) -> dict[str, Any]:
    """The fit's results, once the whole fit succeeded (the killed run resumed and finished)."""
    assert runs["error"] is None, runs["error"]
    return runs


def _ranks(front_ends: dict[str, Any], run: str) -> list[dict[str, Any]]:
    runs = [rank[run] for rank in front_ends["ranks"]]
    assert all("error" not in run for run in runs), runs[0].get("error") or runs[1].get("error")
    return runs


def _assert_matches(run: dict[str, Any], reference_losses: list[float]) -> None:
    assert len(run["losses"]) == parity.STEPS
    assert max(abs(a - b) for a, b in zip(run["losses"], reference_losses)) < parity.LOSS_TOLERANCE
    assert run["weight_error"] < parity.WEIGHT_TOLERANCE


# ---------------------------------------------------------------- Ray's documented Lightning function


STRATEGY_CLASSES = {"ddp": "RayDDP", "zero2": "RayZeRO", "zero3": "RayZeRO", "tp": "RayTensorParallel"}


@pytest.mark.slow
def test_workers_are_the_two_ranks_of_rays_process_group(front_ends: dict[str, Any]) -> None:
    for rank, results in enumerate(front_ends["ranks"]):
        assert results["world"] == {"ray_world_size": 2, "ray_rank": rank, "ray_local_world_size": 2,
                                    "torch_world_size": 2, "torch_rank": rank}


@pytest.mark.slow
@pytest.mark.parametrize("layout", ray_train.LIGHTNING_LAYOUTS)
def test_rays_lightning_function_trains_the_layout_with_rays_world(layout: str, front_ends: dict[str, Any],
                                                                    reference_paths: dict[str, str]) -> None:
    reference_losses, _ = load_reference(reference_paths, "llama")
    data_parallel = 1 if layout == "tp" else 2
    for rank, run in enumerate(_ranks(front_ends, f"lightning/{layout}")):
        assert run["strategy"] == STRATEGY_CLASSES[layout]
        # Lightning sees the one device Ray gives the worker, and trains in Ray's world of two.
        assert (run["num_devices"], run["world_size"], run["global_rank"]) == (1, 2, rank)
        assert run["sampler"] == {"num_replicas": data_parallel, "rank": rank % data_parallel}
        _assert_matches(run, reference_losses)


@pytest.mark.slow
def test_each_lightning_run_reported_one_whole_meshplan_checkpoint(killed: dict[str, Any], reference_paths: dict[str, str],
                                                                    tmp_path: Path) -> None:
    # RayTrainReportCallback saved into a directory per worker and reported each; the checkpoint
    # Ray stored holds the meshplan checkpoint that both workers wrote into rank 0's, whole: it
    # exports to the weights the single-process reference ends with (ZeRO's shards included).
    _, reference_weights = load_reference(reference_paths, "llama")
    reported = killed["result"].best_checkpoints[:len(ray_train.LIGHTNING_LAYOUTS)]  # the killed run's follow
    for (checkpoint, metrics), layout in zip(reported, ray_train.LIGHTNING_LAYOUTS, strict=True):
        assert metrics["step"] == parity.STEPS
        folder = Path(checkpoint.path)
        assert [entry.name for entry in folder.iterdir()] == ["checkpoint.ckpt"]
        manifest = read_manifest(folder / "checkpoint.ckpt")
        assert manifest["world_size"] == 2 and manifest["step"] == parity.STEPS
        assert manifest["layout"] == repr(meshplan.from_recipe(layout).plan)
        exported = LlamaForCausalLM.from_pretrained(meshplan.export(folder / "checkpoint.ckpt", tmp_path / layout))
        error = max((parameter.detach() - reference_weights[name]).abs().max().item()
                    for name, parameter in exported.named_parameters())
        assert error < parity.WEIGHT_TOLERANCE, (layout, error)


@pytest.mark.slow
def test_a_layout_rays_world_cannot_hold_is_a_plan_error_on_every_worker(front_ends: dict[str, Any]) -> None:
    for results in front_ends["ranks"]:
        refused = results["refused"]
        assert refused["tp_size=4"].startswith("PlanError: tp_size=4 does not divide the world size 2")
        assert refused["no RayLightningEnvironment"].startswith(
            "PlanError: meshplan.ray strategies need the Trainer to read ranks from Ray: pass "
            "plugins=[ray.train.lightning.RayLightningEnvironment()]")


@pytest.mark.slow
def test_a_checkpoint_folder_rank_0_cannot_create_is_refused_on_every_worker_with_the_reason(
        front_ends: dict[str, Any]) -> None:
    # Each rank saves to a path of its own (as RayTrainReportCallback has them do), and rank 0's folder
    # cannot be made (it would lie below a file): every rank refuses with the OS's reason, before writing.
    for results in front_ends["ranks"]:
        refused = results["refused"]["rank 0's folder unreachable"]
        assert refused.startswith("CheckpointError: rank 0 could not create the checkpoint folder")
        assert "Not a directory" in refused


# ---------------------------------------------------------------- Accelerate and the HF Trainer


@pytest.mark.slow
@pytest.mark.parametrize("layout", [layout for front_end, layout in ray_train.OTHER_FRONT_ENDS if front_end == "accelerate"])
def test_accelerate_function_trains_the_recipe_with_rays_world(layout: str, front_ends: dict[str, Any],
                                                                reference_paths: dict[str, str]) -> None:
    reference_losses, _ = load_reference(reference_paths, "llama")
    for run in _ranks(front_ends, f"accelerate/{layout}"):
        assert run["num_processes"] == 2
        assert run["distributed_type"] == ("DistributedType.DEEPSPEED" if "zero" in layout else "DistributedType.MULTI_CPU")
        _assert_matches(run, reference_losses)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [layout for front_end, layout in ray_train.OTHER_FRONT_ENDS if front_end == "hf_trainer"])
def test_hf_trainer_function_trains_the_recipe_with_rays_world(layout: str, front_ends: dict[str, Any],
                                                                trainer_reference: tuple[list[float], str]) -> None:
    for run in _ranks(front_ends, f"hf_trainer/{layout}"):
        assert run["num_processes"] == 2 and run["deepspeed"] == ("zero" in layout)
        _assert_matches(run, trainer_reference[0])


# ---------------------------------------------------------------- a killed worker


@pytest.mark.slow
def test_a_killed_worker_restarts_the_group_from_the_last_reported_checkpoint(killed: dict[str, Any],
                                                                              reference_paths: dict[str, str]) -> None:
    reference_losses, reference_weights = load_reference(reference_paths, "llama")
    first, second, end = killed["attempts"]  # the first attempt never ended: rank 1 died as step 3 began
    assert first == {"event": "start", "attempt": 0, "resumed_from": None}
    assert (second["event"], second["attempt"], end["event"], end["attempt"]) == ("start", 1, "end", 1)
    # Ray registers a checkpoint once every worker's report of it has reached its controller; the
    # step-2 report of the worker that died may not have, and then the step-1 checkpoint is the last.
    # Either way the restart resumes from the newest registered one, and steps are not repeated or lost.
    reported = killed["result"].best_checkpoints[len(ray_train.LIGHTNING_LAYOUTS):]
    steps = [read_manifest(Path(checkpoint.path) / "checkpoint.ckpt")["step"] for checkpoint, _ in reported]
    assert steps == list(range(1, parity.STEPS + 1))
    resumed_after = read_manifest(Path(second["resumed_from"]) / "checkpoint.ckpt")["step"]
    assert resumed_after in (1, ray_train.KILLED_AT_STEP - 1)
    assert second["resumed_from"] == reported[resumed_after - 1][0].path
    assert end["started_at_step"] == resumed_after
    # The resumed steps continue the reference, and the job ends with the reference's weights.
    assert len(end["losses"]) == parity.STEPS - resumed_after
    assert max(abs(a - b) for a, b in zip(end["losses"], reference_losses[resumed_after:])) < parity.LOSS_TOLERANCE
    weights = torch.load(killed["out"] / "weights.pt", weights_only=True)
    assert max((weights[key] - reference_weights[key]).abs().max().item() for key in reference_weights) < parity.WEIGHT_TOLERANCE
