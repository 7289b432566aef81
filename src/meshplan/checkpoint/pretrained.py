"""Whole weights out of any layout, and a Hugging Face model directory from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from meshplan._compat.deepspeed import is_zero3_parameter


def consolidated_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict of ``module`` on every rank, on the CPU.

    Collective: every rank must call it. ZeRO-3 parameters are gathered one at a time (so at
    most one whole parameter is materialized beyond the result), TP DTensors are assembled.
    """
    state: dict[str, torch.Tensor] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if is_zero3_parameter(tensor):
            import deepspeed

            with deepspeed.zero.GatheredParameters([tensor]):
                state[name] = tensor.data.detach().cpu().clone()
        elif isinstance(tensor, DTensor):
            state[name] = tensor.full_tensor().detach().cpu()
        else:
            state[name] = tensor.detach().cpu().clone()
    return state


def save_pretrained(model: Any, tokenizer: Any, out_dir: str | Path) -> None:
    """Writes a Hugging Face model directory (config, tokenizer, safetensors) with the whole weights.

    Collective: every rank gathers; rank 0 writes.
    """
    state = consolidated_state_dict(model)
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out_dir))
    if dist.is_initialized():
        dist.barrier()
