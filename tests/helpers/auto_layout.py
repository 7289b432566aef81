"""Worker functions for tests/test_auto_layout.py: meshplan_auto and meshplan.accelerator("auto") train.

Each run trains a parity model (tests/helpers/parity.py) under the layout meshplan chose, on the
global batch split over the data-parallel ranks of that layout, and reports what was chosen,
which strategy or Accelerator ran, and the global losses and worst weight error against the
single-process reference.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

import meshplan
from meshplan.lightning import Auto

from . import parity


class AutoParityModule(parity.ParityModule):
    """The parity module, whose loader takes the data-parallel share of the global batch under any layout.

    Its ``batch_size`` attribute (the share under 2-way data parallelism) is what Auto plans for.
    """

    def train_dataloader(self) -> DataLoader:
        share = self.trainer.strategy.distributed_sampler_kwargs
        sampler = DistributedSampler(parity.TokenDataset(self.name), shuffle=False, **share)
        return DataLoader(sampler.dataset, batch_size=parity.GLOBAL_BATCH // share["num_replicas"], sampler=sampler)


def lightning_runs(runs: list[dict[str, Any]], model: str, reference_path: str) -> list[dict[str, Any]]:
    """Fits ``model`` once per run: ``{"strategy": None}`` trains with strategy="meshplan_auto", ``{"strategy":
    {...}}`` with Auto(**...); ``"given_loader": True`` passes fit a DataLoader of the 2-way data-parallel share
    (the module's own ``batch_size`` is then 1, which Auto must not plan for)."""
    devices = int(os.environ["LOCAL_WORLD_SIZE"])
    share = parity.GLOBAL_BATCH // devices
    results = []
    for run in runs:
        module = AutoParityModule(model, 1 if run["given_loader"] else share)
        loader = _data_parallel_loader(model, share) if run["given_loader"] else None
        trainer = pl.Trainer(
            accelerator=parity.ACCELERATOR, devices=devices,
            strategy="meshplan_auto" if run["strategy"] is None else Auto(**run["strategy"]),
            max_steps=parity.STEPS, use_distributed_sampler=False, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
        )
        trainer.fit(module, train_dataloaders=loader)
        results.append({"strategy": type(trainer.strategy).__name__, "plan": trainer.strategy.plan,
                        "choice": trainer.strategy.layout_choice.to_dict(), **_parity(module.losses, module.model, reference_path)})
    return results


def _data_parallel_loader(model: str, batch_size: int) -> DataLoader:
    """This rank's share of every global batch when every process is a data-parallel rank."""
    dataset = parity.TokenDataset(model)
    sampler = DistributedSampler(dataset, num_replicas=int(os.environ["WORLD_SIZE"]), rank=int(os.environ["RANK"]), shuffle=False)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler)


def accelerate_run(model_name: str, reference_path: str, device_memory: int | None = None) -> dict[str, Any]:
    """A plain Accelerate loop under ``meshplan.accelerator("auto", model=...)``."""
    model = parity.build_model(model_name)
    world_size = int(os.environ["WORLD_SIZE"])
    accelerator = meshplan.accelerator("auto", model=model, micro_batch_size=parity.GLOBAL_BATCH // world_size,
                                       seq_len=parity.SEQUENCE, device_memory=device_memory)
    data_parallel_size = accelerator.num_processes // getattr(accelerator, "tp_size", 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=parity.LEARNING_RATE[model_name], eps=parity.ADAM_EPS)
    loader = DataLoader(parity.TokenDataset(model_name), batch_size=parity.GLOBAL_BATCH // data_parallel_size)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    losses = []
    for batch in loader:
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(accelerator.reduce(loss.detach(), "mean").item())
    weights = parity.full_parameters(accelerator.unwrap_model(model))
    _, reference = torch.load(reference_path, weights_only=True)
    result = {"accelerator": type(accelerator).__name__, "plan": accelerator.plan, "choice": accelerator.layout_choice.to_dict(),
              "losses": losses,
              "weight_error": max((weights[key].cpu() - reference[key]).abs().max().item() for key in reference)}
    accelerator.end_training()
    return result


def _parity(local_losses: list[float], model: torch.nn.Module, reference_path: str) -> dict[str, Any]:
    """The global loss per step (the mean over ranks) and the worst weight error against the reference (collective)."""
    losses = torch.tensor(local_losses, dtype=torch.float64)
    dist.all_reduce(losses)
    losses /= dist.get_world_size()
    weights = parity.full_parameters(model)
    _, reference = torch.load(reference_path, weights_only=True)
    return {"losses": losses.tolist(),
            "weight_error": max((weights[key].cpu() - reference[key]).abs().max().item() for key in reference)}
