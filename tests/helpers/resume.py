"""Resume harness: train with checkpoints, resume from one under any layout, compare with the reference.

One optimizer step per epoch: epoch e trains on global batch e of the reference run. Lightning
restarts a plain data loader from the start of its epoch when it resumes, so with one step per
epoch every checkpoint written at an epoch's end is a step boundary to resume from exactly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Sampler

from meshplan.lightning import from_plan
from meshplan.plan import Plan

from . import parity

# The layouts every checkpoint test trains under, by label.
LAYOUTS = {
    "DDP": Plan.build("ddp"),
    "ZeRO-1": Plan.build("zero", zero_stage=1),
    "ZeRO-2": Plan.build("zero", zero_stage=2),
    "ZeRO-3": Plan.build("zero", zero_stage=3),
    "ZeRO-3-offload": Plan.build("zero", zero_stage=3, offload_optimizer=True, offload_parameters=True),
    "TP-2": Plan.build("tp", tp_size=2),
}
RESUMED_AFTER = 2
# (label, checkpoint written by, layout resumed under)
CROSS_LAYOUT = [("ZeRO-3->TP-2", "ZeRO-3", "TP-2"), ("TP-2->ZeRO-2", "TP-2", "ZeRO-2"),
                ("4-processes->ZeRO-2", "TP-2xDP-2", "ZeRO-2")]


def step_checkpoint(label: str, step: int) -> str:
    """The checkpoint the run ``label`` wrote after ``step``, relative to the runs' folder."""
    return f"{label}/step={step}.ckpt"


class StepPerEpochSampler(Sampler[int]):
    """Epoch e is global batch e; rank r of the data-parallel group takes the r-th share of it, in order."""

    def __init__(self, rank: int, replicas: int) -> None:
        self.rank, self.per_rank, self.epoch = rank, parity.GLOBAL_BATCH // replicas, 0

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at the start of every epoch (also after resuming)."""
        self.epoch = epoch

    def __iter__(self):
        start = self.epoch * parity.GLOBAL_BATCH + self.rank * self.per_rank
        return iter(range(start, start + self.per_rank))

    def __len__(self) -> int:
        return self.per_rank


class StepPerEpochModule(parity.ParityModule):
    """The parity module, one optimizer step per epoch."""

    def train_dataloader(self) -> DataLoader:
        share = self.trainer.strategy.distributed_sampler_kwargs or {"rank": 0, "num_replicas": 1}
        sampler = StepPerEpochSampler(share["rank"], share["num_replicas"])
        return DataLoader(parity.TokenDataset(self.name), batch_size=sampler.per_rank, sampler=sampler)


def world() -> tuple[int, int]:
    """(nodes, devices per node) of this worker's spawn; read before Lightning's teardown removes them."""
    devices = int(os.environ["LOCAL_WORLD_SIZE"])
    return int(os.environ["WORLD_SIZE"]) // devices, devices


def fit(plan: Plan, model: str, nodes_and_devices: tuple[int, int], checkpoints: str | None = None,
        resume: str | None = None, steps: int = parity.STEPS) -> tuple[list[float], dict[str, torch.Tensor], pl.Trainer]:
    """Trains ``model`` up to ``steps`` under ``plan``, checkpointing every step into ``checkpoints``
    and resuming from ``resume``. Returns the global loss of each step run here and the final weights."""
    module = StepPerEpochModule(model, parity.GLOBAL_BATCH)
    num_nodes, devices = nodes_and_devices
    callbacks = [ModelCheckpoint(dirpath=checkpoints, filename="{step}", save_top_k=-1)] if checkpoints else []
    trainer = pl.Trainer(
        accelerator=parity.ACCELERATOR, devices=devices, num_nodes=num_nodes, strategy=from_plan(plan), max_epochs=steps,
        callbacks=callbacks, enable_checkpointing=bool(checkpoints), use_distributed_sampler=False, logger=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, ckpt_path=resume)
    losses = torch.tensor(module.losses, dtype=torch.float64)
    dist.all_reduce(losses)
    losses /= dist.get_world_size()
    return losses.tolist(), {k: v.cpu() for k, v in parity.full_parameters(module.model).items()}, trainer


def weight_error(weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """The largest elementwise difference over all parameters."""
    return max((weights[key] - reference[key]).abs().max().item() for key in reference)


def _save_with_failing_writes(run: dict[str, Any], nodes_and_devices: tuple[int, int], folder: Path) -> dict[str, Any]:
    """Trains one step, then saves while every tensor write of one rank fails as on a full disk."""
    from meshplan.checkpoint.tensor_files import TensorFileWriter

    _, _, trainer = fit(run["plan"], run["model"], nodes_and_devices, steps=1)
    write = TensorFileWriter.write

    def write_to_a_full_disk(self: TensorFileWriter, name: str, tensor: torch.Tensor) -> None:
        if dist.get_rank() == run["fail_writes_on_rank"]:
            raise OSError(28, "No space left on device")
        write(self, name, tensor)

    TensorFileWriter.write = write_to_a_full_disk
    target = folder / run["label"] / "failed.ckpt"
    try:
        trainer.save_checkpoint(target)
        error = "none"
    except Exception as raised:  # noqa: BLE001 - the test asserts on the type and message
        error = f"{type(raised).__name__}: {raised}"
    finally:
        TensorFileWriter.write = write
    return {"error": error, "published": target.exists()}


def train_and_resume(runs: list[dict[str, Any]], reference_paths: dict[str, str], folder: str) -> dict[str, Any]:
    """Worker entry. Each run: ``label``, ``model``, ``plan``; optional ``resume`` (a checkpoint to
    continue from, otherwise train from scratch with a checkpoint every step into ``folder/label``),
    ``expect_error`` (resuming must fail: the error is reported instead) and ``fail_writes_on_rank``
    (a save whose writes fail on that rank: the error each rank saw is reported).

    Returns per label: the global losses of the steps run, the final weight error against the
    reference, and (rank 0) the final weights saved as ``folder/label.weights.pt``.
    """
    results = {}
    nodes_and_devices = world()
    for run in runs:
        if run.get("fail_writes_on_rank") is not None:
            results[run["label"]] = _save_with_failing_writes(run, nodes_and_devices, Path(folder))
            continue
        if run.get("expect_error"):  # a checkpoint that must be refused: report how
            try:
                fit(run["plan"], run["model"], nodes_and_devices, resume=run["resume"])
            except Exception as error:  # noqa: BLE001 - the test asserts on the type and message
                results[run["label"]] = {"error": f"{type(error).__name__}: {error}"}
                continue
            results[run["label"]] = {"error": "none"}
            continue
        checkpoints = None if run.get("resume") else str(Path(folder) / run["label"])
        losses, weights, trainer = fit(run["plan"], run["model"], nodes_and_devices, checkpoints, run.get("resume"))
        _, reference = torch.load(reference_paths[run["model"]], weights_only=True)  # keyed by model name
        results[run["label"]] = {"losses": losses, "weight_error": weight_error(weights, reference),
                                 "global_step": trainer.global_step}
        if dist.get_rank() == 0:
            torch.save(weights, Path(folder) / f"{run['label']}.weights.pt")
    return results
