"""Spawn workers for LoRA under tensor parallelism: dropout on the replicated input of a LoRA layer."""

from __future__ import annotations

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

import meshplan
from meshplan._compat.accelerate import reset_process_state

from .parity import tiny_llama_config


def replicated_adapter_gradients_after_dropout() -> dict[str, bool]:
    """Each rank seeds its own generator (as a script seeding by rank does), then trains one step of a Llama with
    lora_dropout 0.5 on q_proj (column-wise: lora_A whole on every rank, fed the whole input) under TP over both
    ranks. Returns whether the ranks' lora_A gradients, and their dropout draws after the step, are equal."""
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(tiny_llama_config()), LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.5,
                                                                              init_lora_weights=False))
    accelerator = meshplan.accelerator(meshplan.TensorParallel(tp_size=2))
    torch.manual_seed(100 + dist.get_rank())  # a seed per rank, as a script seeding by rank has
    model = accelerator.prepare(model)  # shards, and gives the TP group one random stream
    ids = torch.arange(32).reshape(2, 16) % 64
    accelerator.backward(model(input_ids=ids, labels=ids).loss)
    inner = accelerator.unwrap_model(model)
    gradient = inner.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.grad
    gathered = [torch.empty_like(gradient) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, gradient)
    draws = [torch.empty(8) for _ in range(dist.get_world_size())]
    dist.all_gather(draws, torch.rand(8))
    reset_process_state()
    return {"gradients_equal": all(torch.equal(gathered[0], other) for other in gathered),
            "draws_equal": all(torch.equal(draws[0], other) for other in draws)}
