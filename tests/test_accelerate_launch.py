"""Tier 3: every recipe under `accelerate launch`, driving a plain Accelerate script through meshplan.accelerator().

Each single-machine recipe starts N workers (2; 4 for tp-dp) with `--num_processes N`, and
each two-node recipe runs as two launcher invocations (machine rank 0 and 1) on 127.0.0.1.
The global loss per step and the final weights must match the single-process reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

import accelerate_train
import meshplan
import parity
from conftest import load_reference
from meshplan.recipes import CATALOGUE_DIR
from meshplan.testing import free_port, spawn

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "accelerate_train.py"
ACCELERATE = Path(sys.executable).with_name("accelerate")

SINGLE_MACHINE = [("ddp", 2), ("zero1", 2), ("zero2", 2), ("zero3", 2), ("zero3-offload", 2), ("tp", 2), ("tp-dp", 4)]
EXPECTED_TYPE = {"ddp": "MULTI_CPU", "tp": "MULTI_CPU", "tp-dp": "MULTI_CPU"}


def _launch(recipe: str, processes: int, output: Path, reference: str, *extra: str) -> subprocess.Popen:
    command = [str(ACCELERATE), "launch", "--config_file", f"recipes/{recipe}.yaml", "--num_processes", str(processes),
               *extra, str(SCRIPT), str(output), reference]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _finish(process: subprocess.Popen, timeout: float = 300) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"accelerate launch hung for {timeout} s:\n{output[-4000:]}")
    assert process.returncode == 0, output[-4000:]
    return output


def _assert_parity(output: Path, reference_paths: dict[str, str], reference: str = "llama") -> dict:
    result = json.loads(output.read_text())
    reference_losses, _ = load_reference(reference_paths, reference)
    assert len(result["losses"]) == parity.STEPS
    assert max(abs(a - b) for a, b in zip(result["losses"], reference_losses)) < parity.LOSS_TOLERANCE
    assert result["weight_error"] < parity.WEIGHT_TOLERANCE
    # save_state after step 2, load_state at the end: steps 3 and 4 again, exactly as the first time.
    resumed = accelerate_train.RESUME_AFTER
    assert result["resumed_losses"] == result["losses"][resumed:]
    assert result["resume_weight_error"] == 0.0
    return result


@pytest.mark.parametrize(("recipe", "processes"), SINGLE_MACHINE, ids=[recipe for recipe, _ in SINGLE_MACHINE])
def test_recipe_under_accelerate_launch_matches_one_process(recipe: str, processes: int, tmp_path: Path,
                                                            reference_paths: dict[str, str], deepspeed_ops: None) -> None:
    output = tmp_path / "result.json"
    _finish(_launch(recipe, processes, output, reference_paths["llama"], "--main_process_port", str(free_port())))
    result = _assert_parity(output, reference_paths)
    assert result["num_processes"] == processes  # every CPU worker counted
    assert result["distributed_type"] == f"DistributedType.{EXPECTED_TYPE.get(recipe, 'DEEPSPEED')}"
    assert result["data_parallel_size"] == (processes // 2 if recipe.startswith("tp") else processes)


@pytest.mark.parametrize("recipe", ["ddp-2node", "zero3-2node"])
def test_two_node_recipe_as_two_launches_matches_one_process(recipe: str, tmp_path: Path,
                                                              reference_paths: dict[str, str], deepspeed_ops: None) -> None:
    port = str(free_port())
    launches = [
        _launch(recipe, 2, tmp_path / f"node{rank}.json", reference_paths["llama"], "--machine_rank", str(rank),
                "--main_process_ip", "127.0.0.1", "--main_process_port", port)
        for rank in (0, 1)
    ]
    for launch in launches:
        _finish(launch)
    result = _assert_parity(tmp_path / "node0.json", reference_paths)  # written by global rank 0, on node 0
    assert result["num_processes"] == 2
    assert not (tmp_path / "node1.json").exists()


@pytest.mark.parametrize(
    ("strategy_or_recipe", "clip"),
    [
        (str(CATALOGUE_DIR / "zero3-offload.yaml"), None),
        # A user plan, in base_model_tp_plan syntax, that leaves the MLP whole.
        (meshplan.TensorParallel(tp_size=2, tp_plan={f"layers.*.self_attn.{name}": style for name, style in (
            ("q_proj", "colwise"), ("k_proj", "colwise"), ("v_proj", "colwise"), ("o_proj", "rowwise"))}), None),
        # accelerator.clip_grad_norm_ over sharded and replicated parameters together.
        (meshplan.TensorParallel(tp_size=2), parity.CLIP),
    ],
    ids=["recipe-path", "strategy-with-user-tp-plan", "tp-with-clipping"],
)
def test_accelerator_takes_a_recipe_path_or_a_strategy(strategy_or_recipe, clip, tmp_path: Path,
                                                        reference_paths: dict[str, str], deepspeed_ops: None) -> None:
    # Workers started by another launcher (meshplan.testing, like torchrun) rather than accelerate launch.
    output = tmp_path / "result.json"
    reference = parity.reference_key("llama", clip)
    spawn(accelerate_train.main, 2, str(output), reference_paths[reference], strategy_or_recipe, clip, timeout=300)
    result = _assert_parity(output, reference_paths, reference)
    assert result["num_processes"] == 2


def test_saved_state_resumes_under_another_layout_and_exports(tmp_path: Path, reference_paths: dict[str, str],
                                                              deepspeed_ops: None) -> None:
    # ZeRO-3 writes the state; fresh TP processes load_state it after step 2 and go on with the
    # reference. The final ZeRO-3 state exports to the model those processes trained.
    zero3, tp = tmp_path / "zero3", tmp_path / "tp"
    zero3.mkdir()
    tp.mkdir()
    spawn(accelerate_train.main, 2, str(zero3 / "result.json"), reference_paths["llama"],
          str(CATALOGUE_DIR / "zero3.yaml"), timeout=300)
    spawn(accelerate_train.main, 2, str(tp / "result.json"), reference_paths["llama"], meshplan.TensorParallel(tp_size=2),
          None, "llama", str(zero3 / "state-step2"), timeout=300)
    resumed = json.loads((tp / "result.json").read_text())
    reference_losses, _ = load_reference(reference_paths, "llama")
    assert len(resumed["losses"]) == parity.STEPS - accelerate_train.RESUME_AFTER
    assert max(abs(a - b) for a, b in zip(resumed["losses"], reference_losses[accelerate_train.RESUME_AFTER:])) < parity.LOSS_TOLERANCE
    assert resumed["weight_error"] < parity.WEIGHT_TOLERANCE
    exported = LlamaForCausalLM.from_pretrained(meshplan.export(zero3 / "state-final", tmp_path / "model"))
    trained = torch.load(zero3 / "weights.pt", weights_only=True)  # after the in-run resume: the same steps again
    assert all(torch.equal(parameter.detach(), trained[name]) for name, parameter in exported.named_parameters())
