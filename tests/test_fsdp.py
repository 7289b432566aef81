"""Tier 1: what FSDP2 shards one by one (the sharding units), found without user code, and clipping's norm."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from helpers.fsdp_workers import clip_uneven_shards
from helpers.parity import tiny_llama_config
from meshplan import PlanError
from meshplan.fsdp import clip_grad_norm, fsdp2_models, layer_classes, sharding_units
from meshplan.plan import Plan
from meshplan.testing import spawn


def _class_names(units: list[nn.Module]) -> list[str]:
    return [type(unit).__name__ for unit in units]


def test_the_units_of_a_llama_are_its_decoder_layers() -> None:
    model = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=3))
    units = sharding_units(model)
    assert units == list(model.model.layers)


def test_the_units_of_gpt2_are_its_blocks() -> None:
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64))
    assert sharding_units(model) == list(model.transformer.h)


def test_a_unit_holding_a_tied_weight_stays_with_the_model() -> None:
    # BERT lists BertEmbeddings among the blocks it never splits, but its word embeddings are tied
    # to the masked-LM decoder outside it: FSDP2 cannot hold one parameter in two units.
    model = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                       vocab_size=64))
    assert "BertEmbeddings" in model._no_split_modules
    assert _class_names(sharding_units(model)) == ["BertLayer", "BertLayer"]


def test_a_model_without_no_split_modules_is_split_at_its_repeated_blocks() -> None:
    model = nn.Sequential(nn.Embedding(8, 4), nn.ModuleList([nn.Linear(4, 4) for _ in range(3)]), nn.Linear(4, 8))
    assert sharding_units(model) == list(model[1])


def test_fsdp_layer_classes_choose_the_units() -> None:
    model = LlamaForCausalLM(tiny_llama_config())
    units = sharding_units(model, "LlamaMLP, LlamaAttention")
    assert _class_names(units) == ["LlamaAttention", "LlamaMLP"] * 2
    assert layer_classes(model, "LlamaMLP,LlamaAttention") == {"LlamaMLP", "LlamaAttention"}


def test_fsdp_layer_classes_naming_a_missing_class_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match="'BertLayer'.*LlamaDecoderLayer") as error:
        sharding_units(LlamaForCausalLM(tiny_llama_config()), "BertLayer")
    assert "LlamaForCausalLM does not contain" in str(error.value)


def test_a_module_without_a_hugging_face_model_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match="no transformers.PreTrainedModel inside Sequential.*engine='deepspeed'"):
        fsdp2_models(nn.Sequential(nn.Linear(2, 2)))


def test_a_plan_names_its_units_through_its_option() -> None:
    plan = Plan.build("zero", zero_stage=3, engine="fsdp2", options={"fsdp_layer_classes": "LlamaMLP"})
    model = LlamaForCausalLM(tiny_llama_config())
    assert _class_names(sharding_units(model, plan.option("fsdp_layer_classes"))) == ["LlamaMLP", "LlamaMLP"]


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_clipping_plain_gradients_matches_torch(norm_type: float) -> None:
    torch.manual_seed(0)
    ours, theirs = nn.Linear(8, 8), nn.Linear(8, 8)
    theirs.load_state_dict(ours.state_dict())
    (ours(torch.randn(4, 8)).pow(2).sum() * 10).backward()
    for parameter, other in zip(ours.parameters(), theirs.parameters()):
        other.grad = parameter.grad.clone()
    norm = clip_grad_norm(ours.parameters(), 0.5, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.5, norm_type)
    assert norm.item() > 0.5  # the gradients were clipped, so a wrong scale would show
    assert torch.allclose(norm, expected)
    for parameter, other in zip(ours.parameters(), theirs.parameters()):
        assert torch.allclose(parameter.grad, other.grad, atol=1e-7)


@pytest.mark.slow
def test_clipping_counts_every_shard_once_when_some_ranks_hold_none() -> None:
    # 4 + 16 ones: a norm of sqrt(20) on every rank, although data-parallel rank 1 holds no row of
    # the small gradient (FSDP2 leaves trailing ranks empty); every rank scales to a norm of 1.
    results = spawn(clip_uneven_shards, 4, timeout=120)
    for norm, largest in results:
        assert norm == pytest.approx(math.sqrt(20))
        assert largest == pytest.approx(1 / math.sqrt(20), rel=1e-5)
