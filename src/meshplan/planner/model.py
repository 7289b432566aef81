"""What the planner needs to know about a model: its parameters, its TP plan and how to rebuild it.

A model arrives as a transformers config, a model directory or ``config.json`` path, or a live
``nn.Module``. Configs are built on the meta device, so a 70-billion-parameter model costs no
memory; a module is read where it is (a LightningModule or any module holding a transformers
model works: the transformers model inside it is what is sized).

A model with frozen parameters, such as one wrapped in LoRA adapters by ``peft.get_peft_model``
(built on the meta device too: ``get_peft_model`` adds its adapters there), is sized as it will
train: each parameter says whether it trains, and the activations are traced with the same adapters
and the same parameters frozen (see ``ModelFacts.adapters`` and ``ModelFacts.frozen``).
"""

from __future__ import annotations

import copy
import functools
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from meshplan._compat import peft as peft_compat
from meshplan.errors import PlanError
from meshplan.tp.plans import find_pretrained_models
from meshplan.tp.shard import plan_models

# TP styles whose module's input arrives split across the TP ranks (what the rowwise layer multiplies).
ROWWISE_STYLES = ("rowwise", "rowwise_rep", "rowwise_split_input")
# Styles that leave a module's parameters whole on every rank.
_WHOLE_STYLES = ("replicate",)


@dataclass(frozen=True)
class ParameterFacts:
    """One parameter: its name, element count, whether it trains, and its TP style (None: kept whole)."""

    name: str
    shape: tuple[int, ...]
    trainable: bool
    tp_style: str | None = None

    @property
    def numel(self) -> int:
        """Elements in the whole parameter."""
        count = 1
        for size in self.shape:
            count *= size
        return count

    def local_numel(self, tp_size: int) -> int:
        """Elements the largest TP rank holds: the split dimension divided by ``tp_size``, rounded up."""
        dimension = _split_dimension(self.tp_style, len(self.shape))
        if tp_size == 1 or dimension is None:
            return self.numel
        return self.numel // self.shape[dimension] * -(-self.shape[dimension] // tp_size)


    def local_gradient_numel(self, tp_size: int) -> int:
        """Elements of this parameter's gradient on the largest TP rank.

        As the parameter's share, except for a rowwise-split embedding: torch 2.13's backward of
        it yields a replicated gradient, whole on every rank (measured: a Replicate DTensor).
        """
        return self.numel if self.tp_style == "embedding_rowwise" and tp_size > 1 else self.local_numel(tp_size)

    def fsdp2_numel(self, tp_size: int, dp_size: int) -> int:
        """Elements of this parameter one rank holds under FSDP2 over ``dp_size`` ranks, after TP over ``tp_size``.

        FSDP2 splits the first dimension of each (TP-local) parameter over the data-parallel ranks,
        padded to a whole row per rank (torch's ``_chunk_with_empty``).
        """
        local = self.local_numel(tp_size)
        if not self.shape or dp_size == 1:
            return local
        split_rows = tp_size > 1 and _split_dimension(self.tp_style, len(self.shape)) == 0
        rows = -(-self.shape[0] // tp_size) if split_rows else self.shape[0]
        return -(-rows // dp_size) * (local // rows) if rows else 0


def _split_dimension(style: str | None, ndim: int) -> int | None:
    # torch's styles: colwise splits a Linear's weight (out, in) on dim 0 and its bias; rowwise splits
    # the weight on dim 1 (its bias stays whole); a rowwise embedding (vocab, hidden) splits dim 0.
    if style is None or style in _WHOLE_STYLES:
        return None
    if style.startswith("colwise") or style == "embedding_rowwise":
        return 0
    return 1 if ndim == 2 else None


@dataclass
class ModelFacts:
    """A model as the planner sees it.

    Attributes:
        name: the model's class name.
        config: its transformers config (what activations are traced from).
        model_class: the transformers class to rebuild it from the config.
        parameters: every parameter once (tied weights once).
        module: the module the parameters are read from (on the meta device for a config).
        styles: ``{module name: style}`` of the TP plan these facts were split by (empty: not split).
        adapters: ``(adapter name, peft config)`` of each adapter of the peft model around the
            transformers model (empty without peft): the activations are traced with the same adapters.
        frozen: names of the parameters that do not train, relative to the peft model around the
            transformers model, or to the transformers model without one (what the trace freezes).
        model_name: the transformers model's name in ``module`` ("" when ``module`` is that model).
    """

    name: str
    config: PretrainedConfig
    model_class: type[PreTrainedModel]
    parameters: tuple[ParameterFacts, ...]
    module: nn.Module
    styles: dict[str, str] = field(default_factory=dict, repr=False)
    adapters: tuple[tuple[str, Any], ...] = field(default=(), repr=False)
    frozen: frozenset[str] = field(default=frozenset(), repr=False)
    model_name: str = ""
    _split: dict[tuple[Any, ...], "ModelFacts"] = field(default_factory=dict, repr=False, compare=False)
    _units: dict[str | None, "ShardingUnits"] = field(default_factory=dict, repr=False, compare=False)

    @functools.cached_property
    def config_text(self) -> str:
        """The config as JSON: what identifies the architecture, for caching traces."""
        return self.config.to_json_string()

    @functools.cached_property
    def trace_text(self) -> str:
        """What identifies the activations a forward pass saves: the config, the adapters and the frozen parameters."""
        adapters = [(name, config.to_dict()) for name, config in self.adapters]
        return "\n".join([self.config_text, json.dumps(adapters, default=str, sort_keys=True), *sorted(self.frozen)])

    @property
    def numel(self) -> int:
        """Elements in all parameters."""
        return sum(p.numel for p in self.parameters)

    @property
    def trainable_numel(self) -> int:
        """Elements in the parameters that train."""
        return sum(p.numel for p in self.parameters if p.trainable)

    def in_model(self, name: str) -> str | None:
        """The module ``name`` (in ``module``) relative to the transformers model, or None when it lies outside it."""
        if not self.model_name:
            return name
        prefix = f"{self.model_name}."
        return name[len(prefix):] if name.startswith(prefix) else None

    @functools.cached_property
    def holders(self) -> dict[str, tuple[str, ...]]:
        """The names of the modules that hold each parameter, by the parameter's name (a tied weight has two)."""
        names = {id(parameter): name for name, parameter in self.module.named_parameters()}
        held: dict[str, list[str]] = {}
        for module_name, module in self.module.named_modules():
            for parameter in module._parameters.values():
                if parameter is not None:
                    held.setdefault(names[id(parameter)], []).append(module_name)
        return {name: tuple(modules) for name, modules in held.items()}

    @property
    def description(self) -> str:
        """The model's class name, with its adapters when it has any (for messages: "LlamaForCausalLM with LoRA r=8")."""
        if not self.adapters:
            return self.name
        kinds = ", ".join(_adapter_text(config) for _, config in self.adapters)
        return f"{self.name} with {kinds}"

    @property
    def hidden_size(self) -> int:
        """The width of the residual stream."""
        return int(self.text_config.hidden_size)

    @property
    def num_layers(self) -> int:
        """Transformer blocks."""
        return int(self.text_config.num_hidden_layers)

    @property
    def text_config(self) -> PretrainedConfig:
        """The config that holds the text model's sizes."""
        return self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model takes (``max_position_embeddings``), or None when unbounded."""
        limit = getattr(self.text_config, "max_position_embeddings", None)
        return limit if isinstance(limit, int) and limit > 0 else None

    def tp_styles(self, tp_size: int, tp_plan: tuple[tuple[str, str], ...] | None = None) -> dict[str, str]:
        """``{module name: style}`` under ``tp_size`` and a layout's own ``tp_plan`` (None: the model's), names
        relative to the model.

        Raises:
            PlanError: the model has no TP plan, or ``tp_size`` does not divide its heads or MLP width.
        """
        plans = plan_models(self.module, tp_size, dict(tp_plan) if tp_plan is not None else None)
        return {_joined(outer, name): style for outer, plan in plans.items() for name, style in plan.items()}

    def sharding_units(self, requested: str | None = None) -> "ShardingUnits":
        """The parameters FSDP2 shards unit by unit (``meshplan.fsdp.sharding_units``), by name.

        ``requested`` is the ``fsdp_layer_classes`` option. Raises PlanError when it names a class
        the model lacks, or when there is no Hugging Face model to shard.
        """
        if requested not in self._units:
            self._units[requested] = _sharding_units(self.module, requested)
        return self._units[requested]

    def with_tp_styles(self, tp_size: int, tp_plan: tuple[tuple[str, str], ...] | None = None) -> "ModelFacts":
        """These facts with each parameter's TP style under ``tp_size`` (worked out once per size and plan)."""
        key = (tp_size, tp_plan)
        if key not in self._split:
            self._split[key] = self._with_styles(tp_size, tp_plan)
        return self._split[key]

    def _with_styles(self, tp_size: int, tp_plan: tuple[tuple[str, str], ...] | None) -> "ModelFacts":
        styles = self.tp_styles(tp_size, tp_plan)
        parameters = tuple(
            replace(p, tp_style=styles.get(p.name.rpartition(".")[0])) for p in self.parameters
        )
        # The same module, so the same sharding units.
        return ModelFacts(self.name, self.config, self.model_class, parameters, self.module, styles, self.adapters, self.frozen,
                          self.model_name, _units=self._units)


@dataclass(frozen=True)
class ShardingUnits:
    """Parameter names by FSDP2 unit: each transformer block, each model's root unit (embeddings,
    final norm, head: what its blocks leave), and the parameters outside every model (kept whole)."""

    blocks: tuple[tuple[str, ...], ...]
    roots: tuple[tuple[str, ...], ...]
    whole: tuple[str, ...]


def _sharding_units(root: nn.Module, requested: str | None) -> ShardingUnits:
    from meshplan.fsdp import fsdp2_models, sharding_units  # imports torch's FSDP2, which estimates of other layouts need not

    names = {id(parameter): name for name, parameter in root.named_parameters()}
    blocks, roots, inside = [], [], set()
    for _, model in fsdp2_models(root):
        in_blocks: set[str] = set()
        for unit in sharding_units(model, requested):
            unit_names = tuple(names[id(parameter)] for parameter in unit.parameters())
            blocks.append(unit_names)
            in_blocks.update(unit_names)
        model_names = [names[id(parameter)] for parameter in model.parameters()]
        roots.append(tuple(name for name in model_names if name not in in_blocks))
        inside.update(model_names)
    return ShardingUnits(tuple(blocks), tuple(roots), tuple(name for name in names.values() if name not in inside))


def _joined(outer: str, name: str) -> str:
    return f"{outer}.{name}" if outer and name else outer or name


def model_facts(model: Any) -> ModelFacts:
    """Reads ``model``: a ``PretrainedConfig``, a model directory or ``config.json`` path, or an ``nn.Module``.

    Raises:
        PlanError: the path holds no transformers config, or the module holds no transformers model.
    """
    if isinstance(model, nn.Module):
        return _facts_of_module(model)
    if isinstance(model, (str, os.PathLike)):
        model = load_config(model)
    if not isinstance(model, PretrainedConfig):
        raise PlanError(
            f"model={type(model).__name__} is not something the planner can size; pass a transformers "
            f"PretrainedConfig, a model directory or config.json path, or an nn.Module."
        )
    model_class = model_class_for(model)
    try:
        with torch.device("meta"):
            module = model_class(copy.deepcopy(model))
    except (ValueError, TypeError, AttributeError) as error:
        raise PlanError(f"{model_class.__name__} cannot be built from this config: {error}") from error
    return _facts(module, module)


def with_lora(facts: ModelFacts, *, r: int = 8, targets: str = "q,v") -> ModelFacts:
    """The facts of ``facts``' model with LoRA adapters of rank ``r`` on ``targets`` (``meshplan.peft.lora_model``),
    the rest frozen; as ``meshplan plan --lora`` sizes it. ``facts``' module is wrapped in place (a config's
    model is built for the facts alone, so this costs nothing).

    Raises:
        PlanError: a target the model lacks, or a rank below 1.
    """
    from meshplan.peft import lora_model

    if peft_compat.peft_models(facts.module):
        raise PlanError(f"{facts.description} has adapters already; size it as it is, without adding LoRA.")
    return model_facts(lora_model(facts.module, r=r, targets=targets, task_type=peft_task_type(facts.model_class)))


def peft_task_type(model_class: type[PreTrainedModel]) -> str | None:
    """peft's task type for a transformers class: a causal LM's adapters alone train (CAUSAL_LM), a classifier's
    head trains whole too (SEQ_CLS, TOKEN_CLS); None (a plain PeftModel) for the others."""
    name = model_class.__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    return None


def load_config(path: str | os.PathLike) -> PretrainedConfig:
    """The transformers config in a model directory or at a ``config.json`` path."""
    path = Path(path)
    source = path if path.is_file() and path.suffix == ".json" else path / "config.json"
    if not source.is_file():
        raise PlanError(
            f"{str(path)!r} holds no transformers config: pass a model directory with a config.json, or the "
            f"path of a config file."
        )
    try:
        return AutoConfig.from_pretrained(source)
    except (ValueError, OSError, KeyError, TypeError) as error:
        raise PlanError(f"the transformers config {str(source)!r} cannot be read: {error}") from error


def model_class_for(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The class a config names (its first ``architectures`` entry), else its masked LM (encoders),
    else its causal LM (decoders), else its base model."""
    for name in config.architectures or ():
        found = getattr(transformers, name, None)
        if isinstance(found, type) and issubclass(found, PreTrainedModel):
            return found
    for auto in (transformers.AutoModelForMaskedLM, transformers.AutoModelForCausalLM, transformers.AutoModel):
        try:
            with torch.device("meta"):
                return type(auto.from_config(copy.deepcopy(config)))
        except ValueError:  # the Auto class has no model for this config type
            continue
    raise PlanError(f"transformers has no model class for model_type={config.model_type!r}.")


def _facts_of_module(root: nn.Module) -> ModelFacts:
    found = find_pretrained_models(root)
    if not found:
        raise PlanError(
            f"{type(root).__name__} holds no transformers.PreTrainedModel; the planner sizes Hugging Face models "
            f"(pass the model, its config or its directory)."
        )
    if len(found) > 1:
        names = ", ".join(name or type(model).__name__ for name, model in found)
        raise PlanError(f"{type(root).__name__} holds several transformers models ({names}); pass the one to plan for.")
    return _facts(found[0][1], root)


def _facts(model: PreTrainedModel, root: nn.Module) -> ModelFacts:
    # named_parameters() yields a tied weight once, under its first name, as the optimizer sees it.
    parameters = tuple(
        ParameterFacts(name, tuple(parameter.shape), parameter.requires_grad) for name, parameter in root.named_parameters()
    )
    # What the activation trace rebuilds: the peft model around the transformers model, or the model itself.
    wrapped = [peft_model for _, peft_model in peft_compat.peft_models(root) if _holds(peft_model, model)]
    traced = wrapped[0] if wrapped else model
    adapters = tuple(wrapped[0].peft_config.items()) if wrapped else ()
    frozen = frozenset(name for name, parameter in traced.named_parameters() if not parameter.requires_grad)
    model_name = next(name for name, module in root.named_modules() if module is model)
    return ModelFacts(type(model).__name__, model.config, type(model), parameters, root, adapters=adapters, frozen=frozen,
                      model_name=model_name)


def _holds(outer: nn.Module, inner: nn.Module) -> bool:
    return any(module is inner for module in outer.modules())


def _adapter_text(config: Any) -> str:
    """A peft config in a few words: "LoRA r=8 on q_proj, v_proj", or its peft type."""
    kind = str(getattr(config, "peft_type", type(config).__name__)).rpartition(".")[2]
    if kind != "LORA":
        return kind
    targets = config.target_modules
    named = ", ".join(sorted(targets)) if isinstance(targets, (set, frozenset, list, tuple)) else str(targets)
    return f"LoRA r={config.r} on {named}"
