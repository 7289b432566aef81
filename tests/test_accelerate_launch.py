"""Tier 3: every recipe under `accelerate launch`, driving a plain Accelerate script through meshplan.accelerator().

Each single-machine recipe starts N workers (2; 4 for tp-dp and tp-fsdp) with `--num_processes N`, and
each two-node recipe runs as two launcher invocations (machine rank 0 and 1) on 127.0.0.1.
The global loss per step and the final weights must match the single-process reference, with
a gradient norm above DeepSpeed's default clipping (so a clip the recipe did not ask for shows);
the FSDP2 recipes (Accelerate's own FSDP keys, which meshplan.accelerator() reads from the
launch's environment) also clip with accelerator.clip_grad_norm_ at every step, against a clipped reference.
The same launch then checks the Accelerate rows of the conformance matrix (tests/helpers/matrix.py):
prepare of model, optimizer, loaders and scheduler, save_state/load_state, gather_for_metrics
with an eval set the world does not divide, reduce, clip_grad_norm_, get_state_dict,
save_model, the save_pretrained pattern of the HF examples, and a clean exit (ZeRO launches
skip end_training(), as many scripts do, and must leave no process group behind at exit). Every launch runs
in a temporary directory: Accelerate's DeepSpeed launcher writes files into the working one.
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

import meshplan
from helpers import accelerate_train, matrix, parity
from helpers.parity import load_reference
from meshplan.recipes import CATALOGUE_DIR, RECIPE_VARIABLE
from meshplan.testing import free_port, spawn

pytestmark = pytest.mark.slow  # every test launches or spawns training workers

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "accelerate_train.py"
ACCELERATE = Path(sys.executable).with_name("accelerate")

SINGLE_MACHINE = [("ddp", 2), ("zero1", 2), ("zero2", 2), ("zero3", 2), ("zero3-offload", 2), ("tp", 2), ("tp-dp", 4),
                  ("fsdp2", 2), ("tp-fsdp", 4)]
# meshplan runs FSDP2 itself: Accelerate's own FSDP plugin stays off, so it reports the plain multi-process type.
EXPECTED_TYPE = {"ddp": "MULTI_CPU", "tp": "MULTI_CPU", "tp-dp": "MULTI_CPU", "fsdp2": "MULTI_CPU", "tp-fsdp": "MULTI_CPU"}
SCALE = accelerate_train.HIGH_GRADIENT_SCALE
ACCUMULATION = 2  # each step accumulates two micro-batches in accelerator.accumulate()
# Launched with accelerator.clip_grad_norm_(..., parity.CLIP) active in every step, against a clipped reference.
CLIPPED = ("fsdp2", "tp-fsdp")


def _launch(recipe: str, processes: int, output: Path, reference: str, *extra: str, env: dict | None = None,
            clip: float | None = None) -> subprocess.Popen:
    """`accelerate launch` of the recipe with absolute paths, from the output's (temporary) folder."""
    command = [str(ACCELERATE), "launch", "--config_file", str(CATALOGUE_DIR / f"{recipe}.yaml"),
               "--num_processes", str(processes), *extra, str(SCRIPT), str(output), reference,
               "--loss-scale", str(SCALE), "--accumulate", str(ACCUMULATION), "--conformance"]
    if clip is not None:
        command += ["--clip", str(clip)]
    if recipe.startswith("zero"):
        command.append("--no-end-training")  # a finished run exits 0 without end_training() too (issue 6)
    return subprocess.Popen(command, cwd=output.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def _finish(process: subprocess.Popen, timeout: float = 300) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"accelerate launch hung for {timeout} s:\n{output[-4000:]}")
    assert process.returncode == 0, output[-4000:]
    return output


@pytest.fixture(scope="module")
def high_gradient_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The single-process reference with the loss scaled by SCALE: every step's gradient norm is above 1."""
    losses, weights, norms = accelerate_train.reference_run(SCALE)
    assert min(norms) > 1.5, norms  # DeepSpeed's default clip at 1.0 would change every step
    folder = tmp_path_factory.mktemp("high-gradient")
    torch.save((losses, weights), folder / "reference.pt")
    clipped_losses, clipped_weights, _ = accelerate_train.reference_run(SCALE, clip=parity.CLIP)  # clips every step
    torch.save((clipped_losses, clipped_weights), folder / "clipped.pt")
    return {"high-gradient": str(folder / "reference.pt"), "high-gradient-clipped": str(folder / "clipped.pt")}


def _assert_parity(output: Path, reference_paths: dict[str, str], reference: str = "llama") -> dict:
    result = json.loads(output.read_text())
    reference_losses, _ = load_reference(reference_paths, reference)
    assert len(result["losses"]) == parity.STEPS
    assert max(abs(a - b) for a, b in zip(result["losses"], reference_losses)) < parity.LOSS_TOLERANCE
    assert result["weight_error"] < parity.WEIGHT_TOLERANCE
    print(reference, "loss error", max(abs(a - b) for a, b in zip(result["losses"], reference_losses)),
          "weight error", result["weight_error"])  # figures, with -s
    # save_state after step 2, load_state at the end: steps 3 and 4 again, exactly as the first time.
    resumed = accelerate_train.RESUME_AFTER
    assert result["resumed_losses"] == result["losses"][resumed:]
    assert result["resume_weight_error"] == 0.0
    return result


def _assert_conformance(result: dict, recipe: str, folder: Path) -> None:
    """Asserts the conformance cells of one launch and records them in the matrix."""
    print(recipe, "weight error", result["weight_error"], "conformance", json.dumps(result["conformance"]))  # figures, with -s
    cells = _check_conformance(result["conformance"], recipe, result["data_parallel_size"], folder)
    matrix.record("Accelerate", recipe, cells)


def _check_conformance(conformance: dict, recipe: str, data_parallel_size: int, folder: Path, model_name: str = "llama",
                       scale: float = SCALE, accumulation: int = ACCUMULATION) -> dict:
    # Every sample of the eval set once, in order, although 9 is not a multiple of the world.
    assert conformance["gathered_rows"] == accelerate_train.EVAL_SIZE
    assert conformance["gathered_equals_eval_set"]
    expected_objects = [f"sample starting {int(row[0])}" for row in parity.TokenDataset("llama").input_ids[:accelerate_train.EVAL_SIZE]]
    assert conformance["gathered_objects"] == expected_objects
    # reduce sums over the data: one term per data-parallel replica (TP ranks share one batch),
    # and an integer stays an integer.
    assert conformance["reduce_sum_of_ones"] == data_parallel_size
    assert conformance["reduce_sum_of_counts"] == 5 * data_parallel_size
    assert isinstance(conformance["reduce_sum_of_counts"], int)
    assert conformance["trigger_seen_by_every_rank"]
    # The state dict, and the directories written by save_model and save_pretrained as
    # from_pretrained loads them, hold exactly the trained weights.
    assert conformance["saves"]["get_state_dict"] == 0.0
    trained = torch.load(folder / "weights.pt", weights_only=True)
    if model_name.endswith("-lora"):
        _check_lora_saves(folder, trained)
    else:
        for name in ("save_model", "save_pretrained"):
            loaded = dict(LlamaForCausalLM.from_pretrained(folder / name).named_parameters())
            assert all(torch.equal(loaded[key].detach(), trained[key]) for key in trained), name
    cells = {
        "prepare (model, optimizer, loaders, scheduler)": matrix.WORKS,
        "accumulate()": matrix.WORKS,  # the parity above accumulates two micro-batches per step
        "save_state / load_state": matrix.WORKS,
        "gather_for_metrics (exact count)": matrix.WORKS,
        "gather_for_metrics of Python objects (exact count)": matrix.WORKS,
        "reduce": matrix.WORKS,
        "set_trigger / check_trigger": matrix.WORKS,
        "get_state_dict": matrix.WORKS,
        "save_model": matrix.WORKS,
        "save_pretrained (HF example pattern)": matrix.WORKS,
        "exit 0": matrix.WORKS,  # _finish checked it; ZeRO launches skip end_training()
    }
    clip = conformance["clip"]
    if recipe.startswith("zero"):
        assert "DeepSpeed clips inside accelerator.backward" in clip["refused"]
        assert "gradient_clipping: 0.5" in clip["refused"]
        assert clip["measured"] > 0  # max_norm=inf only measures: allowed when the recipe does not clip
        cells["clip_grad_norm_ (max_norm=inf, measures)"] = matrix.WORKS
        cells["clip_grad_norm_ (max_norm not the recipe's)"] = matrix.refused("DeepSpeed clips at the recipe's value")
    else:
        expected = accelerate_train.first_batch_gradient_norm(trained, scale, accumulation, model_name)
        assert abs(clip["norm"] - expected) < 1e-4 * expected, (clip["norm"], expected)
        cells["clip_grad_norm_ (norm)"] = matrix.WORKS
    return cells


def _check_lora_saves(folder: Path, trained: dict[str, torch.Tensor]) -> None:
    """A peft model's saves: save_pretrained (given get_state_dict, the HF examples' pattern) writes the adapter,
    which PeftModel.from_pretrained loads onto the base model; save_model writes the whole state dict."""
    from peft import PeftModel
    from safetensors.torch import load_file

    adapter = PeftModel.from_pretrained(parity.build_model("llama"), folder / "save_pretrained")
    assert all(torch.equal(parameter.detach(), trained[key]) for key, parameter in adapter.named_parameters())
    saved = load_file(folder / "save_model" / "model.safetensors")
    assert all(torch.equal(saved[key], trained[key]) for key in trained)


@pytest.mark.parametrize(("recipe", "processes"), SINGLE_MACHINE, ids=[recipe for recipe, _ in SINGLE_MACHINE])
def test_recipe_under_accelerate_launch_matches_one_process(recipe: str, processes: int, tmp_path: Path,
                                                            high_gradient_reference: dict[str, str],
                                                            deepspeed_ops: None) -> None:
    output = tmp_path / "result.json"
    # tp-dp names its recipe through $MESHPLAN_RECIPE, the channel that survives every launcher.
    env = {RECIPE_VARIABLE: str(CATALOGUE_DIR / "tp-dp.yaml")} if recipe == "tp-dp" else None
    reference = "high-gradient-clipped" if recipe in CLIPPED else "high-gradient"
    launched = _finish(_launch(recipe, processes, output, high_gradient_reference[reference], "--main_process_port",
                               str(free_port()), env=env, clip=parity.CLIP if recipe in CLIPPED else None))
    result = _assert_parity(output, high_gradient_reference, reference)
    assert result["num_processes"] == processes  # every CPU worker counted
    assert result["distributed_type"] == f"DistributedType.{EXPECTED_TYPE.get(recipe, 'DEEPSPEED')}"
    assert result["data_parallel_size"] == (processes // 2 if recipe.startswith("tp") else processes)
    _assert_conformance(result, recipe, tmp_path)
    assert not (ROOT / ".deepspeed_env").exists()
    if recipe.startswith("zero"):  # launched without end_training(): it exited 0 (above), and deterministically so
        assert "terminate called" not in launched
        assert [(tmp_path / f"atexit.{rank}").read_text() for rank in range(processes)] == ["False"] * processes


# ddp-2node trains as two launches in tests/test_multinode.py (every layout after it, in the same
# processes); this launch adds the conformance checks across two launches, under DeepSpeed's.
@pytest.mark.parametrize("recipe", ["zero3-2node"])
def test_two_node_recipe_as_two_launches_matches_one_process(recipe: str, tmp_path: Path,
                                                              high_gradient_reference: dict[str, str],
                                                              deepspeed_ops: None) -> None:
    port = str(free_port())
    launches = [
        _launch(recipe, 2, tmp_path / f"node{rank}.json", high_gradient_reference["high-gradient"], "--machine_rank",
                str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port)
        for rank in (0, 1)
    ]
    for launch in launches:
        _finish(launch)
    result = _assert_parity(tmp_path / "node0.json", high_gradient_reference, "high-gradient")  # written by global rank 0
    assert result["num_processes"] == 2
    assert not (tmp_path / "node1.json").exists()
    _assert_conformance(result, recipe, tmp_path)


@pytest.mark.parametrize(
    ("strategy_or_recipe", "clip"),
    [
        (str(CATALOGUE_DIR / "zero3-offload.yaml"), None),
        # A user plan, in base_model_tp_plan syntax, that leaves the MLP whole.
        (meshplan.TensorParallel(tp_size=2, tp_plan={f"layers.*.self_attn.{name}": style for name, style in (
            ("q_proj", "colwise"), ("k_proj", "colwise"), ("v_proj", "colwise"), ("o_proj", "rowwise"))}), None),
        # accelerator.clip_grad_norm_ over sharded and replicated parameters together.
        (meshplan.TensorParallel(tp_size=2), parity.CLIP),
        # Under ZeRO DeepSpeed clips, at the layout's gradient_clipping; clip_grad_norm_ names the same value.
        (meshplan.ZeRO(stage=2, gradient_clipping=parity.CLIP), parity.CLIP),
        # FSDP2 as ZeRO-2 (gathered parameters kept to the backward): clip_grad_norm_ over the sharded
        # gradients, each step accumulating two micro-batches.
        (meshplan.ZeRO(stage=2, engine="fsdp2"), parity.CLIP),
    ],
    ids=["recipe-path", "strategy-with-user-tp-plan", "tp-with-clipping", "zero-with-clipping", "fsdp2-zero2-with-clipping"],
)
def test_accelerator_takes_a_recipe_path_or_a_strategy(strategy_or_recipe, clip, tmp_path: Path,
                                                        reference_paths: dict[str, str], deepspeed_ops: None) -> None:
    # Workers started by another launcher (meshplan.testing, like torchrun) rather than accelerate launch.
    output = tmp_path / "result.json"
    reference = parity.reference_key("llama", clip)
    # FSDP2 accumulates two micro-batches per step: the same global batch, so the same reference.
    plan = getattr(strategy_or_recipe, "plan", None)
    accumulation = ACCUMULATION if plan is not None and plan.uses_fsdp2 else 1
    spawn(accelerate_train.main, 2, str(output), reference_paths[reference], strategy_or_recipe, clip, "llama", None,
          1.0, False, True, accumulation, timeout=300)
    result = _assert_parity(output, reference_paths, reference)
    assert result["num_processes"] == 2
    if clip is not None:  # clip_grad_norm_ clipped as the single-process reference did
        layout = "fsdp2-stage2" if plan.uses_fsdp2 else "zero2" if plan.strategy == "zero" else "tp"
        matrix.record("Accelerate", layout, {"clip_grad_norm_ (clipping active)": matrix.WORKS})


# A peft LoRA model (a frozen base, adapters on every linear layer of the blocks) under these recipes.
LORA_RECIPES = [("ddp", 2), ("zero2", 2), ("zero3", 2), ("tp", 2), ("tp-dp", 4)]


@pytest.mark.parametrize(("recipe", "processes"), LORA_RECIPES, ids=[recipe for recipe, _ in LORA_RECIPES])
def test_a_lora_model_trains_like_one_process_with_the_everyday_calls(recipe: str, processes: int, tmp_path: Path,
                                                                     reference_paths: dict[str, str],
                                                                     deepspeed_ops: None) -> None:
    # The same script, the model wrapped with peft.get_peft_model: save_state / load_state (which resumes
    # bit-exactly from checkpoints that hold only the adapters), gathers, clipping and the saves.
    output = tmp_path / "result.json"
    spawn(accelerate_train.main, processes, str(output), reference_paths["llama-lora"], str(CATALOGUE_DIR / f"{recipe}.yaml"),
          None, "llama-lora", None, 1.0, True, True, ACCUMULATION, timeout=300)
    result = _assert_parity(output, reference_paths, "llama-lora")
    assert result["num_processes"] == processes
    cells = _check_conformance(result["conformance"], recipe, result["data_parallel_size"], tmp_path, "llama-lora", 1.0)
    cells.pop("exit 0")  # a spawned worker, not a launch: its exit is the launch tests' cell
    matrix.record("Accelerate", f"{recipe}+lora", cells)


# The layouts whose model meshplan shards itself in prepare (so Accelerate never wraps its forward).
# On the 2 processes of the test, tp-fsdp's FSDP2 shards over one replica: the autocast checked here
# wraps the forward whatever the mesh (the 2 x 2 launch above checks the training itself).
SHARDED_IN_PREPARE = {"tp": meshplan.TensorParallel(tp_size=2), "fsdp2": meshplan.ZeRO(stage=3, engine="fsdp2"),
                      "tp-fsdp": meshplan.TensorParallel(tp_size=2, data_parallel="shard")}


def test_bf16_reaches_the_forward_of_models_sharded_in_prepare() -> None:
    # Accelerate puts the forward of the models it wraps under autocast; those meshplan shards in
    # prepare are never wrapped, and once trained in fp32 whatever the recipe said.
    results = spawn(accelerate_train.forward_precision, 2, list(SHARDED_IN_PREPARE.values()), timeout=300)[0]
    for layout, losses in zip(SHARDED_IN_PREPARE, results):
        fp32_loss, fp32_compute, fp32_output = losses["no"]
        bf16_loss, bf16_compute, bf16_output = losses["bf16"]
        assert (fp32_compute, bf16_compute) == ("torch.float32", "torch.bfloat16"), layout
        assert fp32_output == bf16_output == "torch.float32", layout  # outputs come back in fp32, as Accelerate's do
        assert 0 < abs(bf16_loss - fp32_loss) < 1e-2, layout  # the same model, computed in bf16
        matrix.record("Accelerate", layout, {"mixed_precision bf16 (forward under autocast)": matrix.WORKS})


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
