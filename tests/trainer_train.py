"""The HF Trainer on the parity model: the single-process reference and runs under a recipe."""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import meshplan
import parity


class _LossRecorder(TrainerCallback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def train(output_dir: str, batch_size: int, layout: dict[str, Any]) -> tuple[list[float], Trainer]:
    """Trains the tiny Llama with the HF Trainer; ``layout`` are extra TrainingArguments."""
    arguments = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=batch_size, max_steps=parity.STEPS,
        learning_rate=parity.LEARNING_RATE["llama"], adam_epsilon=parity.ADAM_EPS, weight_decay=0.0,
        lr_scheduler_type="constant", optim="adamw_torch", logging_steps=1, save_strategy="no", report_to="none",
        seed=0, **layout,
    )
    recorder = _LossRecorder()
    trainer = Trainer(model=parity.build_model("llama"), args=arguments, train_dataset=parity.TokenDataset("llama"),
                      callbacks=[recorder])
    trainer.train()
    return recorder.losses, trainer


def save_reference(output_dir: str, path: str) -> None:
    """Worker entry: the Trainer's own single-process run on the global batch, saved as (losses, weights)."""
    losses, trainer = train(output_dir, parity.GLOBAL_BATCH, {"use_cpu": True})
    torch.save((losses, {key: value.detach().clone() for key, value in trainer.model.named_parameters()}), path)


def run_recipes(recipes: list[str], reference_path: str, output_dir: str) -> dict[str, dict[str, Any]]:
    """Worker entry: one Trainer per recipe, through strategy.training_arguments()."""
    _, reference_weights = torch.load(reference_path, weights_only=True)
    results = {}
    for recipe in recipes:
        layout = meshplan.from_recipe(recipe).training_arguments()
        losses, trainer = train(output_dir, parity.GLOBAL_BATCH // trainer_world_size(), layout)
        weights = parity.full_parameters(trainer.model)
        results[recipe] = {
            "losses": losses,
            "ddp_backend": trainer.args.ddp_backend,
            "weight_error": max((weights[key] - reference_weights[key]).abs().max().item() for key in reference_weights),
            "deepspeed": trainer.is_deepspeed_enabled,
            "num_processes": trainer.accelerator.num_processes,
        }
    return results


def trainer_world_size() -> int:
    """The number of workers, as the launcher set it."""
    return int(os.environ.get("WORLD_SIZE", "1"))
