"""Resume harness: train with checkpoints, resume from one under any layout, compare with the reference.

One optimizer step per epoch: epoch e trains on global batch e of the reference run. Lightning
restarts a plain data loader from the start of its epoch when it resumes, so with one step per
epoch every checkpoint written at an epoch's end is a step boundary to resume from exactly.

The chain moves one training run through four layouts, a step in each: DeepSpeed ZeRO-3 on 2
processes, TP 2 x FSDP2 2 on 4, FSDP2 on 2, then one process. Its 2-process link resumes a
checkpoint the 4 processes wrote, so the 4-process spawn ends on its first 2 ranks
(``processes`` below) rather than starting a spawn of its own.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Sampler

from meshplan.launch import free_port, worker_environment
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
    "FSDP2": Plan.build("zero", zero_stage=3, engine="fsdp2"),
}
# The layouts the 4-process spawn trains under (TP 2 x data parallel 2, replicated or sharded).
FOUR_PROCESS_LAYOUTS = {
    "TP-2xDP-2": Plan.build("tp", tp_size=2),
    "TP-2xFSDP2-2": Plan.build("tp", tp_size=2, data_parallel="shard"),
}
RESUMED_AFTER = 2
# (label, checkpoint written by, layout resumed under): resumed by the 2-process spawn.
CROSS_LAYOUT = [("ZeRO-3->TP-2", "ZeRO-3", "TP-2"), ("TP-2->ZeRO-2", "TP-2", "ZeRO-2"),
                ("FSDP2->ZeRO-3", "FSDP2", "ZeRO-3"), ("ZeRO-3->FSDP2", "ZeRO-3", "FSDP2"),
                ("TP-2->FSDP2-stage-2", "TP-2", "FSDP2-stage-2")]
# Resumed by the first 2 ranks of the 4-process spawn, from a checkpoint of 4 processes.
FOUR_TO_TWO = [("4-processes->ZeRO-2", "TP-2xDP-2", "ZeRO-2")]
TARGETS = {**LAYOUTS, "FSDP2-stage-2": Plan.build("zero", zero_stage=2, engine="fsdp2")}

# The chain, one step per link: (label, layout, processes, checkpoint resumed). Its first link is
# the ZeRO-3 run of LAYOUTS (2 processes, a checkpoint every step); each link resumes the last
# step's checkpoint of the link before it and trains the next step, with a checkpoint.
CHAIN = [
    ("ZeRO-3", LAYOUTS["ZeRO-3"], 2, None),
    ("chain-TP-2xFSDP2-2", FOUR_PROCESS_LAYOUTS["TP-2xFSDP2-2"], 4, "ZeRO-3"),
    ("chain-FSDP2", LAYOUTS["FSDP2"], 2, "chain-TP-2xFSDP2-2"),
    ("chain-one-process", Plan.build("ddp"), 1, "chain-FSDP2"),
]
# A peft LoRA run (checkpoints hold only the adapters and their optimizer state) through DeepSpeed
# ZeRO-3 x 2 -> TP x 2 -> one process; its first link is LORA_RUN, trained from scratch.
LORA_MODEL = "llama-lora"
LORA_CHAIN = [
    ("LoRA-ZeRO-3", LAYOUTS["ZeRO-3"], 2, None),
    ("LoRA-chain-TP-2", LAYOUTS["TP-2"], 2, "LoRA-ZeRO-3"),
    ("LoRA-chain-one-process", Plan.build("ddp"), 1, "LoRA-chain-TP-2"),
]
LORA_RUN = {"label": LORA_CHAIN[0][0], "model": LORA_MODEL, "plan": LORA_CHAIN[0][1]}


def two_process_runs(folder: Path) -> list[dict[str, Any]]:
    """Every layout of LAYOUTS from scratch (a checkpoint every step), each resumed from its own step-2
    checkpoint, and the CROSS_LAYOUT resumes: the 2-process spawn's runs, the first spawn."""
    runs = [{"label": label, "model": "llama", "plan": plan} for label, plan in LAYOUTS.items()]
    runs += [{"label": f"{label}-resumed", "model": "llama", "plan": plan, "resume": str(folder / step_checkpoint(label, RESUMED_AFTER))}
             for label, plan in LAYOUTS.items()]
    runs += [{"label": label, "model": "llama", "plan": TARGETS[target], "resume": str(folder / step_checkpoint(source, RESUMED_AFTER))}
             for label, source, target in CROSS_LAYOUT]
    return runs


def four_process_runs(folder: Path) -> list[dict[str, Any]]:
    """The 4-process spawn's runs, after the 2-process spawn: FOUR_PROCESS_LAYOUTS from scratch, the chain's
    4-process link, then, on its first 2 ranks, the FOUR_TO_TWO resumes and the chain's 2-process link."""
    runs = [{"label": label, "model": "llama", "plan": plan} for label, plan in FOUR_PROCESS_LAYOUTS.items()]
    runs += chain_runs(4, folder)
    runs += [{"label": label, "model": "llama", "plan": TARGETS[target], "processes": 2,
              "resume": str(folder / step_checkpoint(source, RESUMED_AFTER))} for label, source, target in FOUR_TO_TWO]
    runs += [{**run, "processes": 2} for run in chain_runs(2, folder)]
    return runs


def chain_runs(processes: int, folder: Path, chain: list[tuple[str, Plan, int, str | None]] = CHAIN,
               model: str = "llama") -> list[dict[str, Any]]:
    """The links of ``chain`` that ``processes`` processes run (spawned on ``processes``, or on the first two
    ranks of the 4-process spawn), as ``train_and_resume`` runs. Each link trains one step; the last
    one trains to the reference's last step."""
    runs = []
    for step, (label, plan, link_processes, resumed) in enumerate(chain, start=1):
        if resumed is None or link_processes != processes:
            continue
        steps = parity.STEPS if step == len(chain) else step
        runs.append({"label": label, "model": model, "plan": plan, "resume": str(folder / step_checkpoint(resumed, step - 1)),
                     "steps": steps, "save": True})
    return runs


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
    """Trains ``model`` up to step ``steps`` under ``plan``, checkpointing every step into ``checkpoints``
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


def _first_ranks_only(processes: int) -> bool:
    """Makes the first ``processes`` ranks of this spawn a world of their own (a new default process
    group on a new port, as a launcher of that many processes would); the others leave it. Returns
    whether this rank is in the new world."""
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    port = [free_port()]
    dist.broadcast_object_list(port, src=0)
    rank = dist.get_rank()
    dist.destroy_process_group()
    if rank >= processes:
        return False
    os.environ.update(worker_environment(rank, processes, port[0]))
    return True


def train_and_resume(runs: list[dict[str, Any]], reference_paths: dict[str, str], folder: str) -> dict[str, Any]:
    """Worker entry. Each run: ``label``, ``model``, ``plan``; optional ``resume`` (a checkpoint to
    continue from, otherwise train from scratch with a checkpoint every step into ``folder/label``),
    ``steps`` (the step to train up to; all of the reference's by default), ``save`` (write a checkpoint
    every step even when resuming), ``processes`` (run on the first that many ranks of this spawn,
    in a world of their own: such runs come last), ``expect_error`` (resuming must fail: the error is
    reported instead) and ``fail_writes_on_rank`` (a save whose writes fail on that rank: the error
    each rank saw is reported).

    Returns per label: the global losses of the steps run, the final weight error against the
    reference (for runs to the reference's last step), the step reached, the seconds the run took,
    and (rank 0) the final weights saved as ``folder/label.weights.pt``.
    """
    results = {}
    nodes_and_devices = world()
    for run in runs:
        if run.get("processes") is not None and run["processes"] != nodes_and_devices[0] * nodes_and_devices[1]:
            if not _first_ranks_only(run["processes"]):
                break  # this rank has no part in the rest
            nodes_and_devices = world()
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
        steps = run.get("steps", parity.STEPS)
        checkpoints = str(Path(folder) / run["label"]) if run.get("save") or not run.get("resume") else None
        started = time.perf_counter()
        losses, weights, trainer = fit(run["plan"], run["model"], nodes_and_devices, checkpoints, run.get("resume"), steps)
        _, reference = torch.load(reference_paths[run["model"]], weights_only=True)  # keyed by model name
        results[run["label"]] = {"losses": losses, "global_step": trainer.global_step, "seconds": time.perf_counter() - started,
                                 "weight_error": weight_error(weights, reference) if steps == parity.STEPS else None}
        if dist.get_rank() == 0:
            torch.save(weights, Path(folder) / f"{run['label']}.weights.pt")
    return results
