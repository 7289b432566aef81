"""Held-out accuracy under any layout: every rank evaluates its data-parallel share, then one all-reduce."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist


@torch.no_grad()
def accuracy(model: Any, dataset: Any, *, dp_rank: int, dp_size: int, batch_size: int, device: torch.device) -> float:
    """Classification accuracy, or next-token accuracy for a causal LM, over all of ``dataset``.

    Every rank runs the same number of forward passes (ZeRO-3 and TP forwards are collective);
    a rank whose share runs out repeats a sample with weight zero.
    """
    was_training = model.training
    model.eval()
    share = list(range(dp_rank, len(dataset), dp_size))
    steps = math.ceil(len(dataset) / dp_size / batch_size)
    counts = torch.zeros(2, dtype=torch.float64, device=device)  # correct, total
    for step in range(steps):
        indices = share[step * batch_size : (step + 1) * batch_size]
        weights = torch.ones(len(indices), device=device)
        if len(indices) < batch_size:  # pad so every rank runs the same batches
            weights = torch.cat([weights, torch.zeros(batch_size - len(indices), device=device)])
            indices = indices + [0] * (batch_size - len(indices))
        batch = {key: value.to(device) for key, value in dataset[indices].items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        correct, total = _score(logits, batch["labels"], weights)
        counts += torch.stack([correct, total]).to(counts)
    if dist.is_initialized():
        dist.all_reduce(counts)  # TP ranks count the same samples: the ratio is unchanged
    model.train(was_training)
    return (counts[0] / counts[1]).item() if counts[1] > 0 else 0.0


def _score(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.dim() == 2:  # classification
        return ((logits.argmax(-1) == labels).float() * weights).sum(), weights.sum()
    predicted, target = logits[:, :-1].argmax(-1), labels[:, 1:]  # next-token prediction
    valid = (target != -100).float() * weights[:, None]
    return ((predicted == target).float() * valid).sum(), valid.sum()
