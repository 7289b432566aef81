"""Which layers a gradient reaches, in a model whose parameters are partly frozen (a LoRA model).

In full fine-tuning every layer's output needs a gradient, for its own weights. With the base
frozen, a layer needs one only downstream of something that trains: in a Llama with LoRA on q and
v, the embedding and the first layer's k_proj compute nothing in the backward pass, and the first
layer's q, k and v projections get no input gradient. Engines follow autograd: a column-wise TP
layer all-reduces its input's gradient only when there is one, and ZeRO-3 gathers a layer's
parameters for the backward pass only when a gradient reaches the layer (its hook sits on the
layer's output). The planner learns which layers those are as it counts activations: from one
forward pass of a two-layer copy of the model on fake tensors, with the same adapters and the same
parameters frozen (meshplan.planner.activations).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from meshplan._compat.torch import fake_tensor_mode
from meshplan.errors import PlanError
from meshplan.planner.activations import TraceKey, batch_for, built_model, make_fake, with_layers
from meshplan.planner.model import ModelFacts
from meshplan.tp.plans import find_pretrained_models


@dataclass(frozen=True)
class GradientFlow:
    """The layers of a model that get no input gradient, and those that run no backward at all.

    Names are relative to the transformers model, with the number of a layer past the first
    written as the second's (``model.layers.1.``): every later layer sees what the second does.
    """

    without_input_gradient: frozenset[str] = frozenset()
    without_backward: frozenset[str] = frozenset()

    def input_needs_gradient(self, name: str) -> bool:
        """Whether the layer ``name`` (relative to the transformers model) computes its input's gradient."""
        return as_traced(name) not in self.without_input_gradient

    def runs_backward(self, name: str) -> bool:
        """Whether a gradient reaches the output of the layer ``name`` (relative to the transformers model)."""
        return as_traced(name) not in self.without_backward


def as_traced(name: str) -> str:
    """``name`` as the two-layer trace calls it: the first number in it (the layer's) at most 1."""
    parts = name.split(".")
    for index, part in enumerate(parts):
        if part.isdigit():
            parts[index] = "0" if part == "0" else "1"
            break
    return ".".join(parts)


def gradient_flow(facts: ModelFacts) -> GradientFlow:
    """Where gradients reach in ``facts``' model as it trains; in a model without frozen parameters, everywhere."""
    if not facts.frozen:
        return GradientFlow()
    try:
        return _traced_flow(TraceKey(facts), facts.model_class)
    except Exception as error:  # noqa: BLE001 - any failure of the trial forward pass is a model the planner cannot size
        raise PlanError(f"the planner cannot trace which layers of {facts.description} a gradient reaches: its forward pass "
                        f"failed ({type(error).__name__}: {str(error)[:200]}).") from error


@functools.lru_cache(maxsize=16)
def _traced_flow(key: TraceKey, model_class: type[PreTrainedModel]) -> GradientFlow:
    # The flow does not depend on the sizes or the precision: a short fp32 pass of two layers shows it.
    model = built_model(model_class, with_layers(key.config, 2), torch.float32, key)
    inner = find_pretrained_models(model)[0][1]
    without_input: set[str] = set()
    without_backward: set[str] = set()

    def record(name: str):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
                without_input.add(name)
            if not (isinstance(output, torch.Tensor) and output.requires_grad):
                without_backward.add(name)
        return hook

    with fake_tensor_mode():
        make_fake(model, torch.float32)
        for name, module in inner.named_modules():
            if any(parameter is not None for parameter in module._parameters.values()):  # the layers that hold weights
                module.register_forward_hook(record(name))
        model(**batch_for(model_class, 1, 8))
    return GradientFlow(frozenset(without_input), frozenset(without_backward))
