"""What a finished job leaves in ``job.output``: the whole model, and with ``--lora`` the adapter too.

Without LoRA the workers write the consolidated model (``save_pretrained``) into ``job.output``.
With LoRA they write the adapter into ``job.output/adapter`` (``PeftModel.from_pretrained(base,
path)`` loads it) and the tokenizer into ``job.output``; then ``merge_adapter``, in the command's
own process once the workers are done, writes the base model with the adapter merged in next to
the tokenizer, so that the model is read from the same ``from_pretrained`` directory either way.
The merge runs outside the workers because loading a model there is not a plain load: under
ZeRO-3, Accelerate and the HF Trainer make ``from_pretrained`` partition it, a collective that
only rank 0 would enter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn

from meshplan.checkpoint import consolidated_state_dict, save_pretrained
from meshplan.finetune.job import FinetuneJob, Prepared, pretrained_model, task_and_labels

ADAPTER_DIR = "adapter"


def save_outputs(job: FinetuneJob, prepared: Prepared, model: nn.Module) -> dict[str, Any]:
    """Writes the job's model, or with LoRA its adapter and tokenizer, into ``job.output``; what metrics.json adds
    about them. Collective: every rank gathers, rank 0 writes."""
    if not job.lora:
        save_pretrained(model, prepared.tokenizer, job.output)
        return {}
    state = consolidated_state_dict(model)  # every rank gathers (ZeRO-3 partitions, TP shards)
    written: dict[str, Any] = {}
    if not dist.is_initialized() or dist.get_rank() == 0:
        adapter = Path(job.output) / ADAPTER_DIR
        # peft selects and renames the adapter's tensors (and the trained head) from the whole state dict.
        model.save_pretrained(str(adapter), state_dict=state, safe_serialization=True)
        prepared.tokenizer.save_pretrained(job.output)
        trained = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
        written = {"lora": {"r": job.lora_r, "alpha": job.lora_alpha, "targets": job.lora_targets,
                            "trainable_parameters": sum(tensor.numel() for name, tensor in state.items() if name in trained),
                            "adapter": str(adapter),
                            "adapter_bytes": sum(path.stat().st_size for path in adapter.iterdir() if path.is_file())}}
    if dist.is_initialized():
        dist.barrier()
    return written


def merge_adapter(job: FinetuneJob) -> None:
    """Writes the base model with the job's adapter merged in (``merge_and_unload``) into ``job.output``.

    One process, after the workers: the adapter is read from its files, onto a fresh copy of the
    base, as a user would load it.
    """
    from peft import PeftModel

    task, names = task_and_labels(job)
    merged = PeftModel.from_pretrained(pretrained_model(job, task, names), str(Path(job.output) / ADAPTER_DIR))
    merged.merge_and_unload().save_pretrained(job.output, safe_serialization=True)
