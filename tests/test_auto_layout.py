"""Automatic layout: meshplan_auto, meshplan.accelerator("auto") and meshplan finetune --recipe auto.

Each front end asks the planner once the model, the world size and the memory per process are
known, announces the choice with its reason, and runs exactly the chosen layout. The fast tests
check what each front end gives the planner and how the chosen strategy is put in place; the
slow ones (one spawn per front end) train under the chosen layout and compare with the
single-process reference.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import DeepSpeedPrecision, MixedPrecision
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import meshplan
from helpers import auto_layout, parity
from helpers.parity import load_reference
from meshplan.auto import announcement, choose_layout, default_seq_len, without_layouts, without_tensor_parallel
from meshplan.finetune.job import FinetuneJob, check_job, load_config, model_class, task_of, with_chosen_layout
from meshplan.lightning import DDP, Auto, ZeRO, from_plan
from meshplan.models import minilm_path
from meshplan.planner import memory_per_process, plan_layout
from meshplan.testing import spawn

CPU = torch.device("cpu")
# Under 2-way data parallelism each process takes this share of the parity's global batch.
SHARE = parity.GLOBAL_BATCH // 2
ACCELERATOR_CLASSES = {"ddp": "CheckpointingAccelerator", "zero": "ZeROAccelerator", "tp": "TensorParallelAccelerator"}


def _accelerator_class(plan: meshplan.Plan) -> str:
    """The name of the Accelerator class meshplan.accelerator builds for ``plan``: FSDP2's for its layouts."""
    return "FullyShardedAccelerator" if plan.uses_fsdp2 else ACCELERATOR_CLASSES[plan.strategy]


def _trainer(strategy: object, **settings: object) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **settings)


def _smallest_zero_need(choice: meshplan.planner.LayoutChoice) -> int:
    """The memory per device in which only the leanest ZeRO stage (and what needs less) still fits."""
    return min(c.estimate.total for c in choice.candidates if c.layout in ("zero1", "zero2", "zero3"))


# ---------------------------------------------------------------- what the planner is asked


def test_the_default_sequence_is_2048_tokens_or_the_models_limit() -> None:
    assert default_seq_len(parity.tiny_llama_config()) == 64  # max_position_embeddings=64
    assert default_seq_len(LlamaConfig(max_position_embeddings=8192)) == 2048
    assert default_seq_len(LlamaForCausalLM(parity.tiny_llama_config())) == 64  # read from the model inside a module
    assert default_seq_len(str(minilm_path())) == 512  # from a model directory


def test_meshplan_auto_is_a_registered_strategy_that_waits_for_the_model() -> None:
    trainer = _trainer("meshplan_auto")
    assert isinstance(trainer.strategy, Auto) and trainer.strategy.choice is None
    assert trainer.strategy.launcher is not None  # the processes start as under every meshplan layout


def test_auto_plans_for_the_trainers_world_memory_precision_and_the_modules_batch_size() -> None:
    trainer = _trainer(Auto(seq_len=parity.SEQUENCE), precision="bf16-mixed")
    module = auto_layout.AutoParityModule("llama", SHARE)  # its batch_size attribute, as the batch-size finder reads it
    trainer.strategy.connect(module)
    expected = plan_layout(module, devices_per_node=2, device_memory=memory_per_process(2, CPU), micro_batch_size=SHARE,
                           seq_len=parity.SEQUENCE, precision="bf16")
    assert trainer.strategy.choose(trainer) == expected


def test_auto_arguments_override_what_it_would_read() -> None:
    trainer = _trainer(Auto(micro_batch_size=3, seq_len=32, precision="32-true", device_memory="1GB", gradient_checkpointing=True),
                       precision="bf16-mixed")
    module = auto_layout.AutoParityModule("llama", SHARE)
    trainer.strategy.connect(module)
    expected = plan_layout(module, devices_per_node=2, device_memory=10**9, micro_batch_size=3, seq_len=32,
                           precision="fp32", gradient_checkpointing=True)
    assert trainer.strategy.choose(trainer) == expected


def test_the_chosen_strategy_gets_what_the_trainer_set_on_auto_and_replaces_it() -> None:
    trainer = _trainer("meshplan_auto", precision="bf16-mixed")
    auto = trainer.strategy
    module = auto_layout.AutoParityModule("llama", SHARE)
    auto.connect(module)
    roomy = choose_layout(module, processes_per_node=2, device=CPU, micro_batch_size=SHARE, precision="bf16")
    auto.choice = plan_layout(module, devices_per_node=2, device_memory=_smallest_zero_need(roomy), micro_batch_size=SHARE,
                              seq_len=default_seq_len(module), precision="bf16")
    assert auto.choice.plan.strategy == "zero"  # at that memory only ZeRO (or less) fits
    chosen = auto.build_chosen(trainer)
    assert trainer.strategy is chosen and type(chosen) is ZeRO and chosen.plan == auto.choice.plan
    assert chosen.layout_choice is auto.choice
    assert chosen.accelerator is auto.accelerator and chosen.cluster_environment is auto.cluster_environment
    assert chosen.parallel_devices == auto.parallel_devices and chosen.num_nodes == auto.num_nodes
    assert chosen.launcher is auto.launcher  # the one that started the processes
    assert chosen.lightning_module is module
    # As Lightning's connector does for DeepSpeed: its own precision plugin, at the Trainer's precision.
    assert isinstance(trainer.precision_plugin, DeepSpeedPrecision) and trainer.precision == "bf16-mixed"


def test_a_data_parallel_choice_keeps_the_trainers_precision_plugin() -> None:
    trainer = _trainer("meshplan_auto", precision="bf16-mixed")
    auto = trainer.strategy
    plugin = auto.precision_plugin
    auto.connect(auto_layout.AutoParityModule("llama", SHARE))
    auto.choice = plan_layout(auto.lightning_module, devices_per_node=2, device_memory="1GB", seq_len=parity.SEQUENCE,
                              precision="fp32")
    assert auto.choice.chosen == "ddp"  # the tiny model in fp32, with room to spare
    chosen = auto.build_chosen(trainer)
    assert type(chosen) is DDP and chosen.precision_plugin is plugin and isinstance(plugin, MixedPrecision)


def test_the_choice_is_announced_with_its_reason() -> None:
    choice = plan_layout(parity.tiny_llama_config(), devices_per_node=2, device_memory="1GB", seq_len=16)
    line = announcement(choice)
    assert line == f"meshplan: chose {choice.chosen} (tp_size {choice.tp_size}): {choice.reason}"
    assert announcement({"chosen": choice.chosen, "tp_size": choice.tp_size, "reason": choice.reason}) == line


# ---------------------------------------------------------------- front ends without TP


def _as_if_tp_were_chosen(choice: meshplan.planner.LayoutChoice) -> meshplan.planner.LayoutChoice:
    tp = next(c for c in choice.candidates if c.layout.startswith("tp"))
    return dataclasses.replace(choice, chosen=tp.layout, tp_size=tp.tp_size, plan=tp.plan)


def test_a_front_end_without_tp_gets_the_fastest_fitting_layout_without_it() -> None:
    choice = _as_if_tp_were_chosen(plan_layout(parity.tiny_llama_config(), devices_per_node=2, device_memory="1GB", seq_len=16))
    fallback = without_tensor_parallel(choice, "this front end does not run it")
    first_fitting = next(c for c in choice.candidates if c.fits and not c.layout.startswith("tp"))
    assert (fallback.chosen, fallback.plan) == (first_fitting.layout, first_fitting.plan)
    assert "this front end does not run it" in fallback.reason and fallback.candidates == choice.candidates


def test_a_front_end_without_tp_is_refused_when_only_tp_fits() -> None:
    choice = _as_if_tp_were_chosen(plan_layout(parity.tiny_llama_config(), devices_per_node=2, device_memory="1GB", seq_len=16))
    only_tp = dataclasses.replace(choice, candidates=tuple(
        c if c.layout.startswith("tp") else dataclasses.replace(c, fits=False) for c in choice.candidates))
    with pytest.raises(meshplan.PlanError, match="only tensor parallelism fits this model, and it cannot run here"):
        without_tensor_parallel(only_tp, "it cannot run here")


def test_lightning_auto_leaves_out_tp_and_fsdp2_at_a_precision_modelparallelstrategy_refuses() -> None:
    # 64-true: Lightning's connector refuses it for ModelParallelStrategy, which meshplan's TP and FSDP2 build on.
    module = auto_layout.AutoParityModule("llama", SHARE)
    roomy = plan_layout(module, devices_per_node=2, device_memory="1GB", micro_batch_size=SHARE, seq_len=parity.SEQUENCE,
                        precision="fp32")
    need = {c.layout: c.estimate.total for c in roomy.candidates}
    memory = need["zero2"]  # where FSDP2's stage 2 fits too, and sends less (2 copies of the model to ZeRO-2's 3)
    trainer = _trainer(Auto(seq_len=parity.SEQUENCE, device_memory=memory), precision="64-true")
    trainer.strategy.connect(module)
    assert plan_layout(module, devices_per_node=2, device_memory=memory, micro_batch_size=SHARE, seq_len=parity.SEQUENCE,
                       precision="fp32").chosen == "fsdp2-stage2"
    choice = trainer.strategy.choose(trainer)
    assert choice.chosen == "zero2" and "without tensor parallelism or FSDP2" in choice.reason


def test_a_front_end_without_fsdp2_gets_the_fastest_fitting_layout_without_it() -> None:
    choice = plan_layout(parity.tiny_llama_config(), devices_per_node=2, device_memory="1GB", seq_len=16)
    fsdp2 = next(c for c in choice.candidates if c.layout == "fsdp2")
    as_if = dataclasses.replace(choice, chosen=fsdp2.layout, tp_size=fsdp2.tp_size, plan=fsdp2.plan)
    fallback = without_layouts(as_if, lambda plan: plan.uses_fsdp2, "FSDP2", "this front end does not run it")
    first_fitting = next(c for c in choice.candidates if c.fits and not c.plan.uses_fsdp2)
    assert (fallback.chosen, fallback.plan) == (first_fitting.layout, first_fitting.plan)
    assert "without FSDP2" in fallback.reason and "this front end does not run it" in fallback.reason


# ---------------------------------------------------------------- Accelerate and finetune, before any process


def test_accelerator_auto_asks_for_the_model_before_any_accelerator_exists() -> None:
    with pytest.raises(meshplan.PlanError, match=r'meshplan.accelerator\("auto", model=model\)'):
        meshplan.accelerator("auto")


def _reviews_job(framework: str, tmp_path: Path) -> FinetuneJob:
    return FinetuneJob(model=str(minilm_path()), data="reviews", recipe="auto", framework=framework, devices=2,
                       max_steps=2, output=str(tmp_path / "out"))


@pytest.mark.parametrize("framework", ["lightning", "trainer"])
def test_finetune_auto_chooses_once_and_the_job_carries_the_plan(framework: str, tmp_path: Path) -> None:
    job = with_chosen_layout(_reviews_job(framework, tmp_path))
    config = load_config(job.model)
    with torch.device("meta"):  # the sequence classifier the workers train, not the config's bare BertModel
        trained = model_class(task_of(config)).from_config(config)
    expected = choose_layout(trained, processes_per_node=2, device=CPU, global_batch_size=job.batch_size,
                             seq_len=job.max_length, precision="no")
    if framework == "trainer":  # the HF Trainer runs no tensor parallelism
        expected = without_tensor_parallel(expected, "the HF Trainer (--framework trainer) does not run tensor parallelism")
    assert job.layout_record() == {"chosen": expected.chosen, "tp_size": expected.tp_size, "reason": expected.reason}
    assert job.plan == expected.plan
    check_job(job)
    # Every worker reads the job file: the plan comes back as chosen, without planning again.
    (tmp_path / "out").mkdir()
    job.to_json(tmp_path / "out" / "job.json")
    assert FinetuneJob.from_json(str(tmp_path / "out" / "job.json")).plan == expected.plan


def test_a_recipe_job_records_no_layout(tmp_path: Path) -> None:
    job = with_chosen_layout(dataclasses.replace(_reviews_job("lightning", tmp_path), recipe="zero2"))
    assert job.layout is None and job.layout_record() is None and job.plan.zero_stage == 2


# ---------------------------------------------------------------- training under the chosen layout


@pytest.mark.slow
def test_lightning_trains_the_chosen_layout_as_one_process_would(reference_paths: dict[str, str], deepspeed_ops: None) -> None:
    module = auto_layout.AutoParityModule("minilm", SHARE)
    roomy = choose_layout(module, processes_per_node=2, device=CPU, micro_batch_size=SHARE, precision="no")
    tight_memory = _smallest_zero_need(roomy)
    tight = choose_layout(module, processes_per_node=2, device=CPU, device_memory=tight_memory, micro_batch_size=SHARE,
                          precision="no")
    ddp_need = next(c.estimate.total for c in roomy.candidates if c.layout == "ddp")
    assert roomy.chosen == "ddp" and tight.chosen != "ddp" and ddp_need > tight_memory
    # 1: strategy="meshplan_auto", planning for the DataLoader given to fit; 2: Auto(device_memory=...)
    # in which DDP does not fit, planning for the module's batch_size.
    runs = [{"strategy": None, "given_loader": True}, {"strategy": {"device_memory": tight_memory}, "given_loader": False}]
    results = spawn(auto_layout.lightning_runs, 2, runs, "minilm", reference_paths["minilm"], timeout=600)[0]
    reference_losses, _ = load_reference(reference_paths, "minilm")
    for result, expected in zip(results, [roomy, tight]):
        assert result["choice"] == expected.to_dict()
        assert result["strategy"] == type(from_plan(expected.plan)).__name__ and result["plan"] == expected.plan
        assert max(abs(a - b) for a, b in zip(result["losses"], reference_losses)) < parity.LOSS_TOLERANCE
        assert result["weight_error"] < parity.WEIGHT_TOLERANCE


@pytest.mark.slow
def test_accelerate_trains_the_chosen_layout_as_one_process_would(reference_paths: dict[str, str], deepspeed_ops: None) -> None:
    model = parity.build_model("llama")
    roomy = choose_layout(model, processes_per_node=2, device=CPU, micro_batch_size=SHARE, seq_len=parity.SEQUENCE, precision="no")
    tight_memory = _smallest_zero_need(roomy)  # DDP does not fit: the Accelerator runs a sharded layout
    expected = choose_layout(model, processes_per_node=2, device=CPU, device_memory=tight_memory, micro_batch_size=SHARE,
                             seq_len=parity.SEQUENCE, precision="no")
    assert expected.chosen != "ddp"
    result = spawn(auto_layout.accelerate_run, 2, "llama", reference_paths["llama"], tight_memory, timeout=300)[0]
    assert result["choice"] == expected.to_dict()
    assert result["accelerator"] == _accelerator_class(expected.plan) and result["plan"] == expected.plan
    reference_losses, _ = load_reference(reference_paths, "llama")
    assert max(abs(a - b) for a, b in zip(result["losses"], reference_losses)) < parity.LOSS_TOLERANCE
    assert result["weight_error"] < parity.WEIGHT_TOLERANCE


@pytest.mark.slow
def test_finetune_auto_trains_a_causal_lm_on_a_text_file_announcing_and_recording_its_layout(tmp_path: Path) -> None:
    # Also finetune's causal-LM path (a text file, next-token accuracy): one spawn checks both.
    model_dir = tmp_path / "tiny-llama"
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=30522)).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(model_dir)
    data = tmp_path / "notes.json"
    data.write_text("\n".join(json.dumps({"text": f"note number {i} says the build is green"}) for i in range(40)))
    output = tmp_path / "out"
    arguments = ["--model", str(model_dir), "--data", str(data), "--recipe", "auto", "--max-steps", "2", "--devices", "2",
                 "--output", str(output)]
    expected = with_chosen_layout(FinetuneJob(model=str(model_dir), data=str(data), recipe="auto", framework="lightning",
                                              devices=2, max_steps=2, output=str(output)))
    run = subprocess.run([str(Path(sys.executable).with_name("meshplan")), "finetune", *arguments],
                         capture_output=True, text=True, timeout=420)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert announcement(expected.layout) in run.stdout.splitlines()
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["recipe"] == "auto" and metrics["layout"] == expected.layout_record() and metrics["train_steps"] == 2
    assert 0.0 <= metrics["eval_accuracy_after"] <= 1.0
    assert FinetuneJob.from_json(str(output / "job.json")).plan == expected.plan  # what every worker ran
    assert isinstance(LlamaForCausalLM.from_pretrained(output), LlamaForCausalLM)
