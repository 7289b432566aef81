"""Tier 1: peft LoRA models under meshplan: the TP plan of their layers, what is refused, what a checkpoint stores.

The training itself, under every layout and front end, is checked against one process in the parity,
conformance and checkpoint spawns (tests/helpers/parity.py builds "llama-lora" and "minilm-lora").
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoHaConfig, LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from helpers.parity import LLAMA_LORA_TARGETS, build_model, tiny_llama_config
from meshplan import CheckpointError, PlanError
from meshplan.checkpoint.sharded import CheckpointReader, save_training_state
from meshplan.peft import checkpointed, frozen_fingerprint, is_peft_model, lora_model, lora_targets
from meshplan.tp.apply import match_plan
from meshplan.tp.shard import plan_models


def _llama_with(config: LoraConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    return get_peft_model(LlamaForCausalLM(tiny_llama_config()), config)


def test_a_lora_layer_is_split_like_the_layer_it_adapts() -> None:
    model = _llama_with(LoraConfig(r=4, target_modules=[*LLAMA_LORA_TARGETS, "lm_head", "embed_tokens"]))
    plans = plan_models(model, 2)
    assert list(plans) == ["base_model.model"]  # the transformers model inside the PeftModel
    plan = plans["base_model.model"]
    layer = "model.layers.1"
    # Column-wise base: the adapter's input projection whole, its output split like the base's.
    assert {name: plan[f"{layer}.self_attn.q_proj.{name}"] for name in ("base_layer", "lora_A.default", "lora_B.default")} == \
        {"base_layer": "colwise", "lora_A.default": "replicate", "lora_B.default": "colwise"}
    # Row-wise base: the adapter's input projection split like the base's, its output whole.
    assert {name: plan[f"{layer}.mlp.down_proj.{name}"] for name in ("base_layer", "lora_A.default", "lora_B.default")} == \
        {"base_layer": "rowwise", "lora_A.default": "rowwise", "lora_B.default": "replicate"}
    assert (plan["lm_head.base_layer"], plan["lm_head.lora_A.default"], plan["lm_head.lora_B.default"]) == \
        ("colwise_gather_output", "replicate", "colwise_gather_output")
    # A LoRA embedding: the base embedding split by vocabulary, the adapter's (small) embedding whole.
    assert plan["model.embed_tokens.base_layer"] == "embedding_rowwise"
    assert not any(name.startswith("model.embed_tokens.lora") for name in plan)
    # No plan entry is left on a peft layer itself: torch's styles would refuse it.
    assert not any(name.endswith(("_proj", "lm_head", "embed_tokens")) for name in plan)


def test_layers_without_an_adapter_keep_the_models_plan() -> None:
    plan = plan_models(_llama_with(LoraConfig(r=4, target_modules=["q_proj"])), 2)["base_model.model"]
    assert plan["model.layers.0.self_attn.k_proj"] == "colwise" and plan["model.layers.0.mlp.down_proj"] == "rowwise"
    assert plan["model.layers.0.self_attn.q_proj.base_layer"] == "colwise"


def test_minilm_lora_keeps_its_classifier_whole() -> None:
    plan = plan_models(build_model("minilm-lora"), 2)["base_model.model"]
    assert plan["bert.encoder.layer.0.attention.self.query.lora_B.default"] == "colwise"
    assert plan["bert.encoder.layer.0.attention.output.dense.lora_A.default"] == "rowwise"
    assert not any(name.startswith("classifier") for name in plan)  # peft trains a whole copy of it


@pytest.mark.parametrize(("config", "message"), [
    (LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), "is a LoRA variant (DoRA"),
    (IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]), "meshplan shards only LoRA adapters"),
    (LoHaConfig(r=4, target_modules=["q_proj"]), "meshplan shards only LoRA adapters"),
])
def test_adapters_tensor_parallelism_cannot_split_are_refused_naming_the_module(config, message: str) -> None:
    with pytest.raises(PlanError, match=r"model\.layers\.0\.self_attn\.q_proj") as error:
        plan_models(_llama_with(config), 2)
    assert message in str(error.value)


def test_a_transposed_conv1d_adapter_is_refused() -> None:
    model = get_peft_model(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)),
                           LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    with pytest.raises(PlanError, match=r"h\.0\.attn\.c_attn.*fan_in_fan_out=True"):
        match_plan(model.base_model.model, {"transformer.h.*.attn.c_attn": "colwise"})


def test_a_plan_naming_a_module_peft_trains_whole_is_refused() -> None:
    model = build_model("minilm-lora")
    with pytest.raises(PlanError, match=r"classifier.*modules_to_save.*leave it out of tp_plan"):
        match_plan(model.base_model.model, {"classifier": "colwise"})


def test_lora_dropout_on_a_row_wise_layer_warns_that_ranks_drop_differently() -> None:
    model = _llama_with(LoraConfig(r=4, target_modules=["q_proj", "o_proj"], lora_dropout=0.1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan_models(model, 2)
    messages = [str(warning.message) for warning in caught if "lora_dropout" in str(warning.message)]
    assert len(messages) == 2 and all("o_proj" in message for message in messages)  # rowwise only, one per layer


@pytest.mark.parametrize(("build", "short", "expected"), [
    (lambda: LlamaForCausalLM(tiny_llama_config()), "q,v,down", ["q_proj", "v_proj", "down_proj"]),
    (lambda: build_model("minilm"), "q, v", ["query", "value"]),
])
def test_short_target_names_become_the_models_own(build, short: str, expected: list[str]) -> None:
    assert lora_targets(build(), short) == expected


def test_a_target_the_model_lacks_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match=r"LoRA target 'c_attn' matches no nn.Linear layer of LlamaForCausalLM"):
        lora_targets(LlamaForCausalLM(tiny_llama_config()), "q,c_attn")
    with pytest.raises(PlanError, match="rank of at least 1"):
        lora_model(LlamaForCausalLM(tiny_llama_config()), r=0)


def test_a_checkpoint_holds_only_what_trains(tmp_path: Path) -> None:
    model = build_model("llama-lora")
    assert is_peft_model(model) and not is_peft_model(build_model("llama"))
    trained = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert set(checkpointed(model)) == trained and len(trained) == 2 * len(LLAMA_LORA_TARGETS) * 2
    optimizer = torch.optim.AdamW(model.parameters())
    ids = torch.arange(16).reshape(2, 8)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    with CheckpointReader(save_training_state(tmp_path / "ckpt", {"model": model}, {"optimizer": optimizer}, {})) as reader:
        stored = {key.removeprefix("model/") for key in reader.keys() if key.startswith("model/")}
        adapters = reader.manifest["adapters"]["model"]
    assert stored == trained
    assert adapters["frozen"] == frozen_fingerprint(model)
    weights = adapters["peft_models"][0]["weights"]  # adapter-file key -> checkpoint key, peft's own names
    assert weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == \
        "model/base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert len(weights) == len(trained)


def test_the_frozen_fingerprint_tells_base_models_apart() -> None:
    assert frozen_fingerprint(build_model("llama-lora")) == frozen_fingerprint(build_model("llama-lora"))
    assert frozen_fingerprint(build_model("llama-lora")) != frozen_fingerprint(build_model("llama-tied-lora"))


def test_a_manifest_adapter_entry_that_points_outside_the_checkpoint_is_refused(tmp_path: Path) -> None:
    model = build_model("llama-lora")
    path = save_training_state(tmp_path / "ckpt", {"model": model}, {}, {})
    manifest_path = path / "meshplan-checkpoint.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["adapters"]["model"]["peft_models"][0]["weights"]["x"] = "model/not-stored"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"adapters\['model'\]\['peft_models'\]\[0\]\['weights'\]\['x'\] names 'model/not-stored'"):
        CheckpointReader(path)


def test_a_whole_trained_copy_leaves_the_models_own_plan() -> None:
    # modules_to_save=["lm_head"]: peft trains a whole copy of the head; the model's own plan would shard it.
    model = _llama_with(LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    plan = plan_models(model, 2)["base_model.model"]
    assert not any(name.startswith("lm_head") for name in plan)
    assert plan["model.layers.0.self_attn.q_proj.lora_B.default"] == "colwise"


def test_a_checkpoint_keeps_the_buffers_of_the_modules_that_train() -> None:
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)),
                           LoraConfig(r=2, target_modules=["0"], modules_to_save=["1"]))
    stored = set(checkpointed(model))
    assert "base_model.model.1.modules_to_save.default.running_mean" in stored  # the trained copy's statistics
    assert "base_model.model.1.original_module.running_mean" not in stored  # the frozen original's
    assert "base_model.model.0.base_layer.weight" not in stored


def test_an_adapter_that_did_not_train_is_left_out_of_the_manifest(tmp_path: Path) -> None:
    model = _llama_with(LoraConfig(r=4, target_modules=["q_proj"]))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"]))  # added, never active: frozen
    with CheckpointReader(save_training_state(tmp_path / "ckpt", {"model": model}, {}, {})) as reader:
        entries = reader.manifest["adapters"]["model"]["peft_models"]
    assert [entry["adapter"] for entry in entries] == ["default"]
    assert all(".default." in key for key in entries[0]["weights"].values())


@pytest.mark.slow  # two processes
def test_tp_ranks_drop_a_replicated_input_alike_whatever_their_seeds() -> None:
    # Otherwise lora_A, whole on each rank, would get another gradient on each and the copies drift apart.
    from helpers import lora_workers
    from meshplan.testing import spawn

    results = spawn(lora_workers.replicated_adapter_gradients_after_dropout, 2, timeout=300)
    assert results[0] == {"gradients_equal": True, "draws_equal": True}
