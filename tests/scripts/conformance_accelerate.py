"""The shortest Accelerate script under a meshplan recipe: one training step, and no end_training().

    accelerate launch --config_file recipes/zero3.yaml --num_processes 2 tests/scripts/conformance_accelerate.py OUT.txt

Writes the loss of its step on the main process, then returns without calling
``accelerator.end_training()``, as many scripts do: the launch must still exit 0. At exit each
rank writes whether its process group was still alive once meshplan's teardown had run
(OUT.txt.atexit.RANK).
"""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the helpers package

import meshplan  # noqa: E402
from helpers import parity  # noqa: E402


def main(output: str) -> None:
    """One step of the parity model on the launched recipe; the loss goes to ``output``."""
    # Registered before meshplan's own exit handler, so it runs after it (atexit is last in, first out).
    atexit.register(_report_process_group, f"{output}.atexit.{os.environ['RANK']}")
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


def _report_process_group(path: str) -> None:
    Path(path).write_text(str(torch.distributed.is_initialized()))


if __name__ == "__main__":
    main(sys.argv[1])
