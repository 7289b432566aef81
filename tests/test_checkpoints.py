"""Checkpoints that outlive their layout (Lightning): exact resume, resume under another layout, export.

Three spawns carry every run. Two workers train the tiny Llama under every strategy with a
checkpoint after every step, resume each from its step-2 checkpoint, and resume across layouts
(ZeRO-3 <-> TP, FSDP2 <-> DeepSpeed ZeRO-3, TP -> FSDP2 stage 2). Four workers then train TP 2 x
DP 2 and TP 2 x FSDP2 2, and their first two go on as a world of two for the 4 -> 2 cases. One
worker resumes the ZeRO-3 checkpoint alone and tries unsafe ones. Every resumed run must continue
the single-process reference: the steps after its checkpoint, and the weights.

The chain (helpers.resume.CHAIN) carries one run through DeepSpeed ZeRO-3 x 2 -> TP x FSDP2 x 4
-> FSDP2 x 2 -> one process, a step in each, across all three spawns.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

import meshplan
from helpers import parity, resume
from helpers.parity import load_reference
from helpers.resume import (CHAIN, CROSS_LAYOUT, FOUR_PROCESS_LAYOUTS, FOUR_TO_TWO, LAYOUTS, LORA_CHAIN, LORA_MODEL, LORA_RUN,
                            RESUMED_AFTER, chain_runs,
                            four_process_runs, step_checkpoint, two_process_runs)
from meshplan.checkpoint import (CheckpointError, CheckpointReader, latest_checkpoint, load_training_state,
                                 save_training_state)
from meshplan.cli import main
from meshplan.plan import Plan
from meshplan.testing import free_port, spawn


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def spawned(folder: Path, reference_paths: dict[str, str], deepspeed_ops: None) -> dict[int, dict]:
    """The three spawns' results by process count, all started in one fixture's setup (worker processes
    fork from meshplan.testing's server only while the caller's environment, pytest's current test
    included, is the one it started in; otherwise each starts a fresh interpreter)."""
    two = _two_process_spawn(folder, reference_paths)
    # The chain's 4-process link resumes the ZeRO-3 run's checkpoint, and its first two ranks go on to
    # resume the 4 processes' checkpoints as a world of two.
    four = spawn(resume.train_and_resume, 4, four_process_runs(folder), reference_paths, str(folder), timeout=600)[0]
    unsafe = _plant_unsafe_checkpoints(folder)
    runs = [{"label": "ZeRO-3->one-process", "model": "llama", "plan": Plan.build("ddp"),
             "resume": str(folder / step_checkpoint("ZeRO-3", RESUMED_AFTER))}]
    runs += chain_runs(1, folder)
    runs += chain_runs(1, folder, LORA_CHAIN, LORA_MODEL)
    runs += [{"label": name, "model": "llama", "plan": Plan.build("ddp"), "resume": str(path), "expect_error": True}
             for name, path in unsafe.items()]
    # A LoRA checkpoint holds no base weights: resuming it needs the model it was trained on.
    runs += [{"label": f"LoRA-onto-{model}", "model": model, "plan": Plan.build("ddp"), "expect_error": True,
              "resume": str(folder / step_checkpoint(LORA_RUN["label"], RESUMED_AFTER))} for model in ("llama", "llama-tied-lora")]
    one = spawn(resume.train_and_resume, 1, runs, reference_paths, str(folder), timeout=300)[0]
    return {2: two, 4: four, 1: one}


def _two_process_spawn(folder: Path, reference_paths: dict[str, str]) -> dict:
    runs = two_process_runs(folder)
    # Parameters whose size the process count does not divide: ZeRO-3 pads their last partition.
    runs += [{"label": "ZeRO-3-uneven", "model": "llama-odd", "plan": LAYOUTS["ZeRO-3"]},
             {"label": "ZeRO-3-uneven-resumed", "model": "llama-odd", "plan": LAYOUTS["ZeRO-3"],
              "resume": str(folder / step_checkpoint("ZeRO-3-uneven", RESUMED_AFTER))}]
    # FSDP2 pads them inside its shards (a DTensor's whole shape is the true one): it resumes that checkpoint.
    runs += [{"label": "ZeRO-3-uneven->FSDP2", "model": "llama-odd", "plan": LAYOUTS["FSDP2"],
              "resume": str(folder / step_checkpoint("ZeRO-3-uneven", RESUMED_AFTER))}]
    runs += [{"label": "full-disk-on-rank-1", "model": "llama", "plan": LAYOUTS["DDP"], "fail_writes_on_rank": 1}]
    runs += [LORA_RUN, *chain_runs(2, folder, LORA_CHAIN, LORA_MODEL)]
    results = spawn(resume.train_and_resume, 2, runs, reference_paths, str(folder), timeout=900)
    results[0]["full-disk-on-rank-1"]["rank 0"] = results[0]["full-disk-on-rank-1"]["error"]
    results[0]["full-disk-on-rank-1"]["rank 1"] = results[1]["full-disk-on-rank-1"]["error"]
    return results[0]


@pytest.fixture(scope="module")
def two_process_results(spawned: dict[int, dict]) -> dict:
    return spawned[2]


@pytest.fixture(scope="module")
def four_process_results(spawned: dict[int, dict]) -> dict:
    return spawned[4]


@pytest.fixture(scope="module")
def one_process_results(spawned: dict[int, dict]) -> dict:
    return spawned[1]


def _assert_continues_reference(result: dict, reference_paths: dict[str, str], first_step: int,
                                model: str = "llama") -> None:
    reference_losses, _ = load_reference(reference_paths, model)
    assert result["global_step"] == parity.STEPS
    expected = reference_losses[first_step:]
    assert len(result["losses"]) == len(expected)
    assert max(abs(a - b) for a, b in zip(result["losses"], expected)) < parity.LOSS_TOLERANCE
    assert result["weight_error"] < parity.WEIGHT_TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("label", LAYOUTS)
def test_uninterrupted_run_with_checkpoints_matches_reference(label: str, two_process_results: dict,
                                                              reference_paths: dict[str, str]) -> None:
    _assert_continues_reference(two_process_results[label], reference_paths, first_step=0)


@pytest.mark.slow
@pytest.mark.parametrize("label", LAYOUTS)
def test_resume_after_step_2_reproduces_the_uninterrupted_run(label: str, two_process_results: dict,
                                                              reference_paths: dict[str, str]) -> None:
    resumed, uninterrupted = two_process_results[f"{label}-resumed"], two_process_results[label]
    _assert_continues_reference(resumed, reference_paths, first_step=RESUMED_AFTER)
    assert resumed["losses"] == pytest.approx(uninterrupted["losses"][RESUMED_AFTER:], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("label", FOUR_PROCESS_LAYOUTS)
def test_uninterrupted_four_process_run_with_checkpoints_matches_reference(label: str, four_process_results: dict,
                                                                           reference_paths: dict[str, str]) -> None:
    _assert_continues_reference(four_process_results[label], reference_paths, first_step=0)


@pytest.mark.slow
@pytest.mark.parametrize("label", [label for label, _, _ in CROSS_LAYOUT])
def test_resume_under_another_layout_continues_the_reference(label: str, two_process_results: dict,
                                                             reference_paths: dict[str, str]) -> None:
    _assert_continues_reference(two_process_results[label], reference_paths, first_step=RESUMED_AFTER)


@pytest.mark.slow
@pytest.mark.parametrize("label", [label for label, _, _ in FOUR_TO_TWO])
def test_four_process_checkpoint_resumes_on_two(label: str, four_process_results: dict,
                                                reference_paths: dict[str, str]) -> None:
    _assert_continues_reference(four_process_results[label], reference_paths, first_step=RESUMED_AFTER)


@pytest.mark.slow
def test_zero3_resume_with_padded_partitions(two_process_results: dict, reference_paths: dict[str, str]) -> None:
    _assert_continues_reference(two_process_results["ZeRO-3-uneven"], reference_paths, 0, model="llama-odd")
    _assert_continues_reference(two_process_results["ZeRO-3-uneven-resumed"], reference_paths, RESUMED_AFTER, model="llama-odd")
    # FSDP2 shards the same sizes with padding of its own.
    _assert_continues_reference(two_process_results["ZeRO-3-uneven->FSDP2"], reference_paths, RESUMED_AFTER, model="llama-odd")


def _chain_checkpoints(folder: Path) -> dict[str, Path]:
    """The checkpoint each link of the chain wrote at its step (the ZeRO-3 run's at step 1 is the first), by label."""
    return {label: folder / step_checkpoint(label, step) for step, (label, _, _, _) in enumerate(CHAIN, start=1)}


@pytest.mark.slow
def test_chain_across_engines_and_process_counts_continues_the_reference(
        two_process_results: dict, four_process_results: dict, one_process_results: dict,
        reference_paths: dict[str, str], folder: Path) -> None:
    # DeepSpeed ZeRO-3 x 2 -> TP 2 x FSDP2 2 x 4 -> FSDP2 x 2 -> one process: a step each, as one unbroken run.
    results = {**two_process_results, **four_process_results, **one_process_results}
    links = [results[label] for label, _, _, _ in CHAIN]
    assert [link["global_step"] for link in links[1:]] == [2, 3, 4]
    losses = links[0]["losses"][:1] + [loss for link in links[1:] for loss in link["losses"]]
    reference_losses, _ = load_reference(reference_paths, "llama")
    assert len(losses) == len(reference_losses) == parity.STEPS
    assert max(abs(a - b) for a, b in zip(losses, reference_losses)) < parity.LOSS_TOLERANCE
    assert links[-1]["weight_error"] < parity.WEIGHT_TOLERANCE
    written_by = [json.loads((path / "meshplan-checkpoint.json").read_text())["world_size"]
                  for path in _chain_checkpoints(folder).values()]
    assert written_by == [processes for _, _, processes, _ in CHAIN]


@pytest.mark.slow
def test_lora_chain_across_layouts_continues_the_unbroken_run(
        two_process_results: dict, one_process_results: dict, reference_paths: dict[str, str], folder: Path) -> None:
    # DeepSpeed ZeRO-3 x 2 -> TP x 2 -> one process, with checkpoints that hold only the adapters.
    results = {**two_process_results, **one_process_results}
    unbroken, tp_link, last_link = (results[label] for label, _, _, _ in LORA_CHAIN)
    _assert_continues_reference(unbroken, reference_paths, first_step=0, model=LORA_MODEL)  # the unbroken run
    assert (tp_link["global_step"], last_link["global_step"]) == (2, parity.STEPS)
    losses = unbroken["losses"][:1] + tp_link["losses"] + last_link["losses"]
    assert max(abs(a - b) for a, b in zip(losses, unbroken["losses"], strict=True)) < parity.LOSS_TOLERANCE
    assert last_link["weight_error"] < parity.WEIGHT_TOLERANCE  # against the one-process reference, frozen base included
    final = torch.load(folder / f"{LORA_CHAIN[-1][0]}.weights.pt", weights_only=True)
    straight = torch.load(folder / f"{LORA_CHAIN[0][0]}.weights.pt", weights_only=True)
    assert max((final[key] - straight[key]).abs().max().item() for key in straight) < parity.WEIGHT_TOLERANCE
    for label, _, processes, _ in LORA_CHAIN[:2]:  # each link's checkpoint: the adapters only, written by its world
        manifest = json.loads((folder / step_checkpoint(label, 1 if label == LORA_RUN["label"] else 2)
                               / "meshplan-checkpoint.json").read_text())
        assert manifest["world_size"] == processes
        model_keys = [key for key in manifest["tensors"] if key.startswith("module/")]  # Lightning saves the module so
        assert model_keys and all(".lora_A." in key or ".lora_B." in key for key in model_keys), model_keys[:3]
        assert manifest["adapters"]["module"]["peft_models"][0]["config"]["peft_type"] == "LORA"


@pytest.mark.slow
@pytest.mark.parametrize(("model", "message"), [
    ("llama", "was saved with peft adapters and holds only their weights"),
    ("llama-tied-lora", "the frozen base model's parameters (names, shapes, tied weights) differ"),
])
def test_a_lora_checkpoint_resumes_only_onto_its_base_model(model: str, message: str, one_process_results: dict) -> None:
    error = one_process_results[f"LoRA-onto-{model}"]["error"]
    assert error.startswith("CheckpointError") and message in error, error


@pytest.mark.slow
def test_zero3_checkpoint_resumes_in_one_process(one_process_results: dict, reference_paths: dict[str, str]) -> None:
    _assert_continues_reference(one_process_results["ZeRO-3->one-process"], reference_paths, first_step=RESUMED_AFTER)


@pytest.mark.slow
def test_four_process_checkpoint_was_written_by_four_ranks(four_process_results: dict, folder: Path) -> None:
    manifest = json.loads((folder / step_checkpoint("TP-2xDP-2", RESUMED_AFTER) / "meshplan-checkpoint.json").read_text())
    assert manifest["world_size"] == 4
    assert sorted(set(manifest["tensors"].values())) == [f"tensors-0000{rank}-of-00004.safetensors" for rank in range(4)]


def _exported_checkpoints(folder: Path) -> dict[str, Path]:
    """Every layout's last checkpoint, and that of each chain link after the first (the ZeRO-3 run), by the
    label of the run that wrote it; the run's weights at that step are in ``folder/label.weights.pt``."""
    last = {label: folder / step_checkpoint(label, parity.STEPS) for label in [*LAYOUTS, *FOUR_PROCESS_LAYOUTS]}
    links = {label: path for label, path in _chain_checkpoints(folder).items() if label != CHAIN[0][0]}
    return {**last, **links}


@pytest.mark.slow
@pytest.mark.parametrize("label", [*LAYOUTS, *FOUR_PROCESS_LAYOUTS, *[label for label, _, _, _ in CHAIN[1:]]])
def test_export_gives_the_trained_model(label: str, one_process_results: dict, folder: Path, tmp_path: Path) -> None:
    out = meshplan.export(_exported_checkpoints(folder)[label], tmp_path / "model")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    exported = LlamaForCausalLM.from_pretrained(out)
    trained = torch.load(folder / f"{label}.weights.pt", weights_only=True)  # gathered by the run at that step
    assert sorted(name for name, _ in exported.named_parameters()) == sorted(trained)
    for name, parameter in exported.named_parameters():
        assert torch.equal(parameter.detach(), trained[name]), name


@pytest.mark.slow
def test_large_export_is_sharded_with_an_index(two_process_results: dict, folder: Path, tmp_path: Path) -> None:
    out = meshplan.export(folder / step_checkpoint("ZeRO-3", parity.STEPS), tmp_path / "model", max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {shard.name for shard in shards}
    assert all(shard.stat().st_size < 40_000 + 20_000 for shard in shards)  # one tensor may overflow a shard
    exported = LlamaForCausalLM.from_pretrained(out)
    trained = torch.load(folder / "ZeRO-3.weights.pt", weights_only=True)
    assert all(torch.equal(p.detach(), trained[name]) for name, p in exported.named_parameters())


# ---------------------------------------------------------------- unsafe and torn checkpoints

MARKER = "unpickled-code-ran"


class _RunsCodeWhenUnpickled:
    """A pickle payload that creates a marker file if anything ever unpickles it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _plant_unsafe_checkpoints(folder: Path) -> dict[str, Path]:
    """A checkpoint whose state.pt is a malicious pickle (manifest updated to match), and a
    Lightning-style pickled .ckpt file with the same payload."""
    planted = folder / "planted"
    shutil.copytree(folder / step_checkpoint("ZeRO-3", RESUMED_AFTER), planted)
    payload = pickle.dumps({"global_step": _RunsCodeWhenUnpickled(folder / MARKER)})
    (planted / "state.pt").write_bytes(payload)
    manifest = json.loads((planted / "meshplan-checkpoint.json").read_text())
    manifest["files"]["state.pt"] = len(payload)
    (planted / "meshplan-checkpoint.json").write_text(json.dumps(manifest))
    pickled_file = folder / "pickled.ckpt"
    pickled_file.write_bytes(payload)
    return {"planted-pickle": planted, "pickled-file": pickled_file}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["planted-pickle", "pickled-file"])
def test_checkpoint_with_a_malicious_pickle_is_refused_without_running_it(name: str, one_process_results: dict,
                                                                          folder: Path) -> None:
    error = one_process_results[name]["error"]
    assert error.startswith("CheckpointError") and ("unpickle" in error or "pickled" in error), error
    assert not (folder / MARKER).exists()


@pytest.mark.slow
def test_a_write_failing_on_one_rank_fails_the_save_on_every_rank(two_process_results: dict, folder: Path) -> None:
    # Rank 1's disk is full: both ranks raise (none waits forever for the other) and nothing is published.
    result = two_process_results["full-disk-on-rank-1"]
    for rank in ("rank 0", "rank 1"):
        assert result[rank].startswith("CheckpointError: saving the checkpoint failed, and nothing was published"), result
        assert "rank 1: [Errno 28] No space left on device" in result[rank]
    assert not result["published"]
    assert latest_checkpoint(folder / "full-disk-on-rank-1") is None


@pytest.mark.slow
def test_torn_checkpoint_is_refused_naming_what_is_missing(two_process_results: dict, folder: Path, tmp_path: Path) -> None:
    torn = tmp_path / "torn"
    shutil.copytree(folder / step_checkpoint("DDP", parity.STEPS), torn)
    (torn / "tensors-00001-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="torn: tensors-00001-of-00002.safetensors is missing"):
        CheckpointReader(torn)
    with pytest.raises(CheckpointError, match="is missing"):
        meshplan.export(torn, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_truncated_file_and_missing_manifest_are_refused(two_process_results: dict, folder: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated"
    shutil.copytree(folder / step_checkpoint("TP-2", parity.STEPS), truncated)
    shard = truncated / "tensors-00000-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"tensors-00000-of-00002.safetensors has \d+ bytes, the manifest says \d+"):
        CheckpointReader(truncated)
    (truncated / "meshplan-checkpoint.json").unlink()
    with pytest.raises(CheckpointError, match="meshplan-checkpoint.json is missing"):
        CheckpointReader(truncated)


@pytest.mark.slow
def test_latest_checkpoint_skips_partial_and_torn_saves(two_process_results: dict, folder: Path, tmp_path: Path) -> None:
    for step in (1, 2, 3):
        shutil.copytree(folder / step_checkpoint("DDP", step), tmp_path / f"step={step}.ckpt")
    (tmp_path / "step=3.ckpt" / "state.pt").unlink()  # torn
    shutil.copytree(folder / step_checkpoint("DDP", 4), tmp_path / ".step=4.ckpt.partial")  # an unpublished save
    assert latest_checkpoint(tmp_path) == str(tmp_path / "step=2.ckpt")


# ---------------------------------------------------------------- crashes under torchrun

TORCHRUN = Path(sys.executable).with_name("torchrun")
FAULT_SCRIPT = Path(__file__).parent / "scripts" / "fault_train.py"


def _torchrun(folder: Path, *arguments: str) -> str:
    folder.mkdir(parents=True)
    command = [str(TORCHRUN), "--nproc-per-node", "2", "--max-restarts", "2", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{free_port()}", str(FAULT_SCRIPT), str(folder), *arguments]
    # torchrun's c10d rendezvous shares its store with the workers by default, and restarted
    # workers can then read the dead attempt's addresses and hang (pytorch/pytorch#135712).
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    process = subprocess.run(command, capture_output=True, text=True, timeout=400, env=environment)
    assert process.returncode == 0, (process.stdout + process.stderr)[-4000:]
    return process.stdout + process.stderr


@pytest.mark.slow
def test_killed_ranks_restart_and_resume_to_the_uninterrupted_weights(tmp_path: Path, deepspeed_ops: None) -> None:
    _torchrun(tmp_path / "uninterrupted", "zero2")
    _torchrun(tmp_path / "killed", "zero2", "--kill")
    attempts = [json.loads(line) for line in (tmp_path / "killed" / "attempts.jsonl").read_text().splitlines()]
    # Killed mid-training at step 3, then mid-save of the step-3 checkpoint: both times the job
    # went on from the step-2 checkpoint, the last one complete.
    assert attempts == [{"attempt": 0, "resumed_from": None}, {"attempt": 1, "resumed_from": "step=2.ckpt"},
                        {"attempt": 2, "resumed_from": "step=2.ckpt"}]
    uninterrupted = torch.load(tmp_path / "uninterrupted" / "weights.pt", weights_only=True)
    killed = torch.load(tmp_path / "killed" / "weights.pt", weights_only=True)
    assert max((killed[key] - uninterrupted[key]).abs().max().item() for key in uninterrupted) < 1e-6
    assert latest_checkpoint(tmp_path / "killed" / "checkpoints").endswith(f"step={parity.STEPS}.ckpt")


# ---------------------------------------------------------------- the export command


@pytest.mark.slow
def test_export_command_writes_a_model_and_refuses_bad_input(two_process_results: dict, folder: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(folder / step_checkpoint("TP-2", parity.STEPS)), str(tmp_path / "model")]) == 0
    assert LlamaForCausalLM.from_pretrained(tmp_path / "model") is not None
    capsys.readouterr()  # from_pretrained's progress bar
    assert main(["export", str(folder / "no-such-checkpoint"), str(tmp_path / "other")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("meshplan export: no checkpoint at") and len(error.splitlines()) == 1
    assert main(["export", str(folder / step_checkpoint("TP-2", parity.STEPS)), str(tmp_path / "model")]) == 2  # not empty
    assert "already exists" in capsys.readouterr().err


def test_export_of_a_checkpoint_without_a_pretrained_model_says_so_and_how_to_read_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # One process writes it with the function both front ends save through; no launcher needed.
    torch.manual_seed(0)
    saved = save_training_state(tmp_path / "plain", {"module": torch.nn.Linear(3, 2)}, {}, state={})
    with pytest.raises(CheckpointError) as error:
        meshplan.export(saved, tmp_path / "out")
    message = str(error.value)
    assert "holds no transformers PreTrainedModel (export writes only those" in message
    assert "its models ('module') are plain torch modules" in message
    assert "meshplan.checkpoint.load_training_state(path, {'module': module}, {})" in message
    assert "model=PREFIX" not in message  # naming a model cannot help
    assert not (tmp_path / "out").exists()
    assert main(["export", str(saved), str(tmp_path / "out")]) == 2
    refusal = capsys.readouterr().err.strip()
    assert refusal.startswith("meshplan export: ") and "holds no transformers PreTrainedModel" in refusal
    assert len(refusal.splitlines()) == 1
    # The advice works: the tensors load back into a module of the same shape.
    with CheckpointReader(saved) as reader:
        assert reader.keys() == ["module/weight", "module/bias"]
    torch.manual_seed(1)
    module = torch.nn.Linear(3, 2)
    load_training_state(saved, {"module": module}, {})
    torch.manual_seed(0)
    assert torch.equal(module.weight, torch.nn.Linear(3, 2).weight)


def test_a_sharded_layout_meshplan_cannot_cut_is_refused_before_anything_is_loaded(tmp_path: Path) -> None:
    # A Partial placement holds a sum still to be reduced, no part of the whole tensor: loading into it
    # would leave wrong values. One process, its own group: DTensors need a mesh, no spawn.
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    torch.manual_seed(0)
    saved_module = torch.nn.Linear(4, 2)
    saved = save_training_state(tmp_path / "checkpoint", {"module": saved_module}, {}, state={})
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        module = torch.nn.Linear(4, 2)
        module.bias = torch.nn.Parameter(distribute_tensor(torch.zeros(2), mesh, [Shard(0)]))
        module.weight = torch.nn.Parameter(DTensor.from_local(torch.zeros(2, 4), mesh, [Partial()]))
        with pytest.raises(CheckpointError, match=r"into module/weight: a DTensor placed \(Partial\(sum\),\) .* is not a "
                                                  r"layout meshplan can load"):
            load_training_state(saved, {"module": module}, {})
        assert torch.equal(module.bias.full_tensor(), torch.zeros(2))  # nothing was loaded
        module.weight = torch.nn.Parameter(distribute_tensor(torch.zeros(2, 4), mesh, [Shard(1)]))
        load_training_state(saved, {"module": module}, {})
        assert torch.equal(module.weight.full_tensor(), saved_module.weight.detach())
        assert torch.equal(module.bias.full_tensor(), saved_module.bias.detach())
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- Accelerate's automatic checkpoint naming


@pytest.mark.slow  # trains the tiny model in this process
def test_accelerate_automatic_naming_keeps_total_limit_and_loads_the_latest(tmp_path: Path) -> None:
    from meshplan._compat.accelerate import reset_process_state
    from accelerate.utils import ProjectConfiguration

    project = ProjectConfiguration(project_dir=str(tmp_path), automatic_checkpoint_naming=True, total_limit=2)
    accelerator = meshplan.accelerator(meshplan.DDP(), project_config=project)  # one process, no launcher
    try:
        model = parity.build_model("llama")
        optimizer = torch.optim.AdamW(model.parameters(), lr=parity.LEARNING_RATE["llama"], eps=parity.ADAM_EPS)
        model, optimizer = accelerator.prepare(model, optimizer)
        batch = parity.TokenDataset("llama")[0]
        batch = {key: value.unsqueeze(0) for key, value in batch.items()}
        saved = []
        for _ in range(3):
            accelerator.backward(model(**batch).loss)
            optimizer.step()
            optimizer.zero_grad()
            saved.append(accelerator.save_state())
            weights = {name: p.detach().clone() for name, p in model.named_parameters()}
        assert [Path(path).name for path in saved] == ["checkpoint_0", "checkpoint_1", "checkpoint_2"]
        assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint_1", "checkpoint_2"]
        accelerator.backward(model(**batch).loss)
        optimizer.step()
        accelerator.load_state()  # the latest: checkpoint_2
        assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())
        assert all(torch.equal(optimizer.state[p]["step"], torch.tensor(3.0)) for p in model.parameters())
    finally:
        reset_process_state()
