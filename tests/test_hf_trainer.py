"""The HF Trainer trains with a recipe's layout through strategy.training_arguments().

The same runs are the HF Trainer rows of the conformance matrix: a user's Trainer script
(train with eval and save steps, evaluate, predict, save_model, resume) under every layout the
Trainer can run, each call judged against an independent computation in this process.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

import meshplan
from helpers import matrix, parity, trainer_train
from meshplan import DDP, PlanError, TensorParallel, ZeRO
from meshplan.recipes import CATALOGUE_DIR
from meshplan.testing import spawn

FRONT_END = "HF Trainer"
# DDP first: a DeepSpeed run leaves ACCELERATE_USE_DEEPSPEED set in its process, and
# training_arguments() refuses a DDP layout while it is set.
LAYOUTS = ("ddp", "zero1", "zero2", "zero3", "zero3-offload")
RECIPES = [str(CATALOGUE_DIR / f"{layout}.yaml") for layout in LAYOUTS]
# fp32 evaluation of the same weights in other batches: measured 4.8e-7 (DESIGN.md's noise floor
# for losses is 1e-6); the Trainer's weighting of an uneven set's padded last batch shifts it by 3.6e-3.
EVAL_TOLERANCE = 1e-5
TP_REFUSAL = (
    "TensorParallel cannot be expressed through TrainingArguments: the HF Trainer only runs tensor "
    "parallelism on models loaded with a transformers DistributedConfig, and not on CPU processes. Use "
    "lightning.Trainer(strategy=meshplan.TensorParallel(...)) or meshplan.accelerator(...) instead."
)


@pytest.fixture(scope="module")
def trainer_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[float], str]:
    # In a worker of its own: the Trainer sets Accelerate's environment variables in its process.
    folder = tmp_path_factory.mktemp("trainer")
    path = str(folder / "reference.pt")
    spawn(trainer_train.save_reference, 1, str(folder / "reference"), path, timeout=300)
    return torch.load(path, weights_only=True)[0], path


@pytest.fixture(scope="module")
def trainer_lora_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[float], str]:
    folder = tmp_path_factory.mktemp("trainer-lora")
    path = str(folder / "reference.pt")
    spawn(trainer_train.save_reference, 1, str(folder / "reference"), path, "llama-lora", timeout=300)
    return torch.load(path, weights_only=True)[0], path


@pytest.fixture(scope="module")
def trainer_results(trainer_reference, trainer_lora_reference, tmp_path_factory: pytest.TempPathFactory,
                    deepspeed_ops: None) -> dict:
    output = str(tmp_path_factory.mktemp("trainer-runs"))
    return spawn(trainer_train.run_recipes, 2, RECIPES, trainer_reference[1], output, trainer_lora_reference[1], timeout=600)[0]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.rsplit("/", 1)[-1])
def test_trainer_with_recipe_matches_its_single_process_reference(recipe: str, trainer_results: dict, trainer_reference) -> None:
    result = trainer_results[recipe]
    assert result["num_processes"] == 2
    assert result["ddp_backend"] == "gloo"
    assert result["deepspeed"] == ("zero" in recipe)
    assert len(result["losses"]) == parity.STEPS
    assert max(abs(a - b) for a, b in zip(result["losses"], trainer_reference[0])) < parity.LOSS_TOLERANCE
    assert result["weight_error"] < parity.WEIGHT_TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("layout", trainer_train.LORA_LAYOUTS)
def test_trainer_trains_a_lora_model_like_one_process(layout: str, trainer_results: dict, trainer_lora_reference) -> None:
    result = trainer_results[trainer_train.lora_key(str(CATALOGUE_DIR / f"{layout}.yaml"))]
    assert result["deepspeed"] == (layout != "ddp")
    assert result["trainable"] and all(".lora_A." in name or ".lora_B." in name for name in result["trainable"])
    assert len(result["losses"]) == parity.STEPS
    loss_error = max(abs(a - b) for a, b in zip(result["losses"], trainer_lora_reference[0]))
    print(layout, "+ LoRA loss error", loss_error, "weight error", result["weight_error"])  # figures, with -s
    assert loss_error < parity.LOSS_TOLERANCE
    assert result["weight_error"] < parity.WEIGHT_TOLERANCE  # the frozen base included: it did not move
    assert result["saved_adapter_error"] == 0.0  # save_model wrote the adapter PeftModel.from_pretrained loads
    matrix.record(FRONT_END, f"{layout}+lora", {"train with eval and save steps": matrix.WORKS,
                                                 "save_model + PeftModel.from_pretrained": matrix.WORKS})


def test_deepspeed_values_the_trainer_owns_are_auto() -> None:
    arguments = ZeRO(stage=3, offload_optimizer=True, gradient_clipping=0.5).training_arguments()
    config = arguments["deepspeed"]
    assert config["train_micro_batch_size_per_gpu"] == "auto"
    assert config["gradient_accumulation_steps"] == "auto"
    assert config["gradient_clipping"] == "auto"
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    # Without it the Trainer's save_model writes a DeepSpeed checkpoint and no model weights.
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
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


TRAINER_APIS = ("train with eval and save steps", "trainer.evaluate", "trainer.predict (exact count)",
                "save_model + from_pretrained", "resume_from_checkpoint=True")


def test_fsdp2_goes_through_the_trainers_fsdp_arguments_where_it_runs() -> None:
    # TP x FSDP2: no more expressible than TP.
    with pytest.raises(PlanError, match=r"TensorParallel\(data_parallel='shard'\) cannot be expressed"):
        meshplan.from_recipe(str(CATALOGUE_DIR / "tp-fsdp.yaml")).training_arguments()
    matrix.record(FRONT_END, "tp-fsdp", {api: matrix.refused("no TP layout in TrainingArguments; use Lightning or "
                                                             "Accelerate") for api in TRAINER_APIS})
    zero2 = ZeRO(stage=2, engine="fsdp2", fsdp_layer_classes="LlamaDecoderLayer", gradient_clipping=0.5)
    if not torch.cuda.is_available():  # why: test_the_trainer_runs_ddp_in_place_of_fsdp2_on_the_cpu
        for strategy, layout in ((zero2, "fsdp2-stage2"), (meshplan.from_recipe(str(CATALOGUE_DIR / "fsdp2.yaml")), "fsdp2")):
            with pytest.raises(PlanError, match=r"engine='fsdp2'\) cannot run under the HF Trainer on the CPU.*"
                                                r"meshplan.accelerator"):
                strategy.training_arguments()
            matrix.record(FRONT_END, layout, {api: matrix.refused("the Trainer runs DDP in its place on CPUs; use Lightning "
                                                                  "or Accelerate") for api in TRAINER_APIS})
        return
    arguments = zero2.training_arguments()
    assert arguments["fsdp"] is True and "deepspeed" not in arguments and arguments["max_grad_norm"] == 0.5
    assert arguments["fsdp_config"] == {
        "version": 2, "reshard_after_forward": False, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "cpu_ram_efficient_loading": False,
        "activation_checkpointing": False, "state_dict_type": "FULL_STATE_DICT"}


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's behaviour")
def test_the_trainer_runs_ddp_in_place_of_fsdp2_on_the_cpu(trainer_results: dict) -> None:
    # Measured in the workers of the recipe runs: the Trainer given FSDP2 arguments and use_cpu=True
    # does not shard the model but wraps it in DDP, silently. If this starts to fail, the Trainer may
    # run FSDP2 on CPUs: lift the refusal in meshplan.hf_trainer if it does.
    result = trainer_results[trainer_train.FSDP2_ON_CPU]
    assert result == {"distributed_type": "DistributedType.MULTI_CPU", "model_wrapped": "DistributedDataParallel",
                      "fully_sharded": False, "ranks_hold_the_same_weights": True}


def test_a_layout_is_refused_where_accelerates_fsdp_would_take_over(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(PlanError, match="ACCELERATE_USE_FSDP=true is set in this process"):
        DDP().training_arguments()
    with pytest.raises(PlanError, match="ACCELERATE_USE_FSDP=true is set in this process"):
        ZeRO(stage=2).training_arguments()


def test_a_ddp_layout_is_refused_where_deepspeed_would_take_over(monkeypatch: pytest.MonkeyPatch) -> None:
    # Accelerate leaves this set after a DeepSpeed run, and `accelerate launch` sets it for a
    # DeepSpeed config: TrainingArguments would then run DeepSpeed in place of DDP.
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(PlanError, match="ACCELERATE_USE_DEEPSPEED=true is set in this process"):
        DDP().training_arguments()
    assert "deepspeed" in ZeRO(stage=2).training_arguments()


# The variables a launcher sets; a plain `python train.py` has none of them (examples/trainer_finetune.py
# runs that way in tests/test_examples.py, and trains).
LAUNCHER_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
                      "MASTER_ADDR", "MASTER_PORT")


def test_only_a_launched_process_names_a_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert "ddp_backend" not in DDP().training_arguments()
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")  # mpirun: Accelerate forms a group too
    assert "ddp_backend" in DDP().training_arguments()
    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert DDP().training_arguments()["ddp_backend"] == ("gloo" if not torch.cuda.is_available() else "nccl")
    assert DDP(process_group_backend="mpi").training_arguments()["ddp_backend"] == "mpi"


# The HF Trainer rows of the conformance matrix.


def _layout(recipe: str) -> str:
    return Path(recipe).stem


def _tensors(result: dict) -> dict:
    """What the run left in tensors: the live model's gathered weights, predictions, resumed weights."""
    return torch.load(result["tensors"], weights_only=True)


def _trained_model(result: dict) -> torch.nn.Module:
    """The live model's gathered weights, in a fresh single-process model."""
    model = parity.build_model("llama")
    model.load_state_dict(_tensors(result)["weights"])
    return model.eval()


def _assert_loads_as(folder: Path, weights: dict[str, torch.Tensor]) -> None:
    """``from_pretrained(folder)`` loads every weight, each equal to ``weights`` (the live model's)."""
    model, loading = LlamaForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(loading.values()), loading  # no missing, unexpected or mismatched weights
    saved = dict(model.named_parameters())
    assert saved.keys() == weights.keys()
    for name, weight in weights.items():
        assert torch.equal(saved[name].detach(), weight), name


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=_layout)
def test_train_evaluates_and_checkpoints_at_the_requested_steps(recipe: str, trainer_results: dict) -> None:
    result = trainer_results[recipe]
    assert result["eval_steps"] == [2, 4]
    run = Path(result["run_dir"])
    assert sorted(path.name for path in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    for step in (2, 4):
        state = json.loads((run / f"checkpoint-{step}" / "trainer_state.json").read_text())
        assert state["global_step"] == step
    # The last checkpoint holds the final weights, loadable without DeepSpeed's zero_to_fp32.
    _assert_loads_as(run / "checkpoint-4", _tensors(result)["weights"])
    matrix.record(FRONT_END, _layout(recipe), {"train with eval and save steps": matrix.WORKS})


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=_layout)
def test_evaluate_reports_the_loss_of_the_trained_model_on_the_eval_set(recipe: str, trainer_results: dict) -> None:
    # On a set the world's eval batches divide: on others the Trainer's own eval_loss weights the
    # padded last batch as a whole one (docs/hf-trainer.md), whatever the layout.
    result = trainer_results[recipe]
    samples = trainer_train.EvalDataset(trainer_train.EVEN_EVAL_SAMPLES).input_ids
    with torch.no_grad():
        expected = _trained_model(result)(input_ids=samples, labels=samples).loss.item()
    assert abs(result["eval_loss"] - expected) < EVAL_TOLERANCE
    matrix.record(FRONT_END, _layout(recipe), {"trainer.evaluate": matrix.WORKS})


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=_layout)
def test_predict_returns_each_eval_sample_exactly_once(recipe: str, trainer_results: dict) -> None:
    result = trainer_results[recipe]
    prediction = _tensors(result)
    samples = trainer_train.EvalDataset().input_ids
    assert prediction["predictions"].shape[0] == trainer_train.EVAL_SAMPLES  # 9: the world of 2 does not divide it
    assert torch.equal(prediction["label_ids"], samples)
    with torch.no_grad():
        expected = _trained_model(result)(input_ids=samples).logits
    assert (prediction["predictions"] - expected).abs().max().item() < EVAL_TOLERANCE
    matrix.record(FRONT_END, _layout(recipe), {"trainer.predict (exact count)": matrix.WORKS})


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=_layout)
def test_save_model_writes_weights_that_from_pretrained_loads(recipe: str, trainer_results: dict) -> None:
    # Under zero3 it wrote no weights ("no file named model.safetensors") until the DeepSpeed
    # config asked for stage3_gather_16bit_weights_on_model_save.
    result = trainer_results[recipe]
    _assert_loads_as(Path(result["saved_dir"]), _tensors(result)["weights"])
    matrix.record(FRONT_END, _layout(recipe), {"save_model + from_pretrained": matrix.WORKS})


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=_layout)
def test_resume_from_checkpoint_ends_where_the_uninterrupted_run_ends(recipe: str, trainer_results: dict) -> None:
    result = trainer_results[recipe]
    assert result["resumed_deepspeed"] == result["deepspeed"]
    assert result["resumed_global_step"] == parity.STEPS
    # The resumed Trainer trains steps 3 and 4 only, with the same losses as the uninterrupted run.
    later_losses = result["losses"][trainer_train.EVERY:]
    assert len(result["resumed_losses"]) == len(later_losses) == parity.STEPS - trainer_train.EVERY
    assert max(abs(a - b) for a, b in zip(result["resumed_losses"], later_losses)) < parity.LOSS_TOLERANCE
    tensors = _tensors(result)
    weights, resumed = tensors["weights"], tensors["resumed_weights"]
    assert max((resumed[key] - weights[key]).abs().max().item() for key in weights) < parity.WEIGHT_TOLERANCE
    matrix.record(FRONT_END, _layout(recipe), {"resume_from_checkpoint=True": matrix.WORKS})


@pytest.mark.parametrize("layout", ["tp", "tp-dp"])
def test_tensor_parallel_recipes_are_refused_by_the_trainer_front_end(layout: str) -> None:
    with pytest.raises(PlanError, match=f"^{re.escape(TP_REFUSAL)}$"):
        meshplan.from_recipe(str(CATALOGUE_DIR / f"{layout}.yaml")).training_arguments()
    reason = matrix.refused("no TP layout in TrainingArguments; use Lightning or Accelerate")
    matrix.record(FRONT_END, layout, {api: reason for api in (
        "train with eval and save steps", "trainer.evaluate", "trainer.predict (exact count)",
        "save_model + from_pretrained", "resume_from_checkpoint=True",
    )})
