"""A training script written for plain Accelerate; the only meshplan line is meshplan.accelerator().

    accelerate launch --config_file recipes/zero2.yaml --num_processes 2 tests/accelerate_train.py OUT.json REFERENCE.pt [RECIPE]

Trains the parity model for parity.STEPS steps on the global batch split over the data-parallel
ranks, and writes the global loss per step and the worst weight error against the reference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))

import meshplan  # noqa: E402
import parity  # noqa: E402


def main(output: str, reference_path: str, strategy_or_recipe: object = None, clip: float | None = None,
         model_name: str = "llama") -> None:
    """Trains and writes the results; ``strategy_or_recipe`` goes to meshplan.accelerator(), and
    with ``clip`` the loop clips gradients with accelerator.clip_grad_norm_."""
    accelerator = meshplan.accelerator(strategy_or_recipe)
    data_parallel_size = accelerator.num_processes // getattr(accelerator, "tp_size", 1)
    model = parity.build_model(model_name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=parity.LEARNING_RATE[model_name], eps=parity.ADAM_EPS)
    loader = DataLoader(parity.TokenDataset(model_name), batch_size=parity.GLOBAL_BATCH // data_parallel_size)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    losses = []
    for batch in loader:
        loss = model(**batch).loss
        accelerator.backward(loss)
        if clip is not None:
            accelerator.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(accelerator.reduce(loss.detach(), "mean").item())
    weights = parity.full_parameters(accelerator.unwrap_model(model))
    _, reference = torch.load(reference_path, weights_only=True)
    weight_error = max((weights[key].cpu() - reference[key]).abs().max().item() for key in reference)
    restore_error = _save_step_and_restore(accelerator, model, optimizer, batch, weights, Path(output).parent / "state")
    if accelerator.is_main_process:
        Path(output).write_text(json.dumps({
            "losses": losses, "weight_error": weight_error, "num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type), "data_parallel_size": data_parallel_size,
            "restore_error": restore_error,
        }))
    accelerator.end_training()


def _save_step_and_restore(accelerator, model, optimizer, batch, weights, folder: Path) -> float:
    """save_state, one more step (weights move), load_state: the saved weights must come back."""
    accelerator.save_state(str(folder))
    accelerator.backward(model(**batch).loss)
    optimizer.step()
    optimizer.zero_grad()
    accelerator.load_state(str(folder))
    restored = parity.full_parameters(accelerator.unwrap_model(model))
    return max((restored[key] - weights[key]).abs().max().item() for key in weights)


if __name__ == "__main__":
    main(*sys.argv[1:])
