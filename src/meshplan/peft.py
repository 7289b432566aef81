"""PEFT adapters (LoRA through the ``peft`` library) under every layout.

A user wraps a model with ``peft.get_peft_model(model, LoraConfig(...))`` and trains it under
any Plan, unchanged. What meshplan adds:

- **Tensor parallelism.** torch's styles shard only ``nn.Linear`` and ``nn.Embedding``, and a
  LoRA layer is neither: it holds a frozen ``base_layer`` and two small linear layers, and
  computes ``base_layer(x) + lora_B(lora_A(dropout(x))) * scaling``. ``tp_plan_for_lora_layer``
  turns the plan's style for the LoRA layer into styles for those three, chosen so that the two
  terms come out split the same way and no collective is added beyond one all-reduce of the
  rank-``r`` activations under a row-wise base:

  ===================== ============= =============== ===============
  base layer's style    base_layer    lora_A          lora_B
  ===================== ============= =============== ===============
  colwise (and _rep,    the same      replicate       the same
  _gather_output)
  rowwise (and _rep,    the same      the same        replicate
  _split_input)
  embedding_rowwise     the same      (lora_embedding_A/B stay whole)
  ===================== ============= =============== ===============

  Column-wise: ``lora_A`` sees the whole input, as ``base_layer`` does, and ``lora_B`` gives the
  same output columns as ``base_layer``. Row-wise: ``lora_A`` takes the same input shard as
  ``base_layer`` and sums its partial products over the ranks, then the whole ``lora_B`` gives the
  whole output, as ``base_layer``'s own sum does. DoRA, other adapter types and ``fan_in_fan_out``
  layers are PlanErrors naming the module.
- **Checkpoints** of a model with adapters hold only what trains (``checkpointed``), and a
  fingerprint of the frozen weights' names and shapes (``frozen_fingerprint``) so that resuming
  onto another base model is refused; see meshplan.checkpoint.
- ``lora_targets`` and ``lora_model``: LoRA by short layer names (``q,v``) for ``meshplan finetune --lora``.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any

from torch import nn

from meshplan._compat import peft as peft_compat
from meshplan.errors import PlanError

# How a LoRA layer's lora_A and lora_B are split, by the style of the layer it wraps.
_COLUMN_STYLES = ("colwise", "colwise_rep", "colwise_gather_output")
_ROW_STYLES = ("rowwise", "rowwise_rep", "rowwise_split_input")

# `meshplan finetune --lora-targets` short names -> the layer names models use for them.
TARGET_NAMES = {
    "q": ("q_proj", "query", "q_lin", "wq"),
    "k": ("k_proj", "key", "k_lin", "wk"),
    "v": ("v_proj", "value", "v_lin", "wv"),
    "o": ("o_proj", "attention.output.dense", "out_lin", "wo"),
    "gate": ("gate_proj", "w1"),
    "up": ("up_proj", "intermediate.dense", "lin1", "w3"),
    "down": ("down_proj", "output.dense", "lin2", "w2"),
}


def is_adapter_layer(module: nn.Module) -> bool:
    """Whether ``module`` is one of peft's adapter layers or a trainable copy of a whole module (``modules_to_save``):
    a tensor-parallel plan entry must be rewritten for it."""
    return peft_compat.is_tuner_layer(module) or peft_compat.is_modules_to_save(module)


def is_peft_model(module: nn.Module) -> bool:
    """Whether ``module`` holds peft adapter layers or peft's trainable copies of whole modules (``modules_to_save``)."""
    return peft_compat.peft_loaded() and any(is_adapter_layer(inner) for inner in module.modules())


def tp_plan_for_lora_layer(name: str, layer: nn.Module, style: str, pattern: str) -> dict[str, str]:
    """The ``{module name: style}`` that shards the LoRA layer ``name`` as ``style`` shards the layer it wraps.

    Args:
        name: the layer's module name; the returned names are inside it.
        layer: the peft layer the plan's ``pattern`` matched.
        style: the plan's style for it.

    Raises:
        PlanError: ``layer`` is not a plain LoRA layer tensor parallelism can split consistently
            (another adapter type, DoRA or another LoRA variant, a transposed ``fan_in_fan_out``
            base weight, a ``modules_to_save`` copy), or ``style`` does not fit its base layer.
    """
    where = f"tp_plan pattern {pattern!r} matches {name}, a {_class_name(layer)}"
    if peft_compat.is_modules_to_save(layer):
        raise PlanError(f"{where}: peft trains a whole copy of this module (modules_to_save), and meshplan keeps such copies "
                        f"whole under tensor parallelism; leave it out of tp_plan.")
    if not (peft_compat.is_lora_linear(layer) or peft_compat.is_lora_embedding(layer)):
        raise PlanError(f"{where}: meshplan shards only LoRA adapters (peft.LoraConfig) under tensor parallelism, on "
                        f"nn.Linear and nn.Embedding layers; train this adapter type with DDP, ZeRO or FSDP2, or leave "
                        f"{name} out of tp_plan.")
    variants = peft_compat.lora_variants(layer)
    if variants:
        raise PlanError(f"{where} whose adapter {variants[0]!r} is a LoRA variant (DoRA, use_dora=True, or another): it "
                        f"needs the whole base weight in every forward pass, so tensor parallelism cannot split it; "
                        f"use plain LoRA, or train under DDP, ZeRO or FSDP2.")
    if peft_compat.fan_in_fan_out(layer):
        raise PlanError(f"{where} with fan_in_fan_out=True (a transposed Conv1D weight): torch's tensor parallel styles "
                        f"shard only nn.Linear and nn.Embedding; use DDP, ZeRO or FSDP2 for this model.")
    if peft_compat.is_lora_embedding(layer):
        if style != "embedding_rowwise":
            raise PlanError(f"{where}: style {style!r} does not apply to an embedding; use 'embedding_rowwise'.")
        # The base embedding's rows are split and its output summed whole; the adapter's own
        # (small) embedding stays whole on every rank and adds to that whole output.
        return {f"{name}.base_layer": style}
    if style in _COLUMN_STYLES:
        adapter_styles = ("replicate", style)
    elif style in _ROW_STYLES:
        adapter_styles = (style, "replicate")
    else:
        raise PlanError(f"{where}: style {style!r} does not apply to a linear layer; use a colwise or rowwise style.")
    plan = {f"{name}.base_layer": style}
    for adapter in peft_compat.lora_adapters(layer):
        plan[f"{name}.lora_A.{adapter}"], plan[f"{name}.lora_B.{adapter}"] = adapter_styles
    if style == "rowwise" and _has_dropout(layer):
        # The ranks of a TP group share one random stream (meshplan.tp.sync.share_random_state): a
        # replicated input is masked alike on each, as in one process, but each rank's share here
        # draws the mask a rank of one process would draw for its first share.
        warnings.warn(f"{name}: lora_dropout under tensor parallelism on a row-wise layer masks each rank's share of the "
                      f"input with the same random stream, so the masks of the shares repeat one another: still dropout "
                      f"at the same rate, but not one process's masks. Set lora_dropout=0 to reproduce a one-process "
                      f"run exactly.", stacklevel=3)
    return plan


def _has_dropout(layer: nn.Module) -> bool:
    return any(isinstance(dropout, nn.Dropout) and dropout.p > 0 for dropout in layer.lora_dropout.values())


def _class_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__name__} ({cls.__module__}.{cls.__qualname__})"


def checkpointed(module: nn.Module) -> dict[str, Any]:
    """The tensors of ``module``'s state dict (``keep_vars``) that a checkpoint stores.

    All of them, unless ``module`` holds peft adapters: then only the parameters that train (the
    adapters and ``modules_to_save`` copies) and the buffers of the modules that hold them. The
    frozen base is not stored, as peft's own ``save_pretrained`` does not store it: the run that
    resumes rebuilds it from the model it started from.
    """
    state = module.state_dict(keep_vars=True)
    if not is_peft_model(module):
        return state
    trained = {name: tensor for name, tensor in state.items() if isinstance(tensor, nn.Parameter) and tensor.requires_grad}
    # The buffers of the modules that train (a modules_to_save head's norm statistics) change with them.
    owners = {name.rpartition(".")[0] for name in trained}
    return {name: tensor for name, tensor in state.items()
            if name in trained or (not isinstance(tensor, nn.Parameter) and name.rpartition(".")[0] in owners)}


def frozen_fingerprint(module: nn.Module) -> str:
    """A hash of the names, whole shapes and ties of ``module``'s frozen parameters: the same in every layout
    (ZeRO-3 partitions and DTensor shards count with their whole shapes), different for a base model of
    another architecture. Two checkpoints of one architecture (other values) have the same fingerprint."""
    from meshplan._compat.deepspeed import full_shape

    digest = hashlib.sha256()
    first_names: dict[int, str] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if getattr(tensor, "requires_grad", True) is False and isinstance(tensor, nn.Parameter):
            tied_to = first_names.setdefault(id(tensor), name)
            digest.update(f"{name}:{list(full_shape(tensor))}{'' if tied_to == name else f'={tied_to}'}\n".encode())
    return digest.hexdigest()


def adapter_manifest(module: nn.Module, stored: dict[str, str]) -> list[dict[str, Any]]:
    """For each peft model inside ``module``, what export needs to write its adapter directory.

    Args:
        stored: the checkpoint key of each of ``module``'s state-dict names that is stored.

    Returns one entry per (peft model, adapter): ``prefix`` (the peft model's name in ``module``,
    with a trailing dot), ``adapter`` (its name), ``config`` (its peft config, as
    ``adapter_config.json`` holds it) and ``weights`` (adapter-file key -> checkpoint key, by
    peft's own renaming).
    """
    entries = []
    names = list(module.state_dict(keep_vars=True))
    for name, peft_model in peft_compat.peft_models(module):
        prefix = f"{name}." if name else ""
        # Every name, stored or not: peft selects an adapter's tensors by name, and takes all it is given
        # when none matches (an adapter that did not train, whose tensors are not stored).
        local = {key[len(prefix):]: stored.get(key) for key in names if key.startswith(prefix)}
        for adapter, config in peft_model.peft_config.items():
            selected = peft_compat.adapter_state_dict(peft_model, dict(local), adapter)
            weights = {file_key: key for file_key, key in selected.items() if key is not None}
            if weights:  # an adapter with nothing stored did not train: there is nothing to export
                entries.append({"prefix": prefix, "adapter": adapter, "config": _json_config(config), "weights": weights})
    return entries


def _json_config(config: Any) -> dict[str, Any]:
    """A peft config as ``adapter_config.json`` holds it (sets become sorted lists, as peft's save_pretrained writes)."""
    import json

    def plain(value: Any) -> Any:
        if isinstance(value, (set, frozenset)):
            return sorted(value, key=str)
        return str(value)

    return json.loads(json.dumps(config.to_dict(), default=plain))


def lora_targets(model: nn.Module, targets: str) -> list[str]:
    """The module-name suffixes peft's ``target_modules`` takes for short names such as ``"q,v"``.

    Each short name (``q``, ``k``, ``v``, ``o``, ``gate``, ``up``, ``down``; see ``TARGET_NAMES``)
    becomes the name the model's own ``nn.Linear`` layers use (``q_proj`` in Llama, ``query`` in
    BERT, ``q_lin`` in DistilBERT); any other name is taken as it is.

    Raises:
        PlanError: a name matches no ``nn.Linear`` layer of ``model``.
    """
    linear_names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    found = []
    for target in (part.strip() for part in targets.split(",") if part.strip()):
        candidates = TARGET_NAMES.get(target, (target,))
        matched = [candidate for candidate in candidates if any(_ends_with(name, candidate) for name in linear_names)]
        if not matched:
            known = ", ".join(TARGET_NAMES)
            raise PlanError(f"LoRA target {target!r} matches no nn.Linear layer of {type(model).__name__} (looked for "
                            f"{', '.join(candidates)}); give short names ({known}) or the layers' own names.")
        found.append(matched[0])
    if not found:
        raise PlanError("no LoRA target given; name the layers to adapt, e.g. q,v.")
    return found


def _ends_with(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith(f".{suffix}")


def lora_model(model: nn.Module, *, r: int = 8, alpha: int = 16, targets: str = "q,v", dropout: float = 0.0,
               task_type: str = "SEQ_CLS") -> nn.Module:
    """``model`` wrapped in LoRA adapters with peft (``get_peft_model``): rank ``r``, scaling ``alpha / r``, on the
    layers ``targets`` names (``lora_targets``); a classifier head trains whole under ``SEQ_CLS``."""
    if r < 1 or alpha <= 0:
        raise PlanError(f"LoRA needs a rank of at least 1 and a positive alpha, not r={r}, alpha={alpha}.")
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=lora_targets(model, targets), lora_dropout=dropout,
                        task_type=task_type)
    return get_peft_model(model, config)
