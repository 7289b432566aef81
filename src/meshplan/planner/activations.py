"""Activation memory, counted by running the model's forward pass on fake tensors.

Korthikanti et al. (2022) count by hand what a GPT layer saves for its backward pass,
sbh(34 + 5as/h) bytes; every architecture, attention kernel and precision policy changes those
coefficients (Llama's SwiGLU MLP and fp32 RMSNorm, SDPA's flash kernel that keeps no s x s
scores, autocast). The planner counts instead: it builds the model with one and with two layers
from the config as fake tensors (shapes and dtypes, no memory), runs a forward pass at the real
micro-batch and sequence length, and adds up the distinct storages that autograd saves. The
difference of the two runs is one layer; the rest is what lies outside the layers (embeddings,
logits, loss). Everything is exact for the implementation that will run, and costs no memory
even for a 70B model.

A model with adapters (peft) or frozen parameters is traced as it trains: the same adapters are
added to the one- and two-layer models, and the same parameters frozen. Autograd saves less then:
a frozen layer keeps its input only where an adapter beside it needs it, and no layer before the
first trainable one saves anything for a gradient that nothing needs.
"""

from __future__ import annotations

import copy
import functools
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from meshplan._compat.torch import CopiesOf, fake_tensor_mode, storage_key
from meshplan.errors import PlanError
from meshplan.planner.model import ROWWISE_STYLES, ModelFacts
from meshplan.tp.apply import match_plan
from meshplan.tp.plans import find_pretrained_models, resolve_tp_plan

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Saved:
    """Bytes autograd saves in one forward pass, split the way a TP rank holds them."""

    replicated: int = 0
    sharded: int = 0
    weight_copies: int = 0

    def on_rank(self, tp_size: int) -> int:
        """Bytes one of ``tp_size`` TP ranks saves: the split tensors' share and every whole one."""
        return self.replicated + -(-self.sharded // tp_size)

    def __sub__(self, other: "Saved") -> "Saved":
        return Saved(self.replicated - other.replicated, self.sharded - other.sharded, self.weight_copies - other.weight_copies)


@dataclass(frozen=True)
class ActivationTrace:
    """What one forward pass saves: per transformer layer, outside the layers, and each layer's input."""

    per_layer: Saved
    outside: Saved
    layer_input_bytes: int
    num_layers: int
    logits_bytes: int

    def activations(self, tp_size: int, gradient_checkpointing: bool) -> int:
        """Bytes saved at the end of the forward pass on one TP rank.

        With gradient checkpointing a layer keeps only its input; during backward one layer at a
        time is recomputed whole (Korthikanti et al.'s full recomputation, 2sbh per layer in fp16).
        """
        outside = self.outside.on_rank(tp_size)
        layer = self.per_layer.on_rank(tp_size)
        if gradient_checkpointing:
            return outside + self.num_layers * self.layer_input_bytes + layer
        return outside + self.num_layers * layer


def trace_activations(facts: ModelFacts, *, micro_batch_size: int, seq_len: int, dtype: torch.dtype,
                      autocast: torch.dtype | None, tp_plan: tuple[tuple[str, str], ...] | None = None) -> ActivationTrace:
    """Counts what ``facts``' model saves for backward at this micro-batch and sequence length.

    ``dtype`` is the parameters' dtype (bf16 when an engine casts the model, as DeepSpeed does);
    ``autocast`` the dtype of autocast around the forward pass (fp32 parameters under Lightning's
    and Accelerate's mixed precision), or None. ``tp_plan`` is a layout's own TP plan (None: the
    model's), which says which layers take a split input.

    Raises:
        PlanError: the model's forward pass cannot run on token ids alone (a vision or
            encoder-decoder model), so its activations cannot be counted.
    """
    try:
        return _cached_trace(TraceKey(facts), facts.model_class, micro_batch_size, seq_len, dtype, autocast, tp_plan)
    except PlanError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure of the trial forward pass is a model the planner cannot size
        raise PlanError(
            f"the planner cannot count the activations of {facts.name}: its forward pass on {micro_batch_size} x {seq_len} "
            f"token ids failed ({type(error).__name__}: {str(error)[:200]}). It sizes text models that take input_ids "
            f"(decoders and encoders)."
        ) from error


class TraceKey:
    """What a trace depends on, as a cache key: the config, the adapters and the frozen parameters
    (configs are not hashable, their JSON is)."""

    def __init__(self, facts: ModelFacts) -> None:
        self.config = facts.config
        self.adapters = facts.adapters
        self.frozen = facts.frozen
        self.text = facts.trace_text

    def __hash__(self) -> int:
        return hash(self.text)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TraceKey) and other.text == self.text


@functools.lru_cache(maxsize=64)
def _cached_trace(key: TraceKey, model_class: type[PreTrainedModel], micro_batch_size: int, seq_len: int,
                  dtype: torch.dtype, autocast: torch.dtype | None, tp_plan: tuple[tuple[str, str], ...] | None) -> ActivationTrace:
    traces = [_saved_by(with_layers(key.config, layers), key, model_class, micro_batch_size, seq_len, dtype, autocast, tp_plan)
              for layers in (1, 2)]
    one, two = traces
    per_layer = two[0] - one[0]
    config = key.config.get_text_config() if hasattr(key.config, "get_text_config") else key.config
    residual = dtype if autocast is None else torch.float32
    layer_input = micro_batch_size * seq_len * int(config.hidden_size) * _itemsize(residual)
    return ActivationTrace(per_layer, one[0] - per_layer, layer_input, int(config.num_hidden_layers), one[1])


def with_layers(config: PretrainedConfig, layers: int) -> PretrainedConfig:
    """A copy of ``config`` with ``layers`` transformer layers (what a trace builds)."""
    config = copy.deepcopy(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    text.num_hidden_layers = layers
    # Configs that describe each layer (sliding or full attention, ...) must list as many as there are.
    for field in ("layer_types", "block_types"):
        values = getattr(text, field, None)
        if isinstance(values, list) and values:
            setattr(text, field, values[:layers] if len(values) >= layers else values * layers)
    return config


def _saved_by(config: PretrainedConfig, key: TraceKey, model_class: type[PreTrainedModel], micro_batch_size: int, seq_len: int,
              dtype: torch.dtype, autocast: torch.dtype | None, tp_plan: tuple[tuple[str, str], ...] | None) -> tuple[Saved, int]:
    """(bytes saved, logits bytes) by one forward pass of a fake model built from ``config``, with ``key``'s adapters."""
    model = built_model(model_class, config, dtype, key)
    with fake_tensor_mode():
        make_fake(model, dtype)
        parameter_keys = {storage_key(p) for p in model.parameters()}
        split_inputs = _rowwise_inputs(model, tp_plan)
        saved: dict[int, tuple[int, bool]] = {}
        tokens = micro_batch_size * seq_len
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden, vocab = int(text.hidden_size), int(getattr(text, "vocab_size", 0) or 0)

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            key = storage_key(tensor)
            if key not in parameter_keys and key not in saved:
                saved[key] = (tensor.untyped_storage().nbytes(), _is_split(tensor, key, split_inputs, tokens, hidden, vocab))
            return tensor

        batch = batch_for(model_class, micro_batch_size, seq_len)
        context = torch.autocast("cpu", dtype=autocast) if autocast is not None else nullcontext()
        with _KeptCopiesOf(parameter_keys) as copies, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), context:
            output = model(**batch)
        logits = getattr(output, "logits", None)
        logits_bytes = logits.untyped_storage().nbytes() if isinstance(logits, torch.Tensor) else 0
    weight_copies = sum(size for key, (size, _) in saved.items() if key in copies.keys)
    activations = {key: value for key, value in saved.items() if key not in copies.keys}
    return Saved(
        replicated=sum(size for size, split in activations.values() if not split),
        sharded=sum(size for size, split in activations.values() if split),
        weight_copies=weight_copies,
    ), logits_bytes


class _KeptCopiesOf(CopiesOf):
    """CopiesOf that keeps the copies it saw until it is left: autocast keeps its copies of trainable
    weights in a cache, but makes a frozen weight's copy anew at each use and frees it when nothing
    saves it, so a tensor made later at its address would count as a weight copy."""

    def __init__(self, sources: set[int]) -> None:
        super().__init__(sources)
        self.kept: list[torch.Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        result = super().__torch_dispatch__(func, types, args, kwargs)
        if isinstance(result, torch.Tensor) and storage_key(result) in self.keys:
            self.kept.append(result)
        return result


def built_model(model_class: type[PreTrainedModel], config: PretrainedConfig, dtype: torch.dtype, key: TraceKey) -> nn.Module:
    """The model on the meta device, in the parameters' dtype, with ``key``'s adapters and frozen parameters, in train mode.

    Built on the meta device and made fake afterwards (``make_fake``): peft moves each new adapter
    to its base layer's device, which torch refuses for a fake parameter (it swaps a fake one in place).
    """
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = model_class(config)
            if key.adapters:
                model = _with_adapters(model, key.adapters)
    finally:
        torch.set_default_dtype(before)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name not in key.frozen)
    return model.train()


def _with_adapters(model: PreTrainedModel, adapters: tuple[tuple[str, object], ...]) -> nn.Module:
    """``model`` wrapped by peft in copies of ``adapters`` (peft's configs, by adapter name)."""
    from peft import get_peft_model

    (first, config), *others = adapters
    wrapped = get_peft_model(model, copy.deepcopy(config), adapter_name=first)
    for name, other in others:
        wrapped.add_adapter(name, copy.deepcopy(other))
    return wrapped


def make_fake(model: nn.Module, dtype: torch.dtype) -> None:
    """Replaces the meta parameters and buffers of ``model`` by fake CPU tensors of their shapes, inside a fake
    tensor mode: floating-point parameters in ``dtype`` (an engine that casts the model casts the adapters that
    peft keeps in fp32 too), buffers in their own dtype. A parameter shared by several modules stays shared."""
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, parameter in module._parameters.items():
            if parameter is not None:
                if id(parameter) not in made:
                    kind = dtype if parameter.is_floating_point() else parameter.dtype
                    made[id(parameter)] = nn.Parameter(torch.empty(parameter.shape, dtype=kind), requires_grad=parameter.requires_grad)
                module._parameters[name] = made[id(parameter)]
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype)


def _rowwise_inputs(model: nn.Module, tp_plan: tuple[tuple[str, str], ...] | None) -> dict[int, torch.Tensor]:
    """Registers hooks that collect the inputs of the layers TP splits by row, by storage key.

    A rowwise layer's input is split across the TP ranks (each multiplies its slice of the rows);
    outside those, a tensor as wide as the residual stream is whole on every rank. The inputs are
    kept: one that nothing saves (a frozen layer's) would otherwise be freed, and a tensor made
    later at the same address would count as split.
    """
    keys: dict[int, torch.Tensor] = {}
    inner = find_pretrained_models(model)[0][1]  # the transformers model inside peft's wrapper, or the model itself
    try:
        plan = match_plan(inner, resolve_tp_plan(inner, dict(tp_plan) if tp_plan is not None else None))
    except PlanError:  # a model without a TP plan saves nothing split; TP is refused for it elsewhere
        return keys
    modules = dict(inner.named_modules())
    for name, style in plan.items():
        if style in ROWWISE_STYLES and isinstance(modules.get(name), nn.Module):
            modules[name].register_forward_pre_hook(lambda module, args: keys.update(
                (storage_key(a), a) for a in args if isinstance(a, torch.Tensor)))
    return keys


def _is_split(tensor: torch.Tensor, key: int, split_inputs: dict[int, torch.Tensor], tokens: int, hidden: int, vocab: int) -> bool:
    """Whether TP splits this saved tensor across its ranks.

    Split: a rowwise layer's input, and what is not as wide as the residual stream (per-head
    attention tensors, the MLP's inner width). Whole: token ids, per-token statistics, tensors as
    wide as the residual stream, and anything as wide as the vocabulary (the logits are gathered).
    Small whole tensors counted as split (rotary tables, the pooled output) are noise next to these.
    """
    if key in split_inputs:
        return True
    if tensor.dtype in (torch.int64, torch.int32):
        return False
    return tensor.numel() not in (tokens, tokens * hidden) and (tensor.dim() == 0 or tensor.shape[-1] != vocab)


def batch_for(model_class: type[PreTrainedModel], micro_batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """The keyword arguments of a training forward pass of ``model_class``: token ids, and labels where its head takes them."""
    ids = torch.zeros(micro_batch_size, seq_len, dtype=torch.long)
    name = model_class.__name__
    if name.endswith(("ForSequenceClassification", "ForMultipleChoice")):
        return {"input_ids": ids, "labels": torch.zeros(micro_batch_size, dtype=torch.long)}
    if name.endswith(("ForCausalLM", "LMHeadModel", "ForMaskedLM", "ForTokenClassification", "ForConditionalGeneration")):
        return {"input_ids": ids, "labels": ids}
    return {"input_ids": ids}


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
