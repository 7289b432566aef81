"""The train function that Ray Train runs in each of its workers (tests/test_ray.py), and its references.

``all_runs`` is the whole module's one fit. First, once: the Lightning train function of Ray's
documentation with only its strategy swapped for ``meshplan.ray.strategy(layout)`` under every
layout, an Accelerate loop through ``meshplan.accelerator(recipe)`` and the HF Trainer through
``training_arguments()`` (``front_ends``). Then the same Lightning function with Ray's documented
resume (``ray.train.get_checkpoint()``), whose rank 1 dies mid-training on the first attempt
(``killed_and_resumed``); Ray restarts the function, which skips the front ends the second time.

Workers only record what happened, into JSON files and tensors under ``config["out"]``; the
tests judge it. Every collective below runs in Ray's process group: Ray starts it before the
train function runs.
"""

from __future__ import annotations

import json
import os
import signal
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import ray.train
import torch
import torch.distributed as dist
from ray.train.lightning import RayLightningEnvironment, RayTrainReportCallback, prepare_trainer
from torch.utils.data import DataLoader

import meshplan
import meshplan.ray
from meshplan._compat.accelerate import reset_process_state

from . import accelerate_train, parity, resume, trainer_train

# Lightning layouts as catalogue recipes, and the per-rank batch of each on two workers.
LIGHTNING_LAYOUTS = {"ddp": 4, "zero2": 4, "zero3": 4, "tp": 8}
# Non-DeepSpeed runs first: a DeepSpeed Accelerator leaves ACCELERATE_USE_DEEPSPEED set in the
# process, and the HF Trainer's DDP layout is refused while it is set.
OTHER_FRONT_ENDS = [("accelerate", "ddp"), ("accelerate", "tp"), ("hf_trainer", "ddp"), ("accelerate", "zero2"),
                    ("accelerate", "zero3"), ("hf_trainer", "zero2"), ("hf_trainer", "zero3")]
KILLED_AT_STEP = 3
KILLED_LAYOUT = "tp"  # no DeepSpeed to import again in the restarted workers; Ray has no TP strategy of its own


def _documented_trainer(strategy: Any, callbacks: list[pl.Callback] = (), **trainer_arguments: Any) -> pl.Trainer:
    """Ray's documented Lightning Trainer (getting-started-pytorch-lightning), with ``strategy`` in place of
    RayDDPStrategy(); the test's Trainer settings keep the run quiet and the data in the reference's order."""
    trainer = pl.Trainer(
        devices="auto", accelerator="auto", strategy=strategy,
        plugins=[RayLightningEnvironment()], callbacks=[RayTrainReportCallback(), *callbacks],
        use_distributed_sampler=False, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, **trainer_arguments,
    )
    return prepare_trainer(trainer)


def _world() -> dict[str, Any]:
    """What Ray and torch say about this worker."""
    context = ray.train.get_context()
    return {"ray_world_size": context.get_world_size(), "ray_rank": context.get_world_rank(),
            "ray_local_world_size": context.get_local_world_size(), "torch_world_size": dist.get_world_size(),
            "torch_rank": dist.get_rank()}


def _global_losses(losses: list[float]) -> list[float]:
    """The mean over the ranks of each step's loss (collective)."""
    tensor = torch.tensor(losses, dtype=torch.float64)
    dist.all_reduce(tensor)
    return (tensor / dist.get_world_size()).tolist()


def _weight_error(weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    return max((weights[key].cpu() - reference[key]).abs().max().item() for key in reference)


def _refusal(run: Callable[[], Any]) -> str:
    """The error ``run`` raises, as 'Type: message', or 'none'."""
    try:
        run()
    except Exception as error:  # noqa: BLE001 - the test asserts on the type and message
        return f"{type(error).__name__}: {error}"
    return "none"


def all_runs(config: dict[str, Any]) -> None:
    """Train function: the front ends (first attempt only), then the killed-and-resumed run."""
    out = Path(config["out"])
    restored = ray.train.get_checkpoint()  # read first, as Ray documents: later reports would replace it
    front_ends_done = out / "front-ends-done"
    if not front_ends_done.exists():
        front_ends(config)
        dist.barrier()
        if dist.get_rank() == 0:
            front_ends_done.touch()
    killed_and_resumed(config, restored)


# ---------------------------------------------------------------- the front ends


def front_ends(config: dict[str, Any]) -> None:
    """Every front end under its layouts, on Ray's two workers; each rank writes rank-N.json."""
    out = Path(config["out"])
    results: dict[str, Any] = {"world": _world()}
    results["refused"] = _refusals()
    _, reference = torch.load(config["reference"], weights_only=True)
    for layout, batch_size in LIGHTNING_LAYOUTS.items():
        results[f"lightning/{layout}"], trainer = _timed(_lightning_run, layout, batch_size, reference)
        if layout == "ddp":
            results["refused"]["rank 0's folder unreachable"] = _save_where_rank_0_cannot_write(trainer, out)
    _, trainer_reference = torch.load(config["trainer_reference"], weights_only=True)
    for front_end, layout in OTHER_FRONT_ENDS:
        run = _accelerate_run if front_end == "accelerate" else _trainer_run
        try:
            results[f"{front_end}/{layout}"] = _timed(run, layout, reference if front_end == "accelerate" else trainer_reference, out)
        except Exception:  # recorded for the test's message; the other front ends still run
            results[f"{front_end}/{layout}"] = {"error": traceback.format_exc()[-3000:]}
    (out / f"rank-{dist.get_rank()}.json").write_text(json.dumps(results))


def _timed(run: Callable[..., Any], *args: Any) -> Any:
    """``run(*args)``'s result (a dict, or a dict and more) with the seconds it took."""
    start = time.perf_counter()
    result = run(*args)
    seconds = {"seconds": round(time.perf_counter() - start, 1)}
    return (result[0] | seconds, *result[1:]) if isinstance(result, tuple) else result | seconds


def _save_where_rank_0_cannot_write(trainer: pl.Trainer, out: Path) -> str:
    """trainer.save_checkpoint to a path of each rank's own, where rank 0's folder cannot be made (below a file)."""
    blocker = out / "a-file"
    if dist.get_rank() == 0:
        blocker.touch()
    dist.barrier()
    return _refusal(lambda: trainer.save_checkpoint(blocker / f"rank-{dist.get_rank()}" / "model.ckpt"))


def _refusals() -> dict[str, str]:
    """What the Lightning function does with a layout Ray's world cannot hold, and without Ray's environment."""
    module = parity.ParityModule("llama", 4)
    bad_layout = _documented_trainer(meshplan.ray.strategy(meshplan.TensorParallel(tp_size=4)), max_epochs=1)
    no_ray_environment = pl.Trainer(devices="auto", accelerator="auto", strategy=meshplan.ray.strategy("ddp"), max_epochs=1,
                                    logger=False, enable_checkpointing=False, enable_progress_bar=False)
    return {"tp_size=4": _refusal(lambda: bad_layout.fit(module)),
            "no RayLightningEnvironment": _refusal(lambda: no_ray_environment.fit(module))}


class _Ranks(pl.Callback):
    """Records the ranks and world size Lightning trains with."""

    def on_train_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.seen = {"world_size": trainer.world_size, "global_rank": trainer.global_rank,
                     "num_devices": trainer.num_devices, "sampler": dict(trainer.strategy.distributed_sampler_kwargs)}


def _lightning_run(layout: str, batch_size: int, reference: dict[str, torch.Tensor]) -> tuple[dict[str, Any], pl.Trainer]:
    module = parity.ParityModule("llama", batch_size)
    ranks = _Ranks()
    trainer = _documented_trainer(meshplan.ray.strategy(layout), [ranks], max_epochs=1)
    trainer.fit(module)
    weights = parity.full_parameters(module.model)
    return {**ranks.seen, "strategy": type(trainer.strategy).__name__, "losses": _global_losses(module.losses),
            "weight_error": _weight_error(weights, reference)}, trainer


def _accelerate_run(layout: str, reference: dict[str, torch.Tensor], out: Path) -> dict[str, Any]:
    reset_process_state()  # a fresh Accelerator: each run's layout decides Accelerate's state
    accelerator = meshplan.accelerator(layout)
    data_parallel_size = accelerator.num_processes // getattr(accelerator, "tp_size", 1)
    model = parity.build_model("llama")
    optimizer = torch.optim.AdamW(model.parameters(), lr=parity.LEARNING_RATE["llama"], eps=parity.ADAM_EPS)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loader = DataLoader(parity.TokenDataset("llama"), batch_size=parity.GLOBAL_BATCH // data_parallel_size)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    losses = accelerate_train._train(accelerator, model, optimizer, scheduler, loader, clip=None, loss_scale=1.0)
    weights = parity.full_parameters(accelerator.unwrap_model(model))
    return {"losses": losses, "weight_error": _weight_error(weights, reference), "num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type)}


def _trainer_run(layout: str, reference: dict[str, torch.Tensor], out: Path) -> dict[str, Any]:
    arguments = {**meshplan.from_recipe(layout).training_arguments(), **trainer_train.DATA_IN_ORDER}
    losses, trainer = trainer_train.train(str(out / f"hf-{layout}"), parity.GLOBAL_BATCH // dist.get_world_size(), arguments)
    weights = parity.full_parameters(trainer.model)
    return {"losses": losses, "weight_error": _weight_error(weights, reference), "deepspeed": trainer.is_deepspeed_enabled,
            "num_processes": trainer.accelerator.num_processes}


# ---------------------------------------------------------------- killed and resumed


class _KillRank1Once(pl.Callback):
    """Rank 1 dies by SIGKILL when step KILLED_AT_STEP starts, on the first attempt only (``marker`` says which)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_rank == 1 and trainer.global_step == KILLED_AT_STEP - 1 and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)


class _Start(pl.Callback):
    """Records the step the fit starts from (after any checkpoint is restored)."""

    def on_train_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.step = trainer.global_step


def killed_and_resumed(config: dict[str, Any], checkpoint: ray.train.Checkpoint | None) -> None:
    """Ray's documented Lightning function with its documented resume from ``checkpoint`` (what
    ``ray.train.get_checkpoint()`` gave when the attempt started); one step per epoch, so
    RayTrainReportCallback reports a meshplan checkpoint after every step. Rank 0 logs each
    attempt's start and end to attempts.jsonl, and saves the final weights."""
    started = time.perf_counter()
    out = Path(config["out"])
    marker = out / "rank-1-was-killed"
    attempt = 1 if marker.exists() else 0
    _log(out, {"event": "start", "attempt": attempt, "resumed_from": checkpoint.path if checkpoint else None})
    module = resume.StepPerEpochModule("llama", parity.GLOBAL_BATCH)  # its loader takes each rank's share itself
    start = _Start()
    trainer = _documented_trainer(meshplan.ray.strategy(KILLED_LAYOUT), [start, _KillRank1Once(marker)],
                                  max_epochs=parity.STEPS)
    if checkpoint:
        with checkpoint.as_directory() as folder:
            trainer.fit(module, ckpt_path=os.path.join(folder, RayTrainReportCallback.CHECKPOINT_NAME))
    else:
        trainer.fit(module)
    losses = _global_losses(module.losses)
    weights = {key: value.cpu() for key, value in parity.full_parameters(module.model).items()}
    _log(out, {"event": "end", "attempt": attempt, "started_at_step": start.step, "losses": losses,
               "seconds": round(time.perf_counter() - started, 1)})
    if dist.get_rank() == 0:
        torch.save(weights, out / "weights.pt")


def _log(out: Path, entry: dict[str, Any]) -> None:
    if ray.train.get_context().get_world_rank() == 0:
        with open(out / "attempts.jsonl", "a") as log:
            log.write(json.dumps(entry) + "\n")
