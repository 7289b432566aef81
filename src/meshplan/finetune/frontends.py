"""One fine-tuning loop per front end, each the front end's own: Lightning's Trainer, an Accelerate
loop, the HF Trainer. Each returns the same metrics and leaves a consolidated model in ``job.output``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from meshplan.checkpoint import latest_checkpoint
from meshplan.checkpoint.manifest import is_finite_number
from meshplan.checkpoint.state_checks import is_count
from meshplan.checkpoint.store import discard_checkpoint
from meshplan.errors import CheckpointError, shown
from meshplan.finetune.data import StepSampler
from meshplan.finetune.evaluate import accuracy
from meshplan.finetune.job import FinetuneJob, Prepared
from meshplan.finetune.progress import ProgressReporter
from meshplan.finetune.save import save_outputs

EVAL_BATCH = 32


def _metrics(job: FinetuneJob, before: float, after: float, steps: int, seconds: float, steps_run: int | None = None) -> dict[str, Any]:
    """The job's metrics; ``steps_run`` (default ``steps``) were trained in ``seconds``, after any resume."""
    steps_run = steps if steps_run is None else steps_run
    return {
        "eval_accuracy_before": before,
        "eval_accuracy_after": after,
        "train_steps": steps,
        "resumed_at_step": steps - steps_run,
        "train_seconds": round(seconds, 2),
        "samples_per_second": round(steps_run * job.batch_size / seconds, 2) if seconds > 0 else 0.0,
        "recipe": job.recipe,
        "layout": job.layout_record(),  # with --recipe auto: the layout chosen, and why
        "framework": job.framework,
        "devices": job.devices,
        "model": job.model,
        "data": job.data,
        "learning_rate": job.learning_rate,
    }


def _train_loader(job: FinetuneJob, prepared: Prepared, dp_rank: int, dp_size: int, start_step: int) -> DataLoader:
    """This data-parallel rank's batches from ``start_step`` on, the same in a resumed run as in an uninterrupted one."""
    sampler = StepSampler(len(prepared.data["train"]), job.batch_size, dp_rank, dp_size, job.max_steps, job.seed, start_step)
    # A generator of its own: creating the loader's iterator must not draw from the global one,
    # which dropout uses and which a checkpoint restores.
    return DataLoader(prepared.data["train"], batch_size=sampler.per_rank, sampler=sampler, generator=torch.Generator())


def _latest(job: FinetuneJob) -> str | None:
    """The checkpoint to resume from: the latest complete one of an earlier attempt, if checkpointing."""
    return latest_checkpoint(job.checkpoints) if job.checkpoint_every else None


def run_lightning(job: FinetuneJob, prepared: Prepared) -> dict[str, Any]:
    """Lightning's Trainer with the job's layout as its strategy; checkpoints through ModelCheckpoint."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from meshplan.lightning import from_plan

    reporter = ProgressReporter()

    class FinetuneModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = prepared.model
            self.results: dict[str, float] = {}

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.model(**batch).loss

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            loss = self.trainer.strategy.reduce(loss.detach(), reduce_op="mean").item()
            steps_run = self.trainer.global_step - self.results["first_step"]
            elapsed = max(time.monotonic() - self.results["start"], 1e-6)
            reporter.step(self.trainer.global_step, loss, steps_run * job.batch_size / elapsed)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(_trainable(self), lr=job.learning_rate)

        def train_dataloader(self) -> DataLoader:
            # Built after a checkpoint is restored: global_step is where the run goes on from.
            share = self.trainer.strategy.distributed_sampler_kwargs or {"rank": 0, "num_replicas": 1}
            return _train_loader(job, prepared, share["rank"], share["num_replicas"], self.trainer.global_step)

        def _accuracy(self) -> float:
            share = self.trainer.strategy.distributed_sampler_kwargs or {"rank": 0, "num_replicas": 1}
            return accuracy(self.model, prepared.data["test"], dp_rank=share["rank"], dp_size=share["num_replicas"],
                            batch_size=EVAL_BATCH, device=self.device)

        def on_train_start(self) -> None:
            if "before" not in self.results:  # a resumed run measured it before its first step
                reporter.stage("measuring held-out accuracy before training")
                self.results["before"] = self._accuracy()
            self.results["start"] = time.monotonic()
            self.results["first_step"] = self.trainer.global_step
            reporter.start(self.trainer.global_step)

        def on_train_end(self) -> None:
            self.results["seconds"] = time.monotonic() - self.results["start"]
            reporter.stage("measuring held-out accuracy after training")
            self.results["after"] = self._accuracy()

        def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            checkpoint["meshplan_finetune"] = {"eval_accuracy_before": self.results["before"]}

        def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            self.results["before"] = checkpoint["meshplan_finetune"]["eval_accuracy_before"]

    module = FinetuneModule()
    callbacks = [ModelCheckpoint(dirpath=job.checkpoints, filename="{step}", every_n_train_steps=job.checkpoint_every,
                                 save_top_k=1)] if job.checkpoint_every else []
    trainer = pl.Trainer(
        accelerator=job.accelerator, devices=job.devices, strategy=from_plan(job.plan), max_steps=job.max_steps,
        max_epochs=-1, logger=False, enable_checkpointing=bool(callbacks), callbacks=callbacks, enable_model_summary=False,
        use_distributed_sampler=False, enable_progress_bar=False,  # the launcher draws meshplan's own bar
    )
    trainer.fit(module, ckpt_path=_latest(job))
    reporter.stage(f"saving the model to {job.output}")
    saved = save_outputs(job, prepared, prepared.model)
    results = module.results
    return {**_metrics(job, results["before"], results["after"], trainer.global_step, results["seconds"],
                       trainer.global_step - results["first_step"]), **saved}


def _trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that train: all of them, or with LoRA the adapters and the head (the base stays frozen)."""
    return [parameter for parameter in module.parameters() if parameter.requires_grad]


def _dp_size(strategy: Any) -> int:
    return (strategy.distributed_sampler_kwargs or {}).get("num_replicas", 1)


class _Progress:
    """What an Accelerate run checkpoints besides models and optimizers (registered for checkpointing)."""

    def __init__(self) -> None:
        self.step = 0
        self.accuracy_before: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "accuracy_before": self.accuracy_before}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Takes the step and the accuracy before training from a checkpoint, checked: it may come from anywhere."""
        step, before = state.get("step"), state.get("accuracy_before")
        if not is_count(step) or not (before is None or is_finite_number(before)):
            raise CheckpointError(f"the finetune progress in this checkpoint is {shown(state)}: it needs a step (an integer "
                                  f">= 0) and accuracy_before (a finite number or None).")
        self.step, self.accuracy_before = step, before


def run_accelerate(job: FinetuneJob, prepared: Prepared) -> dict[str, Any]:
    """A plain Accelerate loop; meshplan.accelerator() realizes the job's layout; save_state/load_state checkpoint it."""
    import meshplan

    reporter = ProgressReporter()

    accelerator = meshplan.accelerator(job.plan)
    tp_size = getattr(accelerator, "tp_size", 1)
    dp_size, dp_rank = accelerator.num_processes // tp_size, accelerator.process_index // tp_size
    optimizer = torch.optim.AdamW(_trainable(prepared.model), lr=job.learning_rate)
    if accelerator.state.deepspeed_plugin is not None:
        # The loader is this loop's own (resumable, sharded by data-parallel rank), not prepared:
        # DeepSpeed learns the micro batch from its config instead.
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = job.batch_size // dp_size
    model, optimizer = accelerator.prepare(prepared.model, optimizer)
    progress = _Progress()
    accelerator.register_for_checkpointing(progress)
    latest = _latest(job)
    if latest is not None:
        accelerator.load_state(latest)

    def evaluate() -> float:
        return accuracy(accelerator.unwrap_model(model), prepared.data["test"], dp_rank=dp_rank, dp_size=dp_size,
                        batch_size=EVAL_BATCH, device=accelerator.device)

    if progress.accuracy_before is None:
        reporter.stage("measuring held-out accuracy before training")
        progress.accuracy_before = evaluate()
    first_step = progress.step
    reporter.start(first_step)
    start = time.monotonic()
    for batch in _train_loader(job, prepared, dp_rank, dp_size, first_step):
        loss = model(**{key: value.to(accelerator.device) for key, value in batch.items()}).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        progress.step += 1
        global_loss = accelerator.reduce(loss.detach(), "mean").item()
        samples_per_s = (progress.step - first_step) * job.batch_size / (time.monotonic() - start)
        reporter.step(progress.step, global_loss, samples_per_s)
        if job.checkpoint_every and progress.step % job.checkpoint_every == 0:
            _save_only_latest(accelerator, job, progress.step)
    seconds = time.monotonic() - start
    reporter.stage("measuring held-out accuracy after training")
    after = evaluate()
    reporter.stage(f"saving the model to {job.output}")
    saved = save_outputs(job, prepared, accelerator.unwrap_model(model))
    return {**_metrics(job, progress.accuracy_before, after, progress.step, seconds, progress.step - first_step), **saved}


def _save_only_latest(accelerator: Any, job: FinetuneJob, step: int) -> None:
    """save_state to ``checkpoints/step=N``, then (rank 0) delete the meshplan checkpoints before it.

    Only what ``discard_checkpoint`` recognises as a meshplan checkpoint is deleted: anything
    else named ``step=*`` there (a user's file or folder) is left as it is, with a warning.
    """
    latest = Path(accelerator.save_state(str(job.checkpoints / f"step={step}")))
    if accelerator.is_main_process:
        for older in job.checkpoints.glob("step=*"):
            if older != latest:
                discard_checkpoint(older)


def run_trainer(job: FinetuneJob, prepared: Prepared) -> dict[str, Any]:
    """The HF Trainer, with TrainingArguments from meshplan's training_arguments() for the job's layout."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from meshplan.hf_trainer import training_arguments

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    arguments = TrainingArguments(
        output_dir=str(Path(job.output) / "trainer"), per_device_train_batch_size=job.batch_size // world_size,
        max_steps=job.max_steps, learning_rate=job.learning_rate, lr_scheduler_type="constant", logging_steps=1,
        save_strategy="no", report_to="none", seed=job.seed, disable_tqdm=True,  # the launcher draws meshplan's own bar
        # transformers multiplies the loss by the world size when the model's forward takes **kwargs,
        # expecting its loss to divide by num_items_in_batch; a classifier's loss ignores it, so its
        # loss (and gradients) would be the world size times too large.
        average_tokens_across_devices=prepared.task == "causal-lm",
        **training_arguments(job.plan),
    )
    reporter = ProgressReporter()
    started: dict[str, float] = {}

    class Progress(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            started["time"] = time.monotonic()
            reporter.start(state.global_step)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            # logging_steps=1: the Trainer logs the loss averaged over every rank after each step.
            if logs is not None and "loss" in logs:
                elapsed = max(time.monotonic() - started["time"], 1e-6)
                reporter.step(state.global_step, logs["loss"], state.global_step * job.batch_size / elapsed)

    trainer = Trainer(model=prepared.model, args=arguments, train_dataset=prepared.data["train"], callbacks=[Progress()])
    rank = dist.get_rank() if dist.is_initialized() else 0
    evaluate: Callable[[Any], float] = lambda model: accuracy(  # noqa: E731
        model, prepared.data["test"], dp_rank=rank, dp_size=world_size, batch_size=EVAL_BATCH, device=arguments.device)
    # Under DeepSpeed the Trainer leaves the model where it is until training starts; the
    # evaluation (and its all-reduce, on nccl for GPUs) runs on the training device.
    reporter.stage("measuring held-out accuracy before training")
    before = evaluate(prepared.model.to(arguments.device))
    trainer.train()
    seconds = time.monotonic() - started["time"]
    reporter.stage("measuring held-out accuracy after training")
    after = evaluate(trainer.model)
    reporter.stage(f"saving the model to {job.output}")
    saved = save_outputs(job, prepared, trainer.model)
    return {**_metrics(job, before, after, trainer.state.global_step, seconds), **saved}


FRONTENDS = {"lightning": run_lightning, "accelerate": run_accelerate, "trainer": run_trainer}
