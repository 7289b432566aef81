"""The HF Trainer trains with a recipe's layout through strategy.training_arguments()."""

from __future__ import annotations

import pytest
import torch

import parity
import trainer_train
from meshplan import DDP, PlanError, TensorParallel, ZeRO
from meshplan.recipes import CATALOGUE_DIR
from meshplan.testing import spawn

# DDP first: a DeepSpeed run leaves ACCELERATE_USE_DEEPSPEED set in its process.
RECIPES = [str(CATALOGUE_DIR / name) for name in ("ddp.yaml", "zero2.yaml", "zero3.yaml")]


@pytest.fixture(scope="module")
def trainer_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[float], str]:
    # In a worker of its own: the Trainer sets Accelerate's environment variables in its process.
    folder = tmp_path_factory.mktemp("trainer")
    path = str(folder / "reference.pt")
    spawn(trainer_train.save_reference, 1, str(folder / "reference"), path, timeout=300)
    return torch.load(path, weights_only=True)[0], path


@pytest.fixture(scope="module")
def trainer_results(trainer_reference, tmp_path_factory: pytest.TempPathFactory, deepspeed_ops: None) -> dict:
    output = str(tmp_path_factory.mktemp("trainer-runs"))
    return spawn(trainer_train.run_recipes, 2, RECIPES, trainer_reference[1], output, timeout=600)[0]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.rsplit("/", 1)[-1])
def test_trainer_with_recipe_matches_its_single_process_reference(recipe: str, trainer_results: dict, trainer_reference) -> None:
    result = trainer_results[recipe]
    assert result["num_processes"] == 2
    assert result["ddp_backend"] == "gloo"
    assert result["deepspeed"] == ("zero" in recipe)
    assert len(result["losses"]) == parity.STEPS
    assert max(abs(a - b) for a, b in zip(result["losses"], trainer_reference[0])) < parity.LOSS_TOLERANCE
    assert result["weight_error"] < parity.WEIGHT_TOLERANCE


def test_deepspeed_values_the_trainer_owns_are_auto() -> None:
    arguments = ZeRO(stage=3, offload_optimizer=True, gradient_clipping=0.5).training_arguments()
    config = arguments["deepspeed"]
    assert config["train_micro_batch_size_per_gpu"] == "auto"
    assert config["gradient_accumulation_steps"] == "auto"
    assert config["gradient_clipping"] == "auto"
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert arguments["max_grad_norm"] == 0.5  # written once, in TrainingArguments
    assert arguments["use_cpu"] is (not torch.cuda.is_available())


def test_ddp_options_map_to_trainer_arguments() -> None:
    arguments = DDP(find_unused_parameters=True, bucket_cap_mb=50, static_graph=True, mixed_precision="bf16",
                    gradient_accumulation_steps=2).training_arguments()
    assert arguments["ddp_find_unused_parameters"] is True
    assert arguments["ddp_bucket_cap_mb"] == 50
    assert arguments["ddp_static_graph"] is True
    assert arguments["bf16"] is True
    assert arguments["gradient_accumulation_steps"] == 2
    assert "deepspeed" not in arguments


def test_layouts_the_trainer_cannot_express_are_plan_errors() -> None:
    with pytest.raises(PlanError, match="TensorParallel cannot be expressed through TrainingArguments"):
        TensorParallel(tp_size=2).training_arguments()
    with pytest.raises(PlanError, match="gradient_as_bucket_view=True"):
        DDP(gradient_as_bucket_view=True).training_arguments()
