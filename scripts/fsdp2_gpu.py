"""ZeRO-3 on FSDP2 on one GPU: a small Llama trained a few steps, against the same model trained plainly.

    python scripts/fsdp2_gpu.py [--steps 8] [--device cuda|cpu]

One process (world size 1, nccl on CUDA, gloo on CPU). The model is sharded the way
``meshplan.ZeRO(stage=3, engine="fsdp2")`` shards it (meshplan.fsdp.fully_shard_models: each
transformer block, then the model, reshard after forward), trained with AdamW and gradient
clipping (meshplan.fsdp.clip_grad_norm), and compared step by step with an unsharded copy of the
same weights trained on the same batches:

- fp32: the losses must agree within 1e-4 (the parity tolerance) and the weights after the last step
  within 1e-4;
- bf16 autocast (CUDA only): the losses must agree within 1e-2 and fall.

Prints one line per check and exits 1 when one fails, 2 without a CUDA device (``--device cpu``
runs the fp32 check on the CPU, which needs none). scripts/gpu_smoke.sh runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from transformers import LlamaConfig, LlamaForCausalLM

from meshplan.fsdp import clip_grad_norm, fully_shard_models
from meshplan.plan import Plan

CONFIG = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
              vocab_size=4096, max_position_embeddings=512, attention_dropout=0.0, architectures=["LlamaForCausalLM"])
LOSS_TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2}
WEIGHT_TOLERANCE = 1e-4  # fp32, AdamW eps 1e-6, a few steps: above the noise floor of DESIGN.md
MAX_NORM = 1.0


def train(precision: str, device: torch.device, steps: int) -> tuple[list[float], list[float], float]:
    """(FSDP2 losses, plain losses, largest weight difference at the end) for ``steps`` steps."""
    torch.manual_seed(0)
    sharded = LlamaForCausalLM(LlamaConfig(**CONFIG)).to(device)
    plain = LlamaForCausalLM(LlamaConfig(**CONFIG)).to(device)
    plain.load_state_dict(sharded.state_dict())
    mesh = init_device_mesh(device.type, (1,), mesh_dim_names=("data_parallel",))
    fully_shard_models(sharded, Plan("zero", zero_stage=3, engine="fsdp2"), mesh)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, CONFIG["vocab_size"], (4, 128), generator=generator).to(device) for _ in range(2)]
    results = []
    for model in (sharded, plain):
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, eps=1e-6)
        losses = []
        for step in range(steps):
            ids = batches[step % len(batches)]
            with _autocast(precision, device):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if model is sharded:
                clip_grad_norm(model.parameters(), MAX_NORM)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        results.append(losses)
    weights = dict(plain.named_parameters())
    gap = max((parameter.full_tensor() - weights[name]).abs().max().item() for name, parameter in sharded.named_parameters())
    return results[0], results[1], gap


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def check(precision: str, device: torch.device, steps: int) -> bool:
    """Trains under ``precision`` and prints whether FSDP2 matched the plain run; True when it did."""
    fsdp2, plain, weight_gap = train(precision, device, steps)
    loss_gap = max(abs(a - b) for a, b in zip(fsdp2, plain))
    falls = fsdp2[-1] < fsdp2[0]
    passed = loss_gap <= LOSS_TOLERANCE[precision] and falls and (precision != "fp32" or weight_gap <= WEIGHT_TOLERANCE)
    print(f"fsdp2_gpu: {precision} on {device}: losses {fsdp2[0]:.4f} -> {fsdp2[-1]:.4f} (plain {plain[0]:.4f} -> "
          f"{plain[-1]:.4f}), largest loss difference {loss_gap:.2e} (tolerance {LOSS_TOLERANCE[precision]:.0e}), "
          f"weights {weight_gap:.2e}: {'ok' if passed else 'FAILED'}", flush=True)
    return passed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    arguments = parser.parse_args()
    if arguments.device == "cuda" and not torch.cuda.is_available():
        print("fsdp2_gpu: no CUDA device; nothing to check (--device cpu runs the fp32 check on the CPU)", file=sys.stderr)
        return 2
    device = torch.device(arguments.device, 0) if arguments.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        precisions = ("fp32", "bf16") if device.type == "cuda" else ("fp32",)
        results = [check(precision, device, arguments.steps) for precision in precisions]
    finally:
        dist.destroy_process_group()
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
