"""Plan -> DeepSpeed config: the only place in meshplan that writes a DeepSpeed config.

Lightning, Accelerate and the HF Trainer all call ``deepspeed_config``; each passes only the
values that its own loop does not already own (Lightning fills batch size, accumulation,
clipping and precision itself).
"""

from __future__ import annotations

from typing import Any

from meshplan.errors import PlanError
from meshplan.plan import ZERO_SECTION_OPTIONS, Plan, normalize_precision

# The ZeRO options that are keys of DeepSpeed's zero_optimization section under the same name.
_ZERO_KEYS = ZERO_SECTION_OPTIONS



def deepspeed_config(
    plan: Plan,
    *,
    micro_batch_size: int | str | None = None,
    gradient_accumulation_steps: int | str | None = None,
    gradient_clipping: float | str | None = None,
    precision: str | None = None,
) -> dict[str, Any]:
    """Renders a ZeRO ``plan`` as a DeepSpeed config dict.

    Each front end passes what its own loop does not set in DeepSpeed itself; a value of
    ``"auto"`` leaves it to the HF Trainer or Accelerate to fill in from their own arguments.

    Args:
        plan: a Plan with ``strategy == "zero"`` and ``engine == "deepspeed"``.
        micro_batch_size: ``train_micro_batch_size_per_gpu``; left out when None.
        gradient_accumulation_steps: left out when None.
        gradient_clipping: the max gradient norm; left out when None.
        precision: "no", "bf16", "fp16", a Lightning precision ("32-true", "bf16-mixed", ...) or
            "auto"; left out when None.
    """
    if plan.strategy != "zero":
        raise PlanError(f"strategy={plan.strategy!r} has no DeepSpeed config; only ZeRO is run by DeepSpeed.")
    if not plan.uses_deepspeed:
        raise PlanError(f"ZeRO with engine={plan.engine!r} has no DeepSpeed config; torch's FSDP2 runs it, not DeepSpeed.")
    config: dict[str, Any] = {
        "zero_optimization": _zero_section(plan),
        # DeepSpeed runs any torch optimizer; the user's choice in configure_optimizers stands.
        "zero_allow_untested_optimizer": True,
    }
    if plan.offload_optimizer:
        # Offloaded optimizer state is stepped on the CPU by whichever optimizer the user chose;
        # DeepSpeedCPUAdam is only forced on when the user picks it.
        config["zero_force_ds_cpu_optimizer"] = False
    if micro_batch_size is not None:
        config["train_micro_batch_size_per_gpu"] = micro_batch_size
    if gradient_accumulation_steps is not None:
        config["gradient_accumulation_steps"] = gradient_accumulation_steps
    if gradient_clipping is not None:
        config["gradient_clipping"] = gradient_clipping
    if precision is not None:
        config.update(_precision_section(precision))
    return config


def _zero_section(plan: Plan) -> dict[str, Any]:
    section: dict[str, Any] = {"stage": plan.zero_stage}
    section.update({key: plan.option(key) for key in _ZERO_KEYS if plan.option(key) is not None})
    if plan.zero_stage == 3:
        # The documented saves (Accelerate's get_state_dict and save_model, the HF Trainer's
        # save_model) gather ZeRO-3's partitions into whole weights only when this is set;
        # without it they raise or write no weights. Gathering costs nothing until a save.
        section["stage3_gather_16bit_weights_on_model_save"] = True
    pin_memory = plan.option("pin_memory", False)
    if plan.offload_optimizer:
        section["offload_optimizer"] = {"device": "cpu", "pin_memory": pin_memory}
    if plan.offload_parameters:
        section["offload_param"] = {"device": "cpu", "pin_memory": pin_memory}
    return section


def _precision_section(precision: str) -> dict[str, Any]:
    if precision == "auto":
        return {"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}
    normalized = normalize_precision(precision)
    if normalized is None:
        raise PlanError(f"precision={precision!r} is unknown; valid values are no, bf16, fp16 or a Lightning precision.")
    return {} if normalized == "no" else {normalized: {"enabled": True}}
