"""Plan -> keyword arguments for ``transformers.TrainingArguments``.

Each setting is written once: the DeepSpeed config says "auto" wherever TrainingArguments has
the value (batch size, accumulation, clipping, precision), so the two cannot disagree. On a
CPU-only machine ``use_cpu=True`` is what makes Accelerate (under the Trainer) count every
worker and use gloo; with DeepSpeed it also gives the "auto" batch size the true world size.
FSDP2 goes through the Trainer's own ``fsdp``/``fsdp_config`` arguments, where the Trainer runs
it: on GPUs. On the CPU it cannot (below), and TP x FSDP2 not at all; both are PlanErrors.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch

from meshplan._compat import accelerate as accelerate_compat
from meshplan.deepspeed_config import deepspeed_config
from meshplan.errors import PlanError
from meshplan.plan import Plan

# Plan option -> TrainingArguments keyword, for the DDP options the Trainer exposes.
_DDP_ARGUMENTS = {
    "find_unused_parameters": "ddp_find_unused_parameters",
    "static_graph": "ddp_static_graph",
    "bucket_cap_mb": "ddp_bucket_cap_mb",
}


def training_arguments(plan: Plan) -> dict[str, Any]:
    """Keyword arguments that make ``TrainingArguments`` and ``Trainer`` train with ``plan``.

    Example::

        args = TrainingArguments(output_dir="out", per_device_train_batch_size=4,
                                 **meshplan.ZeRO(stage=2).training_arguments())

    The same arguments serve a launched job (torchrun, ``accelerate launch``: ``ddp_backend`` is
    set, gloo on CPU, nccl on GPUs, or the plan's ``process_group_backend``) and a plain
    ``python train.py``, which trains as a world of one without any process group.

    Raises:
        PlanError: the Trainer cannot express the layout (tensor parallelism, FSDP2 on the CPU, or an
            option it lacks), or a DDP or FSDP2 layout is asked for where ACCELERATE_USE_DEEPSPEED would
            make the Trainer run DeepSpeed.
    """
    on_cpu = not torch.cuda.is_available()
    if plan.uses_fsdp2:
        _refuse_fsdp2_where_the_trainer_cannot(plan, on_cpu)
    if plan.strategy == "tp":
        raise PlanError(
            "TensorParallel cannot be expressed through TrainingArguments: the HF Trainer only runs tensor "
            "parallelism on models loaded with a transformers DistributedConfig, and not on CPU processes. Use "
            "lightning.Trainer(strategy=meshplan.TensorParallel(...)) or meshplan.accelerator(...) instead."
        )
    if not plan.uses_deepspeed:
        _refuse_leftover_engine(plan, accelerate_compat.USE_DEEPSPEED)
    if not plan.uses_fsdp2:
        _refuse_leftover_engine(plan, accelerate_compat.USE_FSDP)
    arguments: dict[str, Any] = {"use_cpu": True} if on_cpu else {}
    arguments.update(_training_settings(plan))
    if plan.uses_fsdp2:
        arguments.update(fsdp=True, fsdp_config=_fsdp_config(plan))
    elif plan.strategy == "zero":
        arguments["deepspeed"] = deepspeed_config(
            plan, micro_batch_size="auto", gradient_accumulation_steps="auto", gradient_clipping="auto", precision="auto"
        )
    if _launched_as_a_group():
        arguments["ddp_backend"] = plan.option("process_group_backend") or ("gloo" if on_cpu else "nccl")
    if plan.strategy == "ddp":
        arguments.update(_ddp_arguments(plan))
    return arguments


def _refuse_fsdp2_where_the_trainer_cannot(plan: Plan, on_cpu: bool) -> None:
    if plan.strategy == "tp":
        raise PlanError(
            "TensorParallel(data_parallel='shard') cannot be expressed through TrainingArguments: the HF Trainer only "
            "runs tensor parallelism on models loaded with a transformers DistributedConfig, and not on CPU processes. "
            "Use lightning.Trainer(strategy=meshplan.TensorParallel(..., data_parallel='shard')) or "
            "meshplan.accelerator(...) instead."
        )
    if on_cpu:
        # Measured (transformers 5.24, accelerate 1.15, 2 CPU processes): with use_cpu=True, which Accelerate
        # needs to count CPU workers, it drops the Trainer's FSDP plugin and wraps the model in DDP, silently.
        raise PlanError(
            f"ZeRO(stage={plan.zero_stage}, engine='fsdp2') cannot run under the HF Trainer on the CPU: with "
            f"use_cpu=True (which Accelerate needs to count CPU workers) Accelerate drops the Trainer's FSDP plugin "
            f"and trains plain DDP instead, every process holding the whole model and optimizer state. On CPUs use "
            f"lightning.Trainer(strategy=meshplan.ZeRO(stage={plan.zero_stage}, engine='fsdp2')) or "
            f"meshplan.accelerator(...), or ZeRO(stage={plan.zero_stage}) (DeepSpeed) with the HF Trainer; on GPUs "
            f"these arguments run FSDP2 through the Trainer's fsdp_config."
        )


def _fsdp_config(plan: Plan) -> dict[str, Any]:
    """The Trainer's ``fsdp_config`` for an FSDP2 ZeRO layout (its keys, transformers 5.24)."""
    config: dict[str, Any] = {
        "version": 2,
        "reshard_after_forward": plan.reshard_after_forward,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # the model's _no_split_modules, the blocks meshplan shards
        "cpu_ram_efficient_loading": False,
        "activation_checkpointing": False,
        # The Trainer's save_model then writes whole weights (model.safetensors), as under the other layouts.
        "state_dict_type": "FULL_STATE_DICT",
    }
    if plan.option("fsdp_layer_classes") is not None:
        config["transformer_layer_cls_to_wrap"] = [name.strip() for name in plan.option("fsdp_layer_classes").split(",")
                                                   if name.strip()]
    return config


def _launched_as_a_group(environ: Mapping[str, str] | None = None) -> bool:
    """Whether a launcher started this process as one of a group.

    Accelerate forms a process group when LOCAL_RANK is set (torchrun, ``accelerate launch``) or
    when a launcher's world size is above 1 (WORLD_SIZE, or MPI's and Slurm-PMI's variables). A
    plain ``python train.py`` is a world of one: naming a backend there makes Accelerate ask torch
    for the size of a process group that was never created ("Default process group has not been
    initialized").
    """
    environ = os.environ if environ is None else environ
    sizes = [environ.get(name, "1") for name in accelerate_compat.WORLD_SIZE_VARIABLES]
    return "LOCAL_RANK" in environ or any(size.isdigit() and int(size) > 1 for size in sizes)


# The variables with which `accelerate launch` of a DeepSpeed or FSDP config (and every DeepSpeed or FSDP
# Accelerator, which leaves them set) makes the Trainer's Accelerator build that engine's plugin,
# even from TrainingArguments that do not ask for it: variable -> (engine, the config's distributed_type).
_LEFTOVER_ENGINES = {accelerate_compat.USE_DEEPSPEED: ("DeepSpeed", "a DeepSpeed"),
                     accelerate_compat.USE_FSDP: ("Accelerate's FSDP", "an FSDP")}


def _refuse_leftover_engine(plan: Plan, variable: str) -> None:
    """A PlanError when ``variable`` would make the HF Trainer run another engine than ``plan``'s."""
    if accelerate_compat.flag_set(variable):
        engine, config = _LEFTOVER_ENGINES[variable]
        raise PlanError(
            f"{variable}=true is set in this process, so the HF Trainer would run {engine} instead of "
            f"strategy={plan.strategy!r}. It comes from `accelerate launch` with {config} config, or from an earlier "
            f"Trainer or Accelerator that ran {engine} in this process: launch with a config of this layout (or "
            f"torchrun), run it in a fresh process, or unset the variable before building TrainingArguments."
        )


def _training_settings(plan: Plan) -> dict[str, Any]:
    arguments: dict[str, Any] = {}
    precision = plan.option("mixed_precision")
    if precision in ("bf16", "fp16"):
        arguments[precision] = True
    elif precision == "no":
        arguments.update(bf16=False, fp16=False)
    if plan.option("gradient_accumulation_steps") is not None:
        arguments["gradient_accumulation_steps"] = plan.option("gradient_accumulation_steps")
    if plan.option("gradient_clipping") is not None:
        arguments["max_grad_norm"] = plan.option("gradient_clipping")
    return arguments


def _ddp_arguments(plan: Plan) -> dict[str, Any]:
    # Transformers models default to find_unused_parameters=True under the Trainer, which costs
    # an extra graph traversal per step; DDP's own default (False) holds unless the plan says otherwise.
    arguments: dict[str, Any] = {"ddp_find_unused_parameters": False}
    for option, value in plan.options:
        if option in _DDP_ARGUMENTS:
            arguments[_DDP_ARGUMENTS[option]] = value
        elif option == "gradient_as_bucket_view":
            raise PlanError(
                f"option gradient_as_bucket_view={value!r} cannot be expressed through TrainingArguments; "
                f"drop it for the HF Trainer (Lightning and meshplan.accelerator() honour it)."
            )
    return arguments
