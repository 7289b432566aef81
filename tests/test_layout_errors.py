"""Tier 2: layouts the world or the model cannot take fail on every rank before any collective.

If any rank went on to build a process group the other ranks would hang there instead; one
spawn of 2 workers checks every case, each in a Trainer, as a user would meet it.
"""

from __future__ import annotations

import meshplan
from layouts import accelerator_plan_error, plan_errors
from meshplan.recipes import CATALOGUE_DIR
from meshplan.testing import spawn

CASES = [
    (meshplan.TensorParallel(tp_size=3), "llama", {}),
    (meshplan.TensorParallel(tp_size=2), "llama", {"num_attention_heads": 3, "num_key_value_heads": 3, "hidden_size": 30}),
    (meshplan.TensorParallel(tp_size=2), "llama", {"num_key_value_heads": 1}),
    (meshplan.TensorParallel(tp_size=2), "llama", {"intermediate_size": 63}),
    (meshplan.TensorParallel(tp_size=2), "gpt2", {}),
    (meshplan.TensorParallel(tp_size=2), "plain", {}),
    (meshplan.TensorParallel(tp_size=2, tp_plan={"layers.*.attn.q": "colwise"}), "llama", {}),
    ("meshplan_tp", "llama", {"num_key_value_heads": 1}),
]

EXPECTED = [
    "tp_size=3 does not divide the world size 2",
    "tp_size=2 does not divide num_attention_heads=3 of LlamaForCausalLM",
    "tp_size=2 does not divide num_key_value_heads=1 of LlamaForCausalLM",
    "tp_size=2 does not divide intermediate_size=63 of LlamaForCausalLM",
    "GPT2LMHeadModel has no tensor-parallel plan",
    "TensorParallel found no transformers.PreTrainedModel inside TinyModule",
    "tp_plan pattern 'layers.*.attn.q' matches no submodule of LlamaForCausalLM",
    "tp_size=2 does not divide num_key_value_heads=1 of LlamaForCausalLM",
]


def test_bad_layouts_raise_plan_errors_on_every_rank_before_any_collective() -> None:
    per_rank = spawn(plan_errors, 2, CASES, timeout=180)
    for messages in per_rank:
        assert len(messages) == len(EXPECTED)
        for message, expected in zip(messages, EXPECTED):
            assert expected in message


def test_accelerate_refuses_a_tp_size_the_model_cannot_take_before_sharding() -> None:
    recipe_strategy = meshplan.from_recipe(CATALOGUE_DIR / "tp.yaml")
    for message in spawn(accelerator_plan_error, 2, recipe_strategy, {"num_key_value_heads": 1}, timeout=180):
        assert "tp_size=2 does not divide num_key_value_heads=1 of LlamaForCausalLM" in message
