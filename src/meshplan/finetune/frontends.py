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

from meshplan.checkpoint import save_pretrained
from meshplan.finetune.evaluate import accuracy
from meshplan.finetune.job import FinetuneJob, Prepared

EVAL_BATCH = 32


def _metrics(job: FinetuneJob, before: float, after: float, steps: int, seconds: float) -> dict[str, Any]:
    return {
        "eval_accuracy_before": before,
        "eval_accuracy_after": after,
        "train_steps": steps,
        "train_seconds": round(seconds, 2),
        "samples_per_second": round(steps * job.batch_size / seconds, 2) if seconds > 0 else 0.0,
        "recipe": job.recipe,
        "framework": job.framework,
        "devices": job.devices,
        "model": job.model,
        "data": job.data,
    }


def run_lightning(job: FinetuneJob, prepared: Prepared) -> dict[str, Any]:
    """Lightning's Trainer with the recipe as its strategy."""
    import lightning.pytorch as pl

    import meshplan

    class FinetuneModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = prepared.model
            self.results: dict[str, float] = {}

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            loss = self.model(**batch).loss
            elapsed = time.monotonic() - self.results["start"]
            self.log("loss", loss, prog_bar=True)
            self.log("samples_per_s", (self.trainer.global_step + 1) * job.batch_size / max(elapsed, 1e-6), prog_bar=True)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=job.learning_rate)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(prepared.data["train"], batch_size=job.batch_size // _dp_size(self.trainer.strategy), shuffle=True)

        def _accuracy(self) -> float:
            share = self.trainer.strategy.distributed_sampler_kwargs or {"rank": 0, "num_replicas": 1}
            return accuracy(self.model, prepared.data["test"], dp_rank=share["rank"], dp_size=share["num_replicas"],
                            batch_size=EVAL_BATCH, device=self.device)

        def on_train_start(self) -> None:
            self.results["before"] = self._accuracy()
            self.results["start"] = time.monotonic()

        def on_train_end(self) -> None:
            self.results["seconds"] = time.monotonic() - self.results["start"]
            self.results["after"] = self._accuracy()

    module = FinetuneModule()
    trainer = pl.Trainer(
        accelerator=job.accelerator, devices=job.devices, strategy=meshplan.from_recipe(job.recipe), max_steps=job.max_steps,
        max_epochs=-1, logger=False, enable_checkpointing=False, enable_model_summary=False,
    )
    trainer.fit(module)
    save_pretrained(prepared.model, prepared.tokenizer, job.output)
    results = module.results
    return _metrics(job, results["before"], results["after"], trainer.global_step, results["seconds"])


def _dp_size(strategy: Any) -> int:
    return (strategy.distributed_sampler_kwargs or {}).get("num_replicas", 1)


def run_accelerate(job: FinetuneJob, prepared: Prepared) -> dict[str, Any]:
    """A plain Accelerate loop; meshplan.accelerator() realizes the recipe."""
    from tqdm.auto import tqdm

    import meshplan

    accelerator = meshplan.accelerator(job.recipe)
    tp_size = getattr(accelerator, "tp_size", 1)
    dp_size, dp_rank = accelerator.num_processes // tp_size, accelerator.process_index // tp_size
    loader = DataLoader(prepared.data["train"], batch_size=job.batch_size // dp_size, shuffle=True,
                        generator=torch.Generator().manual_seed(job.seed))
    optimizer = torch.optim.AdamW(prepared.model.parameters(), lr=job.learning_rate)
    model, optimizer, loader = accelerator.prepare(prepared.model, optimizer, loader)

    def evaluate() -> float:
        return accuracy(accelerator.unwrap_model(model), prepared.data["test"], dp_rank=dp_rank, dp_size=dp_size,
                        batch_size=EVAL_BATCH, device=accelerator.device)

    before = evaluate()
    progress = tqdm(total=job.max_steps, disable=not accelerator.is_main_process, desc="fine-tuning")
    start, step = time.monotonic(), 0
    while step < job.max_steps:
        for batch in loader:
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            global_loss = accelerator.reduce(loss.detach(), "mean").item()
            progress.set_postfix(loss=f"{global_loss:.4f}", samples_per_s=f"{step * job.batch_size / (time.monotonic() - start):.1f}")
            progress.update()
            if step == job.max_steps:
                break
    seconds = time.monotonic() - start
    progress.close()
    after = evaluate()
    save_pretrained(accelerator.unwrap_model(model), prepared.tokenizer, job.output)
    return _metrics(job, before, after, step, seconds)


def run_trainer(job: FinetuneJob, prepared: Prepared) -> dict[str, Any]:
    """The HF Trainer, with TrainingArguments from strategy.training_arguments()."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    import meshplan

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    arguments = TrainingArguments(
        output_dir=str(Path(job.output) / "trainer"), per_device_train_batch_size=job.batch_size // world_size,
        max_steps=job.max_steps, learning_rate=job.learning_rate, lr_scheduler_type="constant", logging_steps=10,
        save_strategy="no", report_to="none", seed=job.seed, **meshplan.from_recipe(job.recipe).training_arguments(),
    )
    trainer = Trainer(model=prepared.model, args=arguments, train_dataset=prepared.data["train"])
    started: dict[str, float] = {}

    class Throughput(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            started["time"] = time.monotonic()

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            if logs is not None and "loss" in logs:
                logs["samples_per_s"] = round(state.global_step * job.batch_size / (time.monotonic() - started["time"]), 1)

    trainer.callback_handler.callbacks.insert(0, Throughput())  # before the progress bar prints the logs
    rank = dist.get_rank() if dist.is_initialized() else 0
    evaluate: Callable[[Any], float] = lambda model: accuracy(  # noqa: E731
        model, prepared.data["test"], dp_rank=rank, dp_size=world_size, batch_size=EVAL_BATCH, device=arguments.device)
    # Under DeepSpeed the Trainer leaves the model where it is until training starts; the
    # evaluation (and its all-reduce, on nccl for GPUs) runs on the training device.
    before = evaluate(prepared.model.to(arguments.device))
    trainer.train()
    seconds = time.monotonic() - started["time"]
    after = evaluate(trainer.model)
    save_pretrained(trainer.model, prepared.tokenizer, job.output)
    return _metrics(job, before, after, trainer.state.global_step, seconds)


FRONTENDS = {"lightning": run_lightning, "accelerate": run_accelerate, "trainer": run_trainer}
