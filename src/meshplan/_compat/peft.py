"""peft internals meshplan relies on, each behind one small function, with a canary each.

Read from peft 0.21.2. Tensor parallelism must shard the layers inside a LoRA-wrapped module
(its frozen ``base_layer`` and its ``lora_A`` / ``lora_B`` linear layers) consistently, and peft
offers no public description of that structure; this module is the one place that names it.
peft is imported lazily: a process that never builds a PEFT model never imports it.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

from torch import nn

from meshplan._compat import Internal, require_attributes, require_parameters

READ_FROM = "0.21.2"


def peft_loaded() -> bool:
    """Whether peft has been imported in this process (a model can only hold peft layers if it has)."""
    return "peft" in sys.modules


def is_tuner_layer(module: nn.Module) -> bool:
    """Whether ``module`` is one of peft's adapter layers (LoRA, IA3, LoHa, ...): a ``BaseTunerLayer``."""
    if not peft_loaded():
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def is_lora_linear(module: nn.Module) -> bool:
    """Whether ``module`` is peft's LoRA wrapper of an ``nn.Linear`` (``peft.tuners.lora.Linear``)."""
    if not peft_loaded():
        return False
    from peft.tuners.lora import Linear

    return type(module) is Linear


def is_lora_embedding(module: nn.Module) -> bool:
    """Whether ``module`` is peft's LoRA wrapper of an ``nn.Embedding`` (``peft.tuners.lora.Embedding``)."""
    if not peft_loaded():
        return False
    from peft.tuners.lora import Embedding

    return type(module) is Embedding


def is_modules_to_save(module: nn.Module) -> bool:
    """Whether ``module`` is peft's trainable copy of a whole module (``modules_to_save``, e.g. a classifier head)."""
    if not peft_loaded():
        return False
    from peft.utils.other import AuxiliaryTrainingWrapper

    return isinstance(module, AuxiliaryTrainingWrapper)


def lora_adapters(layer: nn.Module) -> list[str]:
    """The adapter names a LoRA layer holds (the keys of its ``lora_A`` ModuleDict, or of
    ``lora_embedding_A`` for an embedding)."""
    if is_lora_embedding(layer):
        return list(layer.lora_embedding_A.keys())
    return list(layer.lora_A.keys())


def lora_variants(layer: nn.Module) -> list[str]:
    """The adapters of a LoRA layer that run a variant's own forward (DoRA and the like) instead of plain
    ``B(A(x)) * scaling``: the keys of ``lora_variant``."""
    return list(getattr(layer, "lora_variant", {}).keys())


def fan_in_fan_out(layer: nn.Module) -> bool:
    """Whether a LoRA layer's base weight is stored transposed (GPT-2's Conv1D)."""
    return bool(getattr(layer, "fan_in_fan_out", False))


def adapter_state_dict(peft_model: nn.Module, state_dict: dict[str, Any], adapter_name: str) -> dict[str, Any]:
    """peft's own selection and renaming of ``state_dict`` (keyed like ``peft_model.state_dict()``) into
    the keys of an adapter file (``adapter_model.safetensors``); the values are passed through."""
    from peft.utils.save_and_load import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model, state_dict=state_dict, adapter_name=adapter_name, save_embedding_layers=False)


def peft_models(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every ``PeftModel`` inside ``module`` (itself included), with its name, outermost first."""
    if not peft_loaded():
        return []
    from peft import PeftModel

    found: list[tuple[str, nn.Module]] = []
    for name, inner in module.named_modules():
        if isinstance(inner, PeftModel) and not any(name.startswith(f"{outer}.") or outer == "" for outer, _ in found):
            found.append((name, inner))
    return found


def _check_lora_linear_structure() -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(nn.Sequential(nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]))
    layer = model.base_model.model[0]
    assert is_lora_linear(layer), f"the wrapped nn.Linear is a {type(layer).__name__}"
    require_attributes(layer, "base_layer", "lora_A", "lora_B", "lora_dropout", "scaling", "lora_variant", "fan_in_fan_out")
    assert isinstance(layer.base_layer, nn.Linear) and isinstance(layer.lora_A["default"], nn.Linear)
    assert isinstance(layer.lora_B["default"], nn.Linear) and lora_adapters(layer) == ["default"]
    # The forward TP relies on: base_layer(x) + lora_B(lora_A(dropout(x))) * scaling.
    source = inspect.getsource(type(layer).forward)
    assert "result = result + lora_B(lora_A(dropout(x))) * scaling" in source, "lora.Linear.forward changed"
    x = torch.randn(3, 4)
    expected = layer.base_layer(x) + layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
    assert torch.allclose(layer(x), expected)


def _check_lora_embedding_structure() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(nn.Sequential(nn.Embedding(8, 4)), LoraConfig(r=2, target_modules=["0"]))
    layer = model.base_model.model[0]
    assert is_lora_embedding(layer), f"the wrapped nn.Embedding is a {type(layer).__name__}"
    require_attributes(layer, "base_layer", "lora_embedding_A", "lora_embedding_B")
    assert isinstance(layer.base_layer, nn.Embedding) and lora_adapters(layer) == ["default"]
    assert "result = self.base_layer(x, *args, **kwargs)" in inspect.getsource(type(layer).forward)


def _check_dora_is_a_variant() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(nn.Sequential(nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"], use_dora=True))
    assert lora_variants(model.base_model.model[0]) == ["default"], "DoRA no longer registers a lora_variant"


def _check_modules_to_save_wrapper() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)),
                           LoraConfig(r=2, target_modules=["0"], modules_to_save=["1"]))
    assert is_modules_to_save(model.base_model.model[1]), f"modules_to_save wraps in {type(model.base_model.model[1])}"


def _check_adapter_state_dict() -> None:
    from peft import LoraConfig, get_peft_model
    from peft.utils.save_and_load import get_peft_model_state_dict

    require_parameters(get_peft_model_state_dict, "state_dict", "adapter_name", "save_embedding_layers")
    model = get_peft_model(nn.Sequential(nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]))
    markers = {name: index for index, name in enumerate(model.state_dict())}
    selected = adapter_state_dict(model, markers, "default")
    assert selected == {"base_model.model.0.lora_A.weight": markers["base_model.model.0.lora_A.default.weight"],
                        "base_model.model.0.lora_B.weight": markers["base_model.model.0.lora_B.default.weight"]}, selected


INTERNALS: list[Internal] = [
    Internal("peft", "tuners.lora.Linear (base_layer, lora_A, lora_B, scaling, forward)",
             "tensor parallelism shards a LoRA layer's base_layer, lora_A and lora_B consistently (meshplan.peft)",
             READ_FROM, _check_lora_linear_structure),
    Internal("peft", "tuners.lora.Embedding (base_layer, lora_embedding_A/B)",
             "tensor parallelism shards a LoRA embedding's base_layer and keeps its adapter whole",
             READ_FROM, _check_lora_embedding_structure),
    Internal("peft", "LoraLayer.lora_variant (DoRA)",
             "DoRA needs the whole base weight's norm, so tensor parallelism refuses it", READ_FROM, _check_dora_is_a_variant),
    Internal("peft", "utils.other.AuxiliaryTrainingWrapper (modules_to_save)",
             "a trainable copy of a whole module stays whole under tensor parallelism", READ_FROM, _check_modules_to_save_wrapper),
    Internal("peft", "get_peft_model_state_dict(state_dict=...)",
             "the key of each trained tensor in an adapter file, written into a checkpoint's manifest for export",
             READ_FROM, _check_adapter_state_dict),
]
