"""Worker functions for tests of layouts that must fail, and of the spawn harness itself."""

from __future__ import annotations

import os
import time
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from meshplan import PlanError
from .parity import TokenDataset, tiny_llama_config


class TinyModule(pl.LightningModule):
    """A LightningModule around one model; ``kind`` picks the model."""

    def __init__(self, kind: str, **config: Any) -> None:
        super().__init__()
        if kind == "llama":
            self.model = LlamaForCausalLM(tiny_llama_config(**config))
        elif kind == "gpt2":
            self.model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64))
        else:
            self.model = torch.nn.Sequential(torch.nn.Embedding(64, 32), torch.nn.Linear(32, 64))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TokenDataset("llama"), batch_size=4)


def plan_errors(cases: list[tuple[Any, str, dict]]) -> list[str]:
    """Fits each ``(strategy, model kind, config overrides)``; returns the PlanError message of each.

    Any other outcome (training, another error, a hang) fails the calling test.
    """
    devices = int(os.environ["LOCAL_WORLD_SIZE"])
    messages = []
    for strategy, kind, config in cases:
        trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        try:
            trainer.fit(TinyModule(kind, **config))
        except PlanError as error:
            messages.append(str(error))
            # Raised before any process group existed, so no rank can be left waiting in a collective.
            assert not torch.distributed.is_initialized()
        else:
            raise AssertionError(f"{strategy} on {kind} {config} trained instead of raising a PlanError")
    return messages


def accelerator_plan_error(strategy: Any, config: dict) -> str:
    """meshplan.accelerator(strategy).prepare(model) must raise a PlanError; returns its message."""
    import meshplan

    accelerator = meshplan.accelerator(strategy)
    model = LlamaForCausalLM(tiny_llama_config(**config))
    try:
        accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    except PlanError as error:
        return str(error)
    raise AssertionError(f"{strategy} prepared a model with {config} instead of raising a PlanError")


def rank_and_world() -> tuple[int, int]:
    """Harness check: the environment a worker sees."""
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def fail_on_rank_one() -> None:
    """Harness check: rank 1 raises while rank 0 waits, as if in a collective."""
    if os.environ["RANK"] == "1":
        raise RuntimeError("rank one broke")
    time.sleep(60)


def sleep_forever() -> None:
    """Harness check: a hang."""
    time.sleep(3600)
