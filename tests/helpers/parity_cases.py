"""The parity cases: every strategy, registered name and catalogue recipe, by the spawn that runs them.

tests/test_parity.py asserts each case against the single-process reference;
tests/scripts/parity_report.py prints the same figures.
"""

from __future__ import annotations

import meshplan
from meshplan.recipes import CATALOGUE_DIR

from .parity import CLIP, Case

TWO_PROCESS_CASES = [
    *(
        case
        for model in ("llama", "minilm")
        for case in (
            Case(model, "DDP", meshplan.DDP(), 4),
            Case(model, "ZeRO-1", meshplan.ZeRO(stage=1), 4),
            Case(model, "ZeRO-2", meshplan.ZeRO(stage=2), 4),
            Case(model, "ZeRO-3", meshplan.ZeRO(stage=3), 4),
            Case(model, "ZeRO-3-offload", meshplan.ZeRO(stage=3, offload_optimizer=True, offload_parameters=True), 4),
            Case(model, "TP-2", meshplan.TensorParallel(tp_size=2), 8),
            Case(model, "FSDP2-3", meshplan.ZeRO(stage=3, engine="fsdp2"), 4),
        )
    ),
    # The registered names, as Trainer(strategy="...") resolves them; meshplan_tp and meshplan_tp_fsdp
    # take both processes for TP (meshplan_tp_fsdp's data-parallel dimension is then 1).
    *(Case("llama", name, name, 8 if name.startswith("meshplan_tp") else 4) for name in meshplan.lightning.REGISTERED_STRATEGIES),
    # Gradient clipping: Lightning clips for DDP and TP (on DTensors), DeepSpeed clips inside the engine.
    Case("llama", "DDP-clip", meshplan.DDP(), 4, clip=CLIP),
    Case("llama", "ZeRO-2-clip", meshplan.ZeRO(stage=2), 4, clip=CLIP),
    Case("llama", "ZeRO-3-clip", meshplan.ZeRO(stage=3), 4, clip=CLIP),
    Case("llama", "TP-2-clip", meshplan.TensorParallel(tp_size=2), 8, clip=CLIP),
    # FSDP2 (engine="fsdp2"): meshplan clips across the shards (meshplan.fsdp.clip_grad_norm), and
    # FSDP2 reduce-scatters every micro-batch's gradients into the accumulated shards.
    Case("llama", "FSDP2-2-clip-accumulate", meshplan.ZeRO(stage=2, engine="fsdp2"), 2, clip=CLIP, accumulate=2),
    Case("llama", "FSDP2-3-clip-accumulate", meshplan.ZeRO(stage=3, engine="fsdp2"), 2, clip=CLIP, accumulate=2),
    # Accumulation without clipping (which would hide a wrong gradient scale): Lightning divides the loss by
    # accumulate_grad_batches, and DeepSpeed's engine.backward must not divide it again.
    Case("llama", "ZeRO-2-accumulate", meshplan.ZeRO(stage=2), 2, accumulate=2),
    Case("llama", "ZeRO-3-accumulate", meshplan.ZeRO(stage=3), 2, accumulate=2),
    # Tied embeddings stay whole (and tied) under TP; ZeRO-3 partitions the shared weight once.
    Case("llama-tied", "TP-2", meshplan.TensorParallel(tp_size=2), 8),
    Case("llama-tied", "ZeRO-3", meshplan.ZeRO(stage=3), 4),
    Case("llama-tied", "FSDP2-3", meshplan.ZeRO(stage=3, engine="fsdp2"), 4),  # the shared weight stays in the root unit
    # peft LoRA models (frozen base, trained adapters): Llama with adapters on every block layer, MiniLM with
    # adapters on query, value and the dense projections and its classifier trained whole (modules_to_save).
    Case("llama-lora", "DDP", meshplan.DDP(), 4),
    Case("llama-lora", "ZeRO-2", meshplan.ZeRO(stage=2), 4),
    Case("llama-lora", "ZeRO-3", meshplan.ZeRO(stage=3), 4),
    Case("llama-lora", "TP-2", meshplan.TensorParallel(tp_size=2), 8),
    Case("llama-lora", "FSDP2-3", meshplan.ZeRO(stage=3, engine="fsdp2"), 4),
    Case("llama-lora", "ZeRO-3-accumulate", meshplan.ZeRO(stage=3), 2, accumulate=2),
    Case("minilm-lora", "ZeRO-3", meshplan.ZeRO(stage=3), 4),
    Case("minilm-lora", "TP-2", meshplan.TensorParallel(tp_size=2), 8),
    # The catalogue's recipes in the Lightning Trainer, through meshplan.from_recipe.
    *(
        Case("llama", f"recipe-{name}", meshplan.from_recipe(CATALOGUE_DIR / f"{name}.yaml"), 8 if name == "tp" else 4)
        for name in ("ddp", "zero1", "zero2", "zero3", "zero3-offload", "tp", "fsdp2")
    ),
]

FOUR_PROCESS_CASES = [
    Case("llama", "TP-2xDP-2", meshplan.TensorParallel(tp_size=2), 4),
    Case("minilm", "TP-2xDP-2", meshplan.TensorParallel(tp_size=2), 4),
    Case("llama", "TP-2xDP-2-clip", meshplan.TensorParallel(tp_size=2), 4, clip=CLIP),
    Case("llama", "recipe-tp-dp", meshplan.from_recipe(CATALOGUE_DIR / "tp-dp.yaml"), 4),
    Case("llama-tied", "TP-2xDP-2", meshplan.TensorParallel(tp_size=2), 4),
    # TP x FSDP2 on a 2 x 2 mesh: FSDP2 shards the TP shards again (2-D DTensors) and the norms (1-D).
    Case("llama", "TP-2xFSDP-2", meshplan.TensorParallel(tp_size=2, data_parallel="shard"), 4),
    Case("minilm", "TP-2xFSDP-2", meshplan.TensorParallel(tp_size=2, data_parallel="shard"), 4),
    Case("llama", "TP-2xFSDP-2-clip-accumulate", meshplan.TensorParallel(tp_size=2, data_parallel="shard"), 2, clip=CLIP,
         accumulate=2),
    Case("llama-tied", "TP-2xFSDP-2", meshplan.TensorParallel(tp_size=2, data_parallel="shard"), 4),
    Case("llama", "recipe-tp-fsdp", meshplan.from_recipe(CATALOGUE_DIR / "tp-fsdp.yaml"), 4),
    Case("llama-lora", "TP-2xDP-2", meshplan.TensorParallel(tp_size=2), 4),
    Case("llama-lora", "TP-2xFSDP-2", meshplan.TensorParallel(tp_size=2, data_parallel="shard"), 4),
    Case("minilm-lora", "TP-2xDP-2", meshplan.TensorParallel(tp_size=2), 4),
]

