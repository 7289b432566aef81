"""The shortest Accelerate script under a meshplan recipe: one training step, and no end_training().

    accelerate launch --config_file recipes/zero3.yaml --num_processes 2 tests/conformance_accelerate.py OUT.txt

Writes the loss of its step on the main process, then returns without calling
``accelerator.end_training()``, as many scripts do: the launch must still exit 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))

import meshplan  # noqa: E402
import parity  # noqa: E402


def main(output: str) -> None:
    """One step of the parity model on the launched recipe; the loss goes to ``output``."""
    accelerator = meshplan.accelerator()
    model = parity.build_model("llama")
    optimizer = torch.optim.AdamW(model.parameters(), lr=parity.LEARNING_RATE["llama"], eps=parity.ADAM_EPS)
    loader = DataLoader(parity.TokenDataset("llama"), batch_size=parity.GLOBAL_BATCH // accelerator.num_processes)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    loss = model(**next(iter(loader))).loss
    accelerator.backward(loss)
    optimizer.step()
    loss = accelerator.reduce(loss.detach(), "mean").item()
    if accelerator.is_main_process:
        Path(output).write_text(f"{loss}\n")


if __name__ == "__main__":
    main(sys.argv[1])
