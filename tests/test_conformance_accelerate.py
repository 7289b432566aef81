"""What an Accelerate user meets around the loop: the launched recipe, the world size, the exit.

The Accelerate rows of the conformance matrix themselves are checked inside the one launch per
recipe of tests/test_accelerate_launch.py (with the exit of ZeRO launches that never call
end_training()); this file holds what needs no training run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from accelerate import Accelerator

import meshplan
from meshplan._compat.accelerate import reset_process_state
from meshplan import PlanError, TensorParallel
from meshplan.accelerate import check_launched_world
from meshplan.recipes import RECIPE_VARIABLE, catalogue, launched_recipe_extras, plan_from_environment

ROOT = Path(__file__).resolve().parents[1]
# What `accelerate launch` exports to each worker of a TP recipe (see accelerate/utils/launch.py).
TP_LAUNCH_ENVIRONMENT = {"LOCAL_RANK": "0", "WORLD_SIZE": "2", "ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO",
                         "ACCELERATE_USE_PARALLELISM_CONFIG": "true", "PARALLELISM_CONFIG_TP_SIZE": "2"}
USER_TP_PLAN = {"layers.*.self_attn.q_proj": "colwise", "layers.*.self_attn.o_proj": "rowwise"}


# Issue 9: the recipe's meshplan options reach the workers, or the launch is refused.

def test_the_recipe_named_by_meshplan_recipe_carries_its_header_options(tmp_path: Path) -> None:
    recipe = TensorParallel(tp_size=2, tp_plan=USER_TP_PLAN).to_recipe(tmp_path / "tp.yaml")
    environ = {**TP_LAUNCH_ENVIRONMENT, RECIPE_VARIABLE: str(recipe)}
    # The parent (pytest) is no `accelerate launch`: only the variable can name the recipe.
    extras = launched_recipe_extras(parent_pid=os.getpid(), environ=environ)
    assert plan_from_environment(environ, extras) == TensorParallel(tp_size=2, tp_plan=USER_TP_PLAN).plan


def test_a_launch_whose_recipe_cannot_be_found_is_refused_not_guessed() -> None:
    # macOS, SLURM, pdsh or a launcher that is not the direct parent: no command line to read.
    with pytest.raises(PlanError) as error:
        launched_recipe_extras(parent_pid=os.getpid(), environ=TP_LAUNCH_ENVIRONMENT)
    assert RECIPE_VARIABLE in str(error.value) and "meshplan.accelerator('zero3')" in str(error.value)


def test_meshplan_recipe_naming_no_file_is_a_plan_error(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match=f"{RECIPE_VARIABLE}=.*names no file"):
        launched_recipe_extras(environ={**TP_LAUNCH_ENVIRONMENT, RECIPE_VARIABLE: str(tmp_path / "missing.yaml")})


def test_a_process_no_launcher_started_has_no_recipe_options() -> None:
    assert launched_recipe_extras(parent_pid=os.getpid(), environ={}) == {}
    # torchrun, or plain python, with a variable of Accelerate's that users export themselves.
    user_environment = {"LOCAL_RANK": "0", "WORLD_SIZE": "2", "ACCELERATE_MIXED_PRECISION": "bf16"}
    assert launched_recipe_extras(parent_pid=os.getpid(), environ=user_environment) == {}


def test_plain_python_with_accelerate_variables_is_no_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    from meshplan.accelerate import resolve_plan

    for name in ("LOCAL_RANK", "ACCELERATE_USE_DEEPSPEED", RECIPE_VARIABLE):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    assert resolve_plan(None) == meshplan.DDP().plan  # one process, nothing launched: no recipe to look for


# Issue 11: Accelerate on a CPU-only machine counts one process where the launcher started more.

def test_a_world_of_one_under_a_launcher_of_two_is_refused() -> None:
    check_launched_world(2, {"WORLD_SIZE": "2"})
    check_launched_world(1, {})
    with pytest.raises(PlanError, match=r"started 2 processes \(WORLD_SIZE=2\) but Accelerate counts 1"):
        check_launched_world(1, {"WORLD_SIZE": "2"})


def test_meshplan_accelerator_refuses_the_state_a_plain_accelerator_left(monkeypatch: pytest.MonkeyPatch) -> None:
    # A plain Accelerator() made first counts one process on a CPU machine; its state is shared
    # by every Accelerator of the process, so meshplan's would inherit the count of one.
    monkeypatch.setenv("WORLD_SIZE", "2")
    try:
        assert Accelerator().num_processes == 1
        with pytest.raises(PlanError, match=r"meshplan.accelerator\(\).*Accelerator\(cpu=True\) counts them too, but it drops a ZeRO or TP layout"):
            meshplan.accelerator(meshplan.DDP())
    finally:
        reset_process_state()


def test_where_a_user_reads_first_says_to_use_meshplan_accelerator(capsys: pytest.CaptureFixture[str]) -> None:
    from meshplan.cli import main

    for name, recipe in catalogue().items():
        assert "meshplan.accelerator()" in recipe.description and "cpu=True" in recipe.description, name
    assert main(["recipes"]) == 0
    assert "meshplan.accelerator()" in capsys.readouterr().out
    opening = (ROOT / "docs" / "accelerate.md").read_text().split("\n\n")[:4]
    assert any("rank 0 of 1" in paragraph for paragraph in opening)


def test_deepspeed_accumulates_as_many_micro_batches_as_a_plugin_says() -> None:
    # DeepSpeed's config must name the Accelerator's accumulation, or its engine steps at every micro-batch.
    from accelerate.utils import GradientAccumulationPlugin

    from meshplan.accelerate import _accumulation_steps

    assert _accumulation_steps({"gradient_accumulation_plugin": GradientAccumulationPlugin(num_steps=4)}) == 4
    assert _accumulation_steps({"gradient_accumulation_steps": 3}) == 3
    assert _accumulation_steps({}) == 1
