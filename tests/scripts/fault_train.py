"""A Lightning script that checkpoints every step and resumes from the latest checkpoint by itself.

    torchrun --nproc-per-node 2 --max-restarts 2 tests/scripts/fault_train.py FOLDER LAYOUT [--kill]

It trains the parity model (one step per epoch, see tests/helpers/resume.py) under LAYOUT with a checkpoint
after every step in FOLDER/checkpoints, starting from ``meshplan.latest_checkpoint`` of that
folder. With --kill, rank 1 SIGKILLs itself twice: on the first attempt at the start of step 3
(mid-training), on the second in the middle of writing the step-3 checkpoint (mid-save).
torchrun restarts the job each time. Rank 0 logs every attempt to FOLDER/attempts.jsonl and
writes the final weights to FOLDER/weights.pt.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the helpers package

import meshplan  # noqa: E402
from helpers import resume  # noqa: E402
from meshplan.checkpoint.tensor_files import TensorFileWriter  # noqa: E402

LAYOUTS = {"ddp": meshplan.DDP, "zero2": lambda: meshplan.ZeRO(stage=2), "tp": lambda: meshplan.TensorParallel(tp_size=2)}
KILLED_AT_STEP = 3


class KillRank1MidTraining(pl.Callback):
    """Rank 1 dies by SIGKILL when step 3 starts: no clean-up, no exception."""

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_rank == 1 and trainer.global_step == KILLED_AT_STEP - 1:
            os.kill(os.getpid(), signal.SIGKILL)


def kill_rank1_mid_save() -> None:
    """Rank 1 dies by SIGKILL after writing the first tensor of the step-3 checkpoint."""
    write = TensorFileWriter.write

    def write_then_die(self: TensorFileWriter, name: str, tensor: torch.Tensor) -> None:
        write(self, name, tensor)
        if f"step={KILLED_AT_STEP}" in str(self.path) and os.environ["RANK"] == "1":
            os.kill(os.getpid(), signal.SIGKILL)

    TensorFileWriter.write = write_then_die


def main(folder: str, layout: str, kill: bool = False) -> None:
    folder_path = Path(folder)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    checkpoints = folder_path / "checkpoints"
    latest = meshplan.latest_checkpoint(checkpoints)
    rank = int(os.environ["RANK"])
    if rank == 0:
        with open(folder_path / "attempts.jsonl", "a") as log:
            log.write(json.dumps({"attempt": attempt, "resumed_from": latest and Path(latest).name}) + "\n")
    callbacks: list[pl.Callback] = []
    if kill and attempt == 0:
        callbacks.append(KillRank1MidTraining())
    if kill and attempt == 1:
        kill_rank1_mid_save()
    module = resume.StepPerEpochModule("llama", 8)
    trainer = pl.Trainer(
        accelerator="cpu", devices=int(os.environ["LOCAL_WORLD_SIZE"]), strategy=LAYOUTS[layout](), max_epochs=resume.parity.STEPS,
        callbacks=[pl.callbacks.ModelCheckpoint(dirpath=checkpoints, filename="{step}", save_top_k=-1), *callbacks],
        use_distributed_sampler=False, logger=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, ckpt_path=latest)
    weights = resume.parity.full_parameters(module.model)
    if rank == 0:
        torch.save({key: value.cpu() for key, value in weights.items()}, folder_path / "weights.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], kill="--kill" in sys.argv[3:])
