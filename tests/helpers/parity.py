"""Parity harness: the same model and global batch, trained in one process and under a strategy.

The reference is a plain PyTorch loop in one process on the global batch. A distributed run
trains the same model in a Lightning Trainer; every rank records its loss per step, and the
global loss is the mean over ranks. fp32, dropout off, AdamW.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from transformers import BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from meshplan._compat.deepspeed import is_zero3_parameter
from meshplan.models import minilm_path

# scripts/gpu_smoke.sh sets "gpu" to run the same checks on CUDA with nccl.
ACCELERATOR = os.environ.get("MESHPLAN_TEST_ACCELERATOR", "cpu")
STEPS = 4
GLOBAL_BATCH = 8
SEQUENCE = 16
LEARNING_RATE = {"llama": 1e-3, "llama-tied": 1e-3, "llama-odd": 1e-3, "minilm": 1e-4, "llama-lora": 1e-3, "minilm-lora": 1e-4, "llama-tied-lora": 1e-3}
# BERT's own epsilon. With 1e-8, Adam turns the float32 rounding noise in gradients that are
# exactly zero in theory (attention key biases) into updates of the order of lr, in any layout.
ADAM_EPS = 1e-6
LOSS_TOLERANCE = 1e-4
CLIP = 0.5  # small enough that clipping is active in the first steps
REFERENCE_RUNS = (("llama", None), ("minilm", None), ("llama", CLIP), ("llama-tied", None), ("llama-odd", None),
                  ("llama-lora", None), ("minilm-lora", None))
# LoRA on every linear layer of Llama's blocks: column-wise (q, k, v, gate, up) and row-wise (o, down) under TP.
LLAMA_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WEIGHT_TOLERANCE = 1e-5


def tiny_llama_config(**overrides: Any) -> LlamaConfig:
    """A tiny Llama with grouped-query attention (4 query heads share 2 key/value heads)."""
    fields = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, attention_dropout=0.0)
    fields.update(overrides)
    return LlamaConfig(**fields)


def build_model(name: str) -> torch.nn.Module:
    """The model under test, identical in every process (fixed seed)."""
    torch.manual_seed(0)
    if name == "llama":
        return LlamaForCausalLM(tiny_llama_config())
    if name == "llama-tied":  # input and output embeddings share one weight
        return LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True))
    if name == "llama-odd":  # norms of 33 elements: ZeRO-3 pads the last partition
        return LlamaForCausalLM(tiny_llama_config(hidden_size=33, num_attention_heads=3, num_key_value_heads=3, head_dim=8))
    if name == "minilm":
        return BertForSequenceClassification.from_pretrained(
            minilm_path(), num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
        )
    if name.endswith("-lora"):
        return lora_model(build_model(name.removesuffix("-lora")))
    raise ValueError(name)


def lora_model(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with peft LoRA adapters (rank 4, no dropout), as a user wraps it; the frozen base stays as built.

    ``init_lora_weights=False`` starts lora_B random instead of zero (peft's option for tests), so
    that lora_A has a gradient from the first step and both matrices are checked. A Llama gets
    adapters on every linear layer of its blocks; MiniLM (sequence classification) on its
    attention's query and value and on the output projections, with its classifier head
    trained whole (peft's ``modules_to_save`` for SEQ_CLS).
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    if isinstance(model, LlamaForCausalLM):
        config = LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_LORA_TARGETS, lora_dropout=0.0, init_lora_weights=False)
    else:
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"], lora_dropout=0.0,
                            init_lora_weights=False, task_type="SEQ_CLS")
    return get_peft_model(model, config)


class TokenDataset(Dataset):
    """STEPS global batches of random tokens (causal LM) or random tokens with labels (classification)."""

    def __init__(self, name: str) -> None:
        generator = torch.Generator().manual_seed(1)
        size = STEPS * GLOBAL_BATCH
        causal = name.startswith("llama")
        vocab = 64 if causal else 30522
        self.input_ids = torch.randint(3, vocab, (size, SEQUENCE), generator=generator)
        self.labels = self.input_ids if causal else torch.randint(0, 2, (size,), generator=generator)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


class Case(NamedTuple):
    """One distributed training run to compare with the reference."""

    model: str
    label: str
    strategy: Any
    batch_size: int  # per rank: the global batch divided by the data-parallel size (and the accumulation)
    clip: float | None = None  # max gradient norm
    accumulate: int = 1  # micro-batches per optimizer step (accumulate_grad_batches)

    @property
    def reference(self) -> str:
        """The reference run this case must reproduce."""
        return reference_key(self.model, self.clip)


def reference_key(model: str, clip: float | None) -> str:
    """The name of the reference run of ``model`` with gradient clipping at ``clip``."""
    return model if clip is None else f"{model}-clip{clip}"


def reference_run(name: str, clip: float | None = None) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process, the global batch, a plain PyTorch loop: the losses per step and the final weights."""
    model = build_model(name)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE[name], eps=ADAM_EPS)
    losses = []
    for batch in DataLoader(TokenDataset(name), batch_size=GLOBAL_BATCH):
        loss = model(**batch).loss
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, {key: value.detach().clone() for key, value in model.named_parameters()}


class ParityModule(pl.LightningModule):
    """Wraps a Hugging Face model; records the local loss of every step."""

    def __init__(self, name: str, batch_size: int) -> None:
        super().__init__()
        self.name = name
        self.batch_size = batch_size
        self.model = build_model(name)
        self.losses: list[float] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=LEARNING_RATE[self.name], eps=ADAM_EPS)

    def train_dataloader(self) -> DataLoader:
        # Lightning's own sampler shuffles; parity needs rank r of the data-parallel group to take
        # the r-th share of the reference's global batch, in order.
        sampler = DistributedSampler(TokenDataset(self.name), shuffle=False, **self.trainer.strategy.distributed_sampler_kwargs)
        return DataLoader(sampler.dataset, batch_size=self.batch_size, sampler=sampler)


def full_parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole, whether ZeRO-3 partitioned it or TP made it a DTensor (collective)."""
    full = {}
    for name, parameter in module.named_parameters():
        if is_zero3_parameter(parameter):
            import deepspeed

            with deepspeed.zero.GatheredParameters([parameter]):
                full[name] = parameter.data.detach().clone()
        elif isinstance(parameter, DTensor):
            full[name] = parameter.full_tensor().detach().clone()
        else:
            full[name] = parameter.detach().clone()
    return full


def lightning_run(case: Case, reference_path: str, world: tuple[int, int]) -> dict[str, Any]:
    """Trains ``case`` on ``world = (nodes, devices)``; returns global losses and the worst weight error."""
    module = ParityModule(case.model, case.batch_size)
    num_nodes, devices = world
    trainer = pl.Trainer(
        accelerator=ACCELERATOR, devices=devices, num_nodes=num_nodes, strategy=case.strategy, max_steps=STEPS,
        gradient_clip_val=case.clip, accumulate_grad_batches=case.accumulate,
        use_distributed_sampler=False, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module)
    # A step's loss is the mean of its micro-batches' (each holds as many tokens) over the ranks.
    losses = torch.tensor(module.losses, dtype=torch.float64).view(-1, case.accumulate).mean(dim=1)
    dist.all_reduce(losses)
    losses /= dist.get_world_size()
    weights = full_parameters(module.model)
    _, reference = torch.load(reference_path, weights_only=True)
    weight_error = max((weights[key].cpu() - reference[key]).abs().max().item() for key in reference)
    result = {"losses": losses.tolist(), "weight_error": weight_error, "steps": len(module.losses) // case.accumulate}
    if case.model.endswith("-lora"):  # what the frozen base costs: the optimizer states this rank holds
        from meshplan.planner.measure import model_state_bytes

        result["optimizer_state_bytes"] = model_state_bytes(trainer.strategy.model, trainer.optimizers[0])["optimizer_states"]
        result["trainable"] = sum(p.numel() for p in reference_trainable(case.model))
    return result


def reference_trainable(name: str) -> list[torch.nn.Parameter]:
    """The parameters of ``build_model(name)`` that train (a LoRA model's adapters), whole."""
    return [parameter for parameter in build_model(name).parameters() if parameter.requires_grad]


def run_cases(cases: list[Case], reference_paths: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Worker entry: trains every case in turn, in this process; results are keyed by ``model/label``."""
    # Lightning's teardown removes WORLD_SIZE from the environment: read the world once.
    devices = int(os.environ["LOCAL_WORLD_SIZE"])
    world = (int(os.environ["WORLD_SIZE"]) // devices, devices)
    results = {}
    for case in cases:
        results[f"{case.model}/{case.label}"] = lightning_run(case, reference_paths[case.reference], world)
    return results


def load_reference(paths: dict[str, str], key: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The (losses, weights) of one reference run saved by the ``reference_paths`` fixture (tests/conftest.py)."""
    return torch.load(paths[key], weights_only=True)
