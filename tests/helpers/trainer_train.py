"""The HF Trainer on the parity model: the single-process reference and runs under a recipe.

Each recipe's run is both a parity run and the HF Trainer rows of the conformance matrix: it
evaluates and saves every ``EVERY`` steps, then calls ``evaluate``, ``predict`` and
``save_model``, and a second Trainer resumes from the run's first checkpoint. The worker only
records what happened; the tests judge it against independent computations.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

import meshplan

from . import parity

EVAL_SAMPLES = 9  # a world of 2 does not divide it: the last batch is padded, then the padding dropped
EVAL_BATCH = 4  # per device
# The Trainer's eval_loss repeats each batch's mean loss once per sample; the last batch, which
# Accelerate fills with samples from the start of the set, thus counts as a whole one. Its
# eval_loss is the mean loss over the set only when the world's eval batches divide the set.
EVEN_EVAL_SAMPLES = 8
EVERY = 2  # evaluate and save every 2 of the parity.STEPS steps
# The Trainer's batches in the dataset's order, so that a plain loop is its single-process reference.
DATA_IN_ORDER = {"train_sampling_strategy": "sequential"}


class _LossRecorder(TrainerCallback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


class EvalDataset(Dataset):
    """The first ``size`` of EVAL_SAMPLES sequences of random tokens, distinct from the training data."""

    def __init__(self, size: int = EVAL_SAMPLES) -> None:
        generator = torch.Generator().manual_seed(2)
        self.input_ids = torch.randint(3, 64, (EVAL_SAMPLES, parity.SEQUENCE), generator=generator)[:size]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.input_ids[index]}


def train(output_dir: str, batch_size: int, layout: dict[str, Any], *, conformance: bool = False,
          resume: bool = False, model_name: str = "llama") -> tuple[list[float], Trainer]:
    """Trains the tiny Llama (``model_name``: parity.build_model's, "llama-lora" for its peft LoRA model) with
    the HF Trainer; ``layout`` are extra TrainingArguments.

    With ``conformance`` the run also evaluates and saves a checkpoint every EVERY steps;
    ``resume`` continues from the latest checkpoint-N in ``output_dir``.
    """
    schedule = dict(eval_strategy="steps", eval_steps=EVERY, save_strategy="steps", save_steps=EVERY,
                    per_device_eval_batch_size=EVAL_BATCH) if conformance else dict(save_strategy="no")
    arguments = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=batch_size, max_steps=parity.STEPS,
        learning_rate=parity.LEARNING_RATE["llama"], adam_epsilon=parity.ADAM_EPS, weight_decay=0.0,
        lr_scheduler_type="constant", optim="adamw_torch", logging_steps=1, report_to="none",
        seed=0, **schedule, **layout,
    )
    recorder = _LossRecorder()
    trainer = Trainer(model=parity.build_model(model_name), args=arguments, train_dataset=parity.TokenDataset("llama"),
                      eval_dataset=EvalDataset() if conformance else None, callbacks=[recorder])
    trainer.train(resume_from_checkpoint=True if resume else None)
    return recorder.losses, trainer


def save_reference(output_dir: str, path: str, model_name: str = "llama") -> None:
    """Worker entry: the Trainer's own single-process run on the global batch, saved as (losses, weights)."""
    losses, trainer = train(output_dir, parity.GLOBAL_BATCH, {"use_cpu": True}, model_name=model_name)
    torch.save((losses, {key: value.detach().clone() for key, value in trainer.model.named_parameters()}), path)


# The layouts whose runs are repeated with the peft LoRA model (results keyed "<recipe> + LoRA").
LORA_LAYOUTS = ("ddp", "zero2", "zero3")


def lora_key(recipe: str) -> str:
    """The result key of ``recipe``'s run with the LoRA model."""
    return f"{recipe} + LoRA"


def run_recipes(recipes: list[str], reference_path: str, output_dir: str,
                lora_reference_path: str | None = None) -> dict[str, dict[str, Any]]:
    """Worker entry: one Trainer per recipe, through strategy.training_arguments(), and its conformance calls;
    with ``lora_reference_path``, the recipes of LORA_LAYOUTS train the LoRA model too, right after."""
    _, reference_weights = torch.load(reference_path, weights_only=True)
    results = {}
    for recipe in recipes:
        folder = Path(output_dir) / Path(recipe).stem
        results[recipe] = _run_recipe(recipe, folder, reference_weights)
        if lora_reference_path is not None and Path(recipe).stem in LORA_LAYOUTS:
            results[lora_key(recipe)] = _run_lora(recipe, folder / "lora", lora_reference_path)
    if not torch.cuda.is_available():
        # Last: a Trainer with FSDP arguments leaves ACCELERATE_USE_FSDP set in this process.
        results[FSDP2_ON_CPU] = fsdp2_on_cpu(str(Path(output_dir) / "fsdp2-on-cpu"))
    return results


FSDP2_ON_CPU = "fsdp2 arguments with use_cpu"


def fsdp2_on_cpu(output_dir: str) -> dict[str, Any]:
    """What the Trainer does with the FSDP2 arguments meshplan writes for GPUs, given use_cpu=True
    (which Accelerate needs to count CPU workers): the reason training_arguments() refuses FSDP2 on the CPU."""
    from meshplan.fsdp import is_fully_sharded
    from meshplan.hf_trainer import _fsdp_config

    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)  # left by the DeepSpeed recipes before: it would take over
    layout = {"use_cpu": True, "ddp_backend": "gloo", "fsdp": True,
              "fsdp_config": _fsdp_config(meshplan.ZeRO(stage=3, engine="fsdp2").plan)}
    losses, trainer = train(output_dir, parity.GLOBAL_BATCH // trainer_world_size(), layout)
    weights = [None] * dist.get_world_size()
    dist.all_gather_object(weights, {key: value.detach().clone() for key, value in trainer.model.named_parameters()})
    return {"distributed_type": str(trainer.accelerator.distributed_type),
            "model_wrapped": type(trainer.model_wrapped).__name__, "fully_sharded": is_fully_sharded(trainer.model),
            "ranks_hold_the_same_weights": all(torch.equal(weights[0][key], other[key])
                                               for other in weights for key in weights[0])}


def _run_recipe(recipe: str, folder: Path, reference_weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    layout = meshplan.from_recipe(recipe).training_arguments()
    losses, trainer = train(str(folder / "run"), parity.GLOBAL_BATCH // trainer_world_size(), layout, conformance=True)
    weights = parity.full_parameters(trainer.model)  # collective: every rank gathers
    # Read before evaluate() adds an entry of its own.
    eval_steps = [entry["step"] for entry in trainer.state.log_history if "eval_loss" in entry]
    evaluation = trainer.evaluate(EvalDataset(EVEN_EVAL_SAMPLES))
    prediction = trainer.predict(EvalDataset())
    trainer.save_model(str(folder / "saved"))
    resumed_losses, resumed = _resume(folder, recipe)
    tensors = {
        "weights": weights,
        "predictions": torch.as_tensor(prediction.predictions),
        "label_ids": torch.as_tensor(prediction.label_ids),
        "resumed_weights": parity.full_parameters(resumed.model),  # collective
    }
    # Tensors go through a file: a tensor in the result queue is shared by a handle that dies with the worker.
    if dist.get_rank() == 0:
        torch.save(tensors, folder / "tensors.pt")
    return {
        "losses": losses,
        "ddp_backend": trainer.args.ddp_backend,
        "deepspeed": trainer.is_deepspeed_enabled,
        "num_processes": trainer.accelerator.num_processes,
        "run_dir": str(folder / "run"),
        "eval_steps": eval_steps,
        "eval_loss": evaluation["eval_loss"],
        "saved_dir": str(folder / "saved"),
        "tensors": str(folder / "tensors.pt"),
        "resumed_losses": resumed_losses,
        "resumed_global_step": resumed.state.global_step,
        "resumed_deepspeed": resumed.is_deepspeed_enabled,
        "weight_error": _max_error(weights, reference_weights),
    }


def _run_lora(recipe: str, folder: Path, reference_path: str) -> dict[str, Any]:
    """The LoRA model under ``recipe``: its losses, its weights' error against the Trainer's one-process run, and
    whether the adapter ``save_model`` writes loads (PeftModel.from_pretrained) with the weights it trained."""
    from peft import PeftModel

    layout = meshplan.from_recipe(recipe).training_arguments()
    losses, trainer = train(str(folder / "run"), parity.GLOBAL_BATCH // trainer_world_size(), layout, model_name="llama-lora")
    weights = parity.full_parameters(trainer.model)  # collective
    trainer.save_model(str(folder / "saved"))  # collective under ZeRO-3: the adapter's weights are gathered
    saved_error = None
    if dist.get_rank() == 0:
        loaded = PeftModel.from_pretrained(parity.build_model("llama"), str(folder / "saved"))
        saved_error = _max_error({key: value.detach() for key, value in loaded.named_parameters()}, weights)
    _, reference_weights = torch.load(reference_path, weights_only=True)
    return {"losses": losses, "weight_error": _max_error(weights, reference_weights), "saved_adapter_error": saved_error,
            "deepspeed": trainer.is_deepspeed_enabled,
            "trainable": sorted(name for name, parameter in trainer.model.named_parameters() if parameter.requires_grad)}


def _max_error(weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    return max((weights[key] - expected[key]).abs().max().item() for key in expected)


def _resume(folder: Path, recipe: str) -> tuple[list[float], Trainer]:
    # An interrupted run: a fresh output folder that holds only the run's first checkpoint,
    # and a new script's own arguments.
    layout = meshplan.from_recipe(recipe).training_arguments()
    interrupted = folder / "interrupted"
    if dist.get_rank() == 0:
        shutil.copytree(folder / "run" / f"checkpoint-{EVERY}", interrupted / f"checkpoint-{EVERY}")
    dist.barrier()
    return train(str(interrupted), parity.GLOBAL_BATCH // trainer_world_size(), layout, conformance=True, resume=True)


def trainer_world_size() -> int:
    """The number of workers, as the launcher set it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def plain_loop_reference() -> tuple[list[float], dict[str, torch.Tensor]]:
    """The single-process reference of ``train`` given DATA_IN_ORDER: a plain loop over the global batches
    in order with what ``train`` asks the Trainer for (AdamW without weight decay, a constant
    learning rate, gradients clipped at TrainingArguments' default max_grad_norm). Returns the
    losses per step and the final weights."""
    model = parity.build_model("llama")
    optimizer = torch.optim.AdamW(model.parameters(), lr=parity.LEARNING_RATE["llama"], eps=parity.ADAM_EPS, weight_decay=0.0)
    max_grad_norm = next(field.default for field in dataclasses.fields(TrainingArguments) if field.name == "max_grad_norm")
    losses = []
    for batch in DataLoader(parity.TokenDataset("llama"), batch_size=parity.GLOBAL_BATCH):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, {key: value.detach().clone() for key, value in model.named_parameters()}
