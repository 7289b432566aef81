"""Layouts the world, the device or the model cannot take fail before any collective.

Tier 1: meshplan.accelerator() refuses a device choice that would drop the layout, and warns
about torchrun restarts that share its rendezvous store. Tier 2: if any rank went on to build a
process group the other ranks would hang there instead; one spawn of 2 workers checks every
case, each in a Trainer, as a user would meet it.
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist

import meshplan
from meshplan._compat.accelerate import shared_state
from meshplan.launch import warn_if_restarts_share_the_rendezvous_store
from helpers.layouts import TinyModule, accelerator_plan_error, plan_errors
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
    # FSDP2 shards the Hugging Face models a module holds, block by block.
    (meshplan.ZeRO(stage=3, engine="fsdp2"), "plain", {}),
    (meshplan.ZeRO(stage=2, engine="fsdp2", fsdp_layer_classes="LlamaBlock"), "llama", {}),
    (meshplan.TensorParallel(tp_size=2, data_parallel="shard", fsdp_layer_classes="LlamaBlock"), "llama", {}),
    ("meshplan_tp_fsdp", "llama", {"num_key_value_heads": 1}),
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
    "FSDP2 found no transformers.PreTrainedModel inside TinyModule",
    "fsdp_layer_classes='LlamaBlock' names",
    "fsdp_layer_classes='LlamaBlock' names",
    "tp_size=2 does not divide num_key_value_heads=1 of LlamaForCausalLM",
]


@pytest.mark.slow
def test_bad_layouts_raise_plan_errors_on_every_rank_before_any_collective() -> None:
    per_rank = spawn(plan_errors, 2, CASES, timeout=180)
    for messages in per_rank:
        assert len(messages) == len(EXPECTED)
        for message, expected in zip(messages, EXPECTED):
            assert expected in message


@pytest.mark.slow
def test_accelerate_refuses_a_tp_size_the_model_cannot_take_before_sharding() -> None:
    recipe_strategy = meshplan.from_recipe(CATALOGUE_DIR / "tp.yaml")
    for message in spawn(accelerator_plan_error, 2, recipe_strategy, {"num_key_value_heads": 1}, timeout=180):
        assert "tp_size=2 does not divide num_key_value_heads=1 of LlamaForCausalLM" in message


@pytest.mark.parametrize(
    ("cuda", "cpu", "expected"),
    [
        (True, True, 'Accelerate switches DeepSpeed off when it is asked for the CPU'),
        (False, False, "cpu=False asks for CUDA devices, but torch sees none"),
    ],
)
def test_accelerator_refuses_a_device_that_would_drop_zero(cuda: bool, cpu: bool, expected: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    state_before = shared_state()
    with pytest.raises(meshplan.PlanError) as error:
        meshplan.accelerator(meshplan.ZeRO(stage=2), cpu=cpu)
    assert expected in str(error.value)
    if cpu:
        assert 'CUDA_VISIBLE_DEVICES=""' in str(error.value)
    assert shared_state() == state_before  # raised before any Accelerator was built


def test_accelerator_refuses_zero_when_the_launch_asked_for_the_cpu_with_gpus_present(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # `accelerate launch --cpu`, or use_cpu: true
    with pytest.raises(meshplan.PlanError, match="ACCELERATE_USE_CPU .* cannot run ZeRO while CUDA devices are visible"):
        meshplan.accelerator(meshplan.ZeRO(stage=2))


def test_accelerator_refuses_cpu_false_without_cuda_in_a_launched_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(meshplan.PlanError, match="each would train alone"):
        meshplan.accelerator(meshplan.DDP(), cpu=False)


# A TP group split across nodes: tp_size=2 on two nodes of one process each. Every front end
# refuses it before any process group exists.
SPLIT_TP_GROUP = "tp_size=2 does not divide the 1 processes of each node: a tensor-parallel group would span nodes"


def test_accelerator_refuses_a_tensor_parallel_group_split_across_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun --nnodes 2 --nproc_per_node 1 exports
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    state_before = shared_state()
    with pytest.raises(meshplan.PlanError, match=SPLIT_TP_GROUP):
        meshplan.accelerator(meshplan.TensorParallel(tp_size=2))
    assert shared_state() == state_before and not dist.is_initialized()


def test_a_recipe_for_two_machines_refuses_a_tensor_parallel_group_split_across_them(tmp_path) -> None:
    with pytest.raises(meshplan.PlanError, match=SPLIT_TP_GROUP):
        meshplan.TensorParallel(tp_size=2).to_recipe(tmp_path / "tp.yaml", num_processes=2, num_machines=2)
    assert not (tmp_path / "tp.yaml").exists()


def test_lightning_refuses_a_tensor_parallel_group_split_across_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    # devices=1: Lightning starts no other process, and this one fails before init_process_group.
    for name in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(name, "")  # recorded, so that what Lightning's launcher sets is undone afterwards
        monkeypatch.delenv(name)
    trainer = pl.Trainer(accelerator="cpu", devices=1, num_nodes=2, strategy=meshplan.TensorParallel(tp_size=2),
                         max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(meshplan.PlanError, match=SPLIT_TP_GROUP):
        trainer.fit(TinyModule("llama"))
    assert not dist.is_initialized()


RESTARTS_SHARING_THE_STORE = {"TORCHELASTIC_MAX_RESTARTS": "2", "TORCHELASTIC_USE_AGENT_STORE": "True", "RANK": "0"}


@pytest.mark.parametrize(
    ("environ", "warns"),
    [
        (RESTARTS_SHARING_THE_STORE, True),
        # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment: it then tells the workers False.
        ({**RESTARTS_SHARING_THE_STORE, "TORCHELASTIC_USE_AGENT_STORE": "False"}, False),
        ({**RESTARTS_SHARING_THE_STORE, "TORCHELASTIC_MAX_RESTARTS": "0"}, False),
        ({**RESTARTS_SHARING_THE_STORE, "RANK": "1"}, False),  # once per job
    ],
)
def test_restarts_that_share_the_rendezvous_store_are_warned_about(environ: dict, warns: bool) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_restarts_share_the_rendezvous_store(environ)
    messages = [str(warning.message) for warning in caught]
    assert len(messages) == (1 if warns else 0)
    assert all("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in message for message in messages)


def test_accelerator_warns_about_restarts_that_share_the_rendezvous_store(monkeypatch: pytest.MonkeyPatch) -> None:
    # Raised right after the warning, so no Accelerator is built: the warning comes first.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name, value in RESTARTS_SHARING_THE_STORE.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.warns(UserWarning, match="pytorch/pytorch#135712"), pytest.raises(meshplan.PlanError):
        meshplan.accelerator(meshplan.ZeRO(stage=2), cpu=False)
