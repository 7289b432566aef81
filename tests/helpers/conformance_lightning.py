"""Worker functions of the Lightning conformance matrix: a user's whole script, under every layout.

One worker call runs, per layout, what an ordinary Lightning script does and returns what it
measured (losses, learning rates, checkpoint folders, CSV rows, predictions, trained weights);
tests/test_conformance_lightning.py asserts on those numbers against a single-process
reference computed in the pytest process. The runs of one layout:

- main: 2 epochs of 2 optimizer steps (accumulate_grad_batches=2, gradient_clip_val, a StepLR
  per step, 32-true), validation each epoch, two ModelCheckpoints, LearningRateMonitor,
  CSVLogger and a rank-dependent value logged with sync_dist=True; then validate, test and
  predict on the same Trainer, on a new one, and on a new module from checkpoints;
- resume: a validate of one batch per process, then 1 epoch with save_last on the same Trainer
  (the validate must leave training unchanged), then a new Trainer that fits to 2 epochs from
  ckpt_path="last";
- bf16: the main run's settings in "bf16-mixed", with an EarlyStopping that must stop after epoch 1.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import meshplan
from meshplan._compat.deepspeed import has_fp32_master

from . import parity

# name -> strategy factory; every Trainer gets a strategy of its own.
LAYOUTS: dict[str, Callable[[], Any]] = {
    "ddp": lambda: meshplan.DDP(),
    "zero1": lambda: meshplan.ZeRO(stage=1),
    "zero2": lambda: meshplan.ZeRO(stage=2),
    "zero3": lambda: meshplan.ZeRO(stage=3),
    "zero3-offload": lambda: meshplan.ZeRO(stage=3, offload_optimizer=True, offload_parameters=True),
    "tp": lambda: meshplan.TensorParallel(tp_size=2),
    "tp-dp": lambda: meshplan.TensorParallel(tp_size=2),
    "fsdp2": lambda: meshplan.ZeRO(stage=3, engine="fsdp2"),
    "tp-fsdp": lambda: meshplan.TensorParallel(tp_size=2, data_parallel="shard"),
}
# The same script with the model wrapped in peft LoRA adapters (parity.build_model("llama-lora")).
LORA_SUFFIX = "+lora"
LAYOUTS.update({f"{name}{LORA_SUFFIX}": LAYOUTS[name] for name in ("ddp", "zero3", "tp", "tp-dp")})


def model_name(layout: str) -> str:
    """The parity model a layout's script trains: the LoRA model for the ``+lora`` layouts."""
    return "llama-lora" if layout.endswith(LORA_SUFFIX) else "llama"
LEARNING_RATE = 1e-3
GAMMA = 0.5  # StepLR per optimizer step: the lr halves after every step
ACCUMULATE = 2
# The reference's gradient norm is 0.54-0.57 at every step, over twice this: clipping moves its
# weights by 1e-4 or more. AdamW undoes most of a constant scale, hence the margin.
CLIP = 0.25
# The LoRA model's gradient norm (its adapters' only) is 0.29 and 0.22 in its two steps: 0.1 clips both.
CLIP_BY_MODEL = {"llama": CLIP, "llama-lora": 0.1}
EPOCHS = 2
STEPS_PER_EPOCH = len(parity.TokenDataset("llama")) // (parity.GLOBAL_BATCH * ACCUMULATE)
EVAL_SAMPLES = 8  # divisible by every data-parallel size: no sample is repeated to even out ranks
PREDICT_SAMPLES = 9  # odd on purpose: predict must return each sample exactly once
PREDICT_BATCH = 4
# ZeRO-3 and FSDP2 refuse a predict loader that gives ranks different numbers of batches (a forward
# pass is collective there); they must then predict this many samples, which split evenly.
EVEN_PREDICT_SAMPLES = 8
EVAL_SEEDS = {"val": 2, "test": 3, "predict": 4}


class Tokens(Dataset):
    """``count`` random token rows (a causal LM's inputs and labels), each with its index."""

    def __init__(self, count: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(3, 64, (count, parity.SEQUENCE), generator=generator)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.input_ids[index], "index": torch.tensor(index)}


def eval_set(name: str, count: int | None = None) -> Tokens:
    """The validation, test or predict set (``count`` samples instead of the set's own number)."""
    return Tokens(count or (PREDICT_SAMPLES if name == "predict" else EVAL_SAMPLES), EVAL_SEEDS[name])


class ConformanceModule(pl.LightningModule):
    """The parity Llama (or ``model``, another of parity.build_model's) with everything an ordinary script
    uses: eval steps, logging, a scheduler."""

    def __init__(self, model: str = "llama") -> None:
        super().__init__()
        self.model = parity.build_model(model)
        self.losses: list[float] = []

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.losses.append(loss.item())
        # Rank-dependent on purpose: the synced value must be the mean over ranks, (W + 1) / 2.
        self.log("rank_value", float(self.global_rank + 1), on_step=True, on_epoch=False, sync_dist=True,
                 batch_size=len(batch["input_ids"]))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        size = len(batch["input_ids"])
        self.log("val_loss", self._loss(batch), sync_dist=True, batch_size=size)
        self.log("plateau", 1.0, sync_dist=True, batch_size=size)  # never improves: EarlyStopping's signal

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("test_loss", self._loss(batch), sync_dist=True, batch_size=len(batch["input_ids"]))

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        logits = self.model(input_ids=batch["input_ids"]).logits[:, -1]
        return {"index": batch["index"].cpu(), "logits": logits.float().cpu()}

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.parameters(), lr=LEARNING_RATE, eps=parity.ADAM_EPS)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=GAMMA)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _per_rank(self) -> int:
        """The global batch of 8 samples split over the data-parallel ranks."""
        return parity.GLOBAL_BATCH // self.trainer.strategy.distributed_sampler_kwargs["num_replicas"]

    def train_dataloader(self) -> DataLoader:
        # Lightning's own sampler would shuffle training data whatever the loader says; the
        # reference takes the batches in order, so this sampler does not (Lightning keeps it).
        dataset = parity.TokenDataset("llama")
        sampler = DistributedSampler(dataset, shuffle=False, **self.trainer.strategy.distributed_sampler_kwargs)
        return DataLoader(dataset, batch_size=self._per_rank(), sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(eval_set("val"), batch_size=self._per_rank())

    def test_dataloader(self) -> DataLoader:
        return DataLoader(eval_set("test"), batch_size=self._per_rank())


def run_layouts(layouts: list[str], folder: str) -> dict[str, dict[str, Any]]:
    """Worker entry: runs the whole script under each layout in turn; results keyed by layout.

    Rank 0's result carries the trained weights, CSV rows and checkpoint folders; every rank's
    carries its own predictions.
    """
    devices = int(os.environ["LOCAL_WORLD_SIZE"])  # Lightning's teardown removes WORLD_SIZE
    return {layout: _run_layout(layout, devices, Path(folder) / layout) for layout in layouts}


def _trainer(layout: str, devices: int, folder: Path, **overrides: Any) -> pl.Trainer:
    settings: dict[str, Any] = dict(
        accelerator=parity.ACCELERATOR, devices=devices, strategy=LAYOUTS[layout](), max_epochs=EPOCHS,
        accumulate_grad_batches=ACCUMULATE, gradient_clip_val=CLIP_BY_MODEL[model_name(layout)], precision="32-true",
        log_every_n_steps=1,
        default_root_dir=folder, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    settings.update(overrides)
    return pl.Trainer(**settings)


def _run_layout(layout: str, devices: int, folder: Path) -> dict[str, Any]:
    result = _main_run(layout, devices, folder)
    result["world_size"] = dist.get_world_size()
    result["resume"] = _resume_run(layout, devices, folder)
    result["bf16"] = _bf16_run(layout, devices, folder)
    return result


def _main_run(layout: str, devices: int, folder: Path) -> dict[str, Any]:
    """Fit with every callback, then every entry point after it; returns the measured values."""
    every = ModelCheckpoint(dirpath=folder / "every", filename="{step}", every_n_train_steps=2, save_top_k=-1)
    best = ModelCheckpoint(dirpath=folder / "best", filename="{epoch}-{val_loss:.4f}", monitor="val_loss",
                           mode="min", save_top_k=1, save_last=True)
    module = ConformanceModule(model_name(layout))
    trainer = _trainer(layout, devices, folder, callbacks=[every, best, LearningRateMonitor(logging_interval="step")],
                       logger=CSVLogger(folder, name="csv", version=0), enable_checkpointing=True)
    trainer.fit(module)
    out: dict[str, Any] = {
        "losses": _global_mean(module.losses),
        "global_step": trainer.global_step,
        "lr_after": trainer.optimizers[0].param_groups[0]["lr"],
        "rank_value": trainer.callback_metrics["rank_value"].item(),
        "weights": _rank_zero(_whole_weights(module)),
        "csv": _rank_zero(_csv_rows(folder / "csv" / "version_0" / "metrics.csv")),
        "checkpoints": _rank_zero({name: sorted(os.listdir(folder / name)) for name in ("every", "best")}),
        "best_model_score": best.best_model_score.item(),
    }
    out["same_trainer"] = _entry_points(trainer, module)
    fresh_trainer = _trainer(layout, devices, folder)
    out["new_trainer"] = _entry_points(fresh_trainer, module)
    # A new module takes the weights (only) from the checkpoints of the fit.
    reloaded = ConformanceModule(model_name(layout))
    out["from_checkpoint"] = {
        # The last step's checkpoint: the "best" callback's last.ckpt is only rewritten with a new best.
        "val_loss": fresh_trainer.validate(reloaded, ckpt_path=folder / "every" / "step=4.ckpt", verbose=False)[0]["val_loss"],
        "test_loss": fresh_trainer.test(reloaded, ckpt_path=folder / "every" / "step=4.ckpt", verbose=False)[0]["test_loss"],
    }
    if layout in RESHARDING:
        out["resharded"] = _reshard_error(module, devices, folder, RESHARDING[layout]())
    if layout == "fsdp2":
        out["inference_mode"] = _fsdp2_in_inference_mode()
    return out


def _fsdp2_in_inference_mode() -> dict[str, Any]:
    """A fresh FSDP2 model's first forward inside ``torch.inference_mode``, bare and through meshplan's strategy.

    Lightning evaluates under inference_mode off gloo (nccl, on GPUs); on gloo, as here, it uses
    no_grad, so the strategy's way out of inference mode is run here by hand, on a mesh of one
    process (one GPU's case): the bare forward's error, and the logits through the strategy's way.
    """
    from torch.distributed.device_mesh import init_device_mesh

    from meshplan.fsdp import fully_shard_models
    from meshplan.lightning.model_parallel import _outside_inference_mode

    # FSDP2 over one process (each rank alone), as on one GPU: there the first gather of a fresh model fails.
    mesh = init_device_mesh("cpu", (dist.get_world_size(), 1), mesh_dim_names=("ranks", "data_parallel"))["data_parallel"]
    ids = eval_set("predict", EVEN_PREDICT_SAMPLES).input_ids[:PREDICT_BATCH]
    models = []
    for _ in range(2):
        module = ConformanceModule()
        fully_shard_models(module, meshplan.ZeRO(stage=3, engine="fsdp2").plan, mesh)
        models.append(module.model)
    with torch.inference_mode():
        try:
            models[0](input_ids=ids)
            bare_error = None
        except RuntimeError as error:
            bare_error = str(error)
        with _outside_inference_mode():
            logits = models[1](input_ids=ids).logits[:, -1].numpy()
    return {"bare_error": bare_error, "logits": logits}


# A layout whose trained module then meets a Trainer with another layout, which must refuse to re-shard it.
RESHARDING: dict[str, Callable[[], Any]] = {
    "tp": lambda: meshplan.TensorParallel(tp_size=1),
    "fsdp2": lambda: meshplan.TensorParallel(tp_size=2),
}


def _reshard_error(module: ConformanceModule, devices: int, folder: Path, strategy: Any) -> str:
    """The PlanError of validating a module sharded by the fit with ``strategy``, another layout (it cannot be re-sharded)."""
    try:
        _trainer("tp", devices, folder, strategy=strategy).validate(module, verbose=False)
    except meshplan.PlanError as error:
        return str(error)
    return "no error"


def _entry_points(trainer: pl.Trainer, module: ConformanceModule) -> dict[str, Any]:
    """validate, test and predict with ``trainer``: the losses, the predicted rows by data-parallel rank,
    and the PlanError message of a predict loader that the layout refuses (then an even one is predicted)."""
    val_loss = trainer.validate(module, verbose=False)[0]["val_loss"]
    test_loss = trainer.test(module, verbose=False)[0]["test_loss"]
    try:
        batches, refused = trainer.predict(module, dataloaders=_predict_loader(PREDICT_SAMPLES)), None
    except meshplan.PlanError as error:
        refused = str(error)
        batches = trainer.predict(module, dataloaders=_predict_loader(EVEN_PREDICT_SAMPLES))
    rows = [(int(index), logits.numpy()) for batch in batches for index, logits in zip(batch["index"], batch["logits"])]
    return {"val_loss": val_loss, "test_loss": test_loss, "predictions": _predictions_by_data_rank(trainer, rows),
            "predict_refused": refused}


def _predict_loader(samples: int) -> DataLoader:
    return DataLoader(eval_set("predict", samples), batch_size=PREDICT_BATCH)


def _predictions_by_data_rank(trainer: pl.Trainer, rows: list) -> dict[int, list]:
    """Each data-parallel rank's predicted rows (ranks of one tensor-parallel group predict the same rows)."""
    data_rank = trainer.strategy.distributed_sampler_kwargs["rank"]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (data_rank, rows))
    by_rank: dict[int, list] = {}
    for rank, rank_rows in gathered:
        by_rank.setdefault(rank, rank_rows)
    return by_rank


def _resume_run(layout: str, devices: int, folder: Path) -> dict[str, Any]:
    """One epoch saving last.ckpt, then a new Trainer and module continue with ckpt_path="last"."""
    checkpoints = folder / "resume"

    def fit(epochs: int, ckpt_path: str | None) -> tuple[ConformanceModule, pl.Trainer]:
        module = ConformanceModule(model_name(layout))
        trainer = _trainer(layout, devices, folder, max_epochs=epochs, enable_checkpointing=True,
                           callbacks=[ModelCheckpoint(dirpath=checkpoints, save_last=True)])
        if ckpt_path is None:
            # A single forward pass before the fit once left ZeRO-3's parameter-fetch trace half recorded.
            trainer.validate(module, dataloaders=_one_batch_per_process_loader(), verbose=False)
        trainer.fit(module, ckpt_path=ckpt_path)
        return module, trainer

    _, interrupted = fit(1, None)
    module, trainer = fit(EPOCHS, "last")
    return {"interrupted_step": interrupted.global_step, "global_step": trainer.global_step,
            "losses": _global_mean(module.losses), "weights": _rank_zero(_whole_weights(module))}


def _one_batch_per_process_loader() -> DataLoader:
    """A validation loader that gives every process exactly one batch: one batch holds the whole set."""
    return DataLoader(eval_set("val"), batch_size=EVAL_SAMPLES)


def _bf16_run(layout: str, devices: int, folder: Path) -> dict[str, Any]:
    """The main run's settings in bf16-mixed, up to 10 epochs with an EarlyStopping on a metric that never improves."""
    stopper = EarlyStopping(monitor="plateau", patience=1, mode="min")
    module = ConformanceModule(model_name(layout))
    trainer = _trainer(layout, devices, folder, precision="bf16-mixed", max_epochs=10, callbacks=[stopper])
    trainer.fit(module)
    out = {"losses": _global_mean(module.losses), "global_step": trainer.global_step,
           "current_epoch": trainer.current_epoch, "stopped_epoch": stopper.stopped_epoch,
           "parameter_dtypes": sorted({str(p.dtype) for p in module.model.parameters()})}
    out["master_dtype"] = _master_dtype(module)
    return out


def _master_dtype(module: ConformanceModule) -> str | None:
    """The dtype of the optimizer's master copy of the weights under DeepSpeed (collective), else None."""
    parameter = next(p for p in module.model.parameters() if p.requires_grad)  # a LoRA model's base has no master
    if not has_fp32_master(parameter):
        return None
    import deepspeed

    return str(deepspeed.utils.safe_get_full_fp32_param(parameter).dtype)


def _global_mean(values: list[float]) -> list[float]:
    """The mean over all ranks of each rank's values (equal batch sizes: the global batch's value)."""
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return (tensor / dist.get_world_size()).tolist()


def _whole_weights(module: ConformanceModule) -> dict[str, Any]:
    """Every parameter of the model whole, as fp32 numpy arrays (collective)."""
    # numpy, not tensors: a tensor sent back through the worker queue is shared memory that
    # disappears with the worker.
    return {name: tensor.float().cpu().numpy() for name, tensor in parity.full_parameters(module.model).items()}


def _rank_zero(value: Any) -> Any:
    """``value`` on rank 0, None elsewhere (what only one rank needs to send back)."""
    return value if dist.get_rank() == 0 else None


def _csv_rows(path: Path) -> list[dict[str, str]] | None:
    """The rows CSVLogger wrote (rank 0 writes them)."""
    if dist.get_rank() != 0:
        return None
    with open(path, newline="") as file:
        return list(csv.DictReader(file))
