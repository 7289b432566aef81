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


RESUME_AFTER = 2  # steps before the checkpoint that the script resumes from


def main(output: str, reference_path: str, strategy_or_recipe: object = None, clip: float | None = None,
         model_name: str = "llama", resume_from: str | None = None) -> None:
    """Trains and writes the results; ``strategy_or_recipe`` goes to meshplan.accelerator(), and
    with ``clip`` the loop clips gradients with accelerator.clip_grad_norm_.

    The run saves its state after RESUME_AFTER steps (``state-step2`` next to ``output``) and at
    the end (``state-final``), then loads the first, trains the remaining steps again and reports
    how far those losses and weights are from the uninterrupted run's. With ``resume_from`` it
    instead starts from that checkpoint (saved under any layout) and trains the remaining steps.
    """
    accelerator = meshplan.accelerator(strategy_or_recipe)
    data_parallel_size = accelerator.num_processes // getattr(accelerator, "tp_size", 1)
    model = parity.build_model(model_name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=parity.LEARNING_RATE[model_name], eps=parity.ADAM_EPS)
    loader = DataLoader(parity.TokenDataset(model_name), batch_size=parity.GLOBAL_BATCH // data_parallel_size)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    folder = Path(output).parent
    if resume_from:
        accelerator.load_state(resume_from)
        losses = _train(accelerator, model, optimizer, accelerator.skip_first_batches(loader, RESUME_AFTER), clip)
        extra = {}
    else:
        losses = _train(accelerator, model, optimizer, loader, clip, save_after=(RESUME_AFTER, folder / "state-step2"))
        accelerator.save_state(str(folder / "state-final"))
        final = parity.full_parameters(accelerator.unwrap_model(model))
        accelerator.load_state(str(folder / "state-step2"))
        resumed_losses = _train(accelerator, model, optimizer, accelerator.skip_first_batches(loader, RESUME_AFTER), clip)
        resumed = parity.full_parameters(accelerator.unwrap_model(model))
        extra = {"resumed_losses": resumed_losses,
                 "resume_weight_error": max((resumed[key] - final[key]).abs().max().item() for key in final)}
    weights = parity.full_parameters(accelerator.unwrap_model(model))
    _, reference = torch.load(reference_path, weights_only=True)
    weight_error = max((weights[key].cpu() - reference[key]).abs().max().item() for key in reference)
    if accelerator.is_main_process:
        torch.save({key: value.cpu() for key, value in weights.items()}, folder / "weights.pt")
        Path(output).write_text(json.dumps({
            "losses": losses, "weight_error": weight_error, "num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type), "data_parallel_size": data_parallel_size, **extra,
        }))
    accelerator.end_training()


def _train(accelerator, model, optimizer, loader, clip, save_after=None) -> list[float]:
    """One pass over ``loader``; the global loss of every step. ``save_after=(k, folder)`` saves after step k."""
    losses = []
    for batch in loader:
        loss = model(**batch).loss
        accelerator.backward(loss)
        if clip is not None:
            accelerator.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(accelerator.reduce(loss.detach(), "mean").item())
        if save_after is not None and len(losses) == save_after[0]:
            accelerator.save_state(str(save_after[1]))
    return losses


if __name__ == "__main__":
    main(*sys.argv[1:])
