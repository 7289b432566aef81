"""Tier 1: which TP plan a model gets, and which tp sizes it can take."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from meshplan import PlanError
from meshplan.models import minilm_path
from meshplan.tp.apply import match_plan
from meshplan.tp.plans import check_tp_size, find_pretrained_models, resolve_tp_plan
from parity import tiny_llama_config


def test_llama_uses_its_own_plan() -> None:
    plan = resolve_tp_plan(LlamaForCausalLM(tiny_llama_config()))
    assert plan["model.layers.*.self_attn.q_proj"] == "colwise"
    assert plan["model.layers.*.self_attn.o_proj"] == "rowwise"
    assert plan["model.layers.*.mlp.down_proj"] == "rowwise"
    assert plan["lm_head"] == "colwise_gather_output"


def test_tied_embeddings_stay_whole() -> None:
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True))
    plan = resolve_tp_plan(model)
    assert "lm_head" not in plan and "model.embed_tokens" not in plan
    assert plan["model.layers.*.self_attn.q_proj"] == "colwise"
    with pytest.raises(PlanError, match=r"would shard model.embed_tokens and lm_head of LlamaForCausalLM"):
        resolve_tp_plan(model, {"lm_head": "colwise_rep"})


def test_pretrained_minilm_gets_an_inferred_bert_family_plan() -> None:
    model = BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    assert model.config.base_model_tp_plan is None  # shipped without one
    plan = resolve_tp_plan(model)
    assert plan == {
        "bert.encoder.layer.*.attention.self.query": "colwise",
        "bert.encoder.layer.*.attention.self.key": "colwise",
        "bert.encoder.layer.*.attention.self.value": "colwise",
        "bert.encoder.layer.*.attention.output.dense": "rowwise",
        "bert.encoder.layer.*.intermediate.dense": "colwise",
        "bert.encoder.layer.*.output.dense": "rowwise",
    }
    assert len(match_plan(model, plan)) == 6 * model.config.num_hidden_layers


def test_user_plan_patterns_are_relative_to_the_base_model() -> None:
    model = LlamaForCausalLM(tiny_llama_config())
    plan = resolve_tp_plan(model, {"layers.*.self_attn.q_proj": "colwise", "lm_head": "colwise_rep"})
    assert plan == {"model.layers.*.self_attn.q_proj": "colwise", "lm_head": "colwise_rep"}


def test_a_model_without_a_plan_gets_an_error_that_shows_how_to_pass_one() -> None:
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64))
    with pytest.raises(PlanError) as error:
        resolve_tp_plan(model)
    assert "GPT2LMHeadModel" in str(error.value)
    assert "TensorParallel(tp_size=2, tp_plan={" in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"num_attention_heads": 3, "num_key_value_heads": 3, "hidden_size": 30}, "num_attention_heads=3"),
        ({"num_key_value_heads": 1}, "num_key_value_heads=1"),
        ({"intermediate_size": 63}, "intermediate_size=63"),
    ],
)
def test_tp_size_must_divide_heads_and_mlp_width(overrides: dict, field: str) -> None:
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    with pytest.raises(PlanError) as error:
        check_tp_size(model, 2)
    assert f"tp_size=2 does not divide {field}" in str(error.value)
    assert "LlamaForCausalLM" in str(error.value)


def test_bert_tp_size_checks_its_heads() -> None:
    model = BertForSequenceClassification(BertConfig(hidden_size=36, num_attention_heads=6, intermediate_size=72, num_hidden_layers=1))
    check_tp_size(model, 2)
    check_tp_size(model, 3)
    with pytest.raises(PlanError, match="num_attention_heads=6"):
        check_tp_size(model, 4)


def test_plan_patterns_must_match_and_styles_must_exist() -> None:
    model = LlamaForCausalLM(tiny_llama_config())
    with pytest.raises(PlanError, match=r"'model.layers.\*.attn.q' matches no submodule of LlamaForCausalLM"):
        match_plan(model, {"model.layers.*.attn.q": "colwise"})
    with pytest.raises(PlanError, match=r"'packed_colwise'"):
        match_plan(model, {"model.layers.*.self_attn.q_proj": "packed_colwise"})


def test_star_matches_exactly_one_name_component() -> None:
    model = LlamaForCausalLM(tiny_llama_config())
    matched = match_plan(model, {"model.layers.*.mlp.up_proj": "colwise"})
    assert sorted(matched) == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]


def test_finds_the_outermost_pretrained_models() -> None:
    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.generator = LlamaForCausalLM(tiny_llama_config())
            self.critic = LlamaForCausalLM(tiny_llama_config())
            self.head = torch.nn.Linear(2, 2)

    names = [name for name, _ in find_pretrained_models(Wrapper())]
    assert names == ["generator", "critic"]
