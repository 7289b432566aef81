"""Tier 1: which TP plan a model gets, and which tp sizes it can take."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, DistilBertConfig,
                          DistilBertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM, T5Config,
                          T5ForConditionalGeneration)

from meshplan import PlanError
from meshplan.models import minilm_path
from meshplan.tp.apply import match_plan
from meshplan.tp.plans import check_tp_size, find_pretrained_models, resolve_tp_plan
from meshplan.tp.shard import plan_models
from helpers.parity import tiny_llama_config

ROOT = Path(__file__).resolve().parents[1]


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


def _tiny_gpt2() -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64))


def test_gpt2_without_a_plan_is_told_that_no_plan_can_work() -> None:
    with pytest.raises(PlanError) as error:
        resolve_tp_plan(_tiny_gpt2())
    message = str(error.value)
    assert message.startswith("GPT2LMHeadModel has no tensor-parallel plan")
    assert "no TP plan can work for it: its blocks' layers are Conv1D (transformer.h.0.attn.c_attn" in message
    assert "shard only nn.Linear and nn.Embedding. Use DDP or ZeRO for this model." in message
    assert "tp_plan={" not in message  # no plan to copy that could not work


def test_gpt2_with_a_plan_of_its_own_is_refused_naming_conv1d() -> None:
    with pytest.raises(PlanError) as error:
        plan_models(_tiny_gpt2(), 2, {"h.*.attn.c_attn": "colwise", "h.*.attn.c_proj": "rowwise"})
    message = str(error.value)
    assert "'transformer.h.*.attn.c_attn' matches transformer.h.0.attn.c_attn, a Conv1D" in message
    assert "(transformers.pytorch_utils.Conv1D)" in message
    assert "shard only nn.Linear and nn.Embedding" in message
    assert message.endswith("blocks hold no nn.Linear layer, so no TP plan can work; use DDP or ZeRO for this model.")


def test_gpt2_on_the_meta_device_is_refused_the_same_way() -> None:
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(n_layer=2))
    with pytest.raises(PlanError, match=r"its blocks' layers are Conv1D .*Use DDP or ZeRO"):
        plan_models(model, 2)


def _tiny_t5() -> T5ForConditionalGeneration:
    return T5ForConditionalGeneration(T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, vocab_size=64))


def _tiny_distilbert() -> DistilBertForSequenceClassification:
    config = DistilBertConfig(dim=32, hidden_dim=64, n_layers=1, n_heads=4, vocab_size=64)
    return DistilBertForSequenceClassification(config)


@pytest.mark.parametrize(("build", "own_patterns"), [
    (_tiny_t5, ["encoder.block.*.layer.*.SelfAttention.q", "encoder.block.*.layer.*.DenseReluDense.wi"]),
    (_tiny_distilbert, ["transformer.layer.*.attention.q_lin", "transformer.layer.*.ffn.lin2"]),
], ids=["t5", "distilbert"])
def test_a_model_without_a_plan_is_shown_one_made_of_its_own_linear_layers(build: Callable[[], torch.nn.Module],
                                                                          own_patterns: list[str]) -> None:
    model = build()
    with pytest.raises(PlanError) as error:
        resolve_tp_plan(model)
    message = str(error.value)
    assert message.startswith(f"{type(model).__name__} has no tensor-parallel plan")
    for pattern in own_patterns:
        assert pattern in message
    assert "encoder.layer.*.attention.self.query" not in message  # BERT's, which these models lack
    # The example's patterns are the model's own: passed back as a plan, each matches its one-layer model once.
    example = re.search(r'tp_plan=\{"([^"]+)": "colwise", \.\.\., "([^"]+)": "rowwise"\}', message)
    assert example is not None, message
    planned = plan_models(model, 2, {example.group(1): "colwise", example.group(2): "rowwise"})
    assert sorted(planned[""].values()) == ["colwise", "rowwise"]


def test_a_plan_entry_on_a_module_that_is_not_a_linear_layer_is_refused() -> None:
    model = LlamaForCausalLM(tiny_llama_config())
    with pytest.raises(PlanError) as error:
        plan_models(model, 2, {"layers.*.mlp": "colwise"})
    message = str(error.value)
    assert "'model.layers.*.mlp' matches model.layers.0.mlp, a LlamaMLP" in message
    assert "point the pattern at the nn.Linear layers inside it: model.layers.*.mlp.gate_proj" in message
    with pytest.raises(PlanError, match=r"a LlamaRMSNorm .*leave it out of tp_plan"):
        plan_models(model, 2, {"layers.*.input_layernorm": "rowwise"})
    # "replicate" shards nothing, so any module may take it
    planned = plan_models(model, 2, {"layers.*.input_layernorm": "replicate"})
    assert planned[""]["model.layers.0.input_layernorm"] == "replicate"


def _tp_coverage_script(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("tp_coverage", ROOT / "scripts" / "tp_coverage.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # no scripts/__pycache__ in the checkout
    monkeypatch.setitem(sys.modules, spec.name, script)  # its dataclass looks its module up there
    spec.loader.exec_module(script)
    return script


def test_the_tp_plans_page_says_what_the_code_does_for_llama_bert_and_gpt2(monkeypatch: pytest.MonkeyPatch) -> None:
    script = _tp_coverage_script(monkeypatch)
    page = (ROOT / "docs" / "tp-plans.md").read_text().splitlines()
    expected = {"llama": script.OWN, "bert": script.INFERRED, "gpt2": script.REFUSED}
    for model_type, result in expected.items():
        row = script.classify(model_type)
        assert row.result == result, row
        assert script.table_row(row) in page, (
            f"docs/tp-plans.md disagrees with the code for {model_type}; regenerate it: {script.COMMAND}")
    assert "Conv1D" in script.classify("gpt2").reason


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
