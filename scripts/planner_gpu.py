"""The planner against CUDA's own memory counters: one process, one GPU, a Llama of about 1B parameters.

    python scripts/planner_gpu.py [--seq-len 2048] [--micro-batch 1] [--dry-run]

Trains the model (built from its config, fp32 weights, AdamW, bf16 autocast: the "ddp" layout at
world size 1, whose gradients need no bucket) for one warm-up step and one measured step, and
prints torch.cuda.max_memory_allocated() of the measured step and the model states held after
it beside meshplan.estimate's ``total`` and ``model_states``, with their ratios. ``--dry-run``
prints the estimate only (no GPU needed). scripts/gpu_smoke.sh runs it.
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import meshplan

CONFIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
              vocab_size=32000, max_position_embeddings=4096, architectures=["LlamaForCausalLM"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--dry-run", action="store_true", help="print the estimate only")
    arguments = parser.parse_args()
    config = LlamaConfig(**CONFIG)
    layout = meshplan.DDP(gradient_as_bucket_view=True)  # one process: no DDP buckets
    predicted = meshplan.estimate(config, layout, world_size=1, micro_batch_size=arguments.micro_batch,
                                  seq_len=arguments.seq_len, precision="bf16")
    print(f"planner_gpu: estimate: model states {predicted.model_states / 1e9:.2f} GB, peak {predicted.total / 1e9:.2f} GB "
          f"({predicted.bytes_per_rank()})")
    if arguments.dry_run:
        return 0
    if not torch.cuda.is_available():
        print("planner_gpu: no CUDA device; use --dry-run", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = torch.randint(0, config.vocab_size, (arguments.micro_batch, arguments.seq_len), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()

    step()  # warm-up: the optimizer's states exist from here on
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    states = torch.cuda.memory_allocated()  # weights, gradients and AdamW states, right after the step
    print(f"planner_gpu: {torch.cuda.get_device_name(0)}: measured peak {peak / 1e9:.2f} GB / estimated "
          f"{predicted.total / 1e9:.2f} GB = {peak / predicted.total:.3f}; model states {states / 1e9:.2f} GB / "
          f"{predicted.model_states / 1e9:.2f} GB = {states / predicted.model_states:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
