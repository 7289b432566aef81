"""Tier 3: `meshplan finetune` as a user runs it, and its answers to bad input.

Each run starts its own 2 workers, trains the packaged MiniLM on the packaged reviews for a
few steps, and must leave metrics.json and a model directory that `from_pretrained` loads and
that, evaluated on the same held-out split, reproduces the reported accuracy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from meshplan.checkpoint import latest_checkpoint
from meshplan.cli import main
from meshplan.finetune.data import find_columns, load_splits
from meshplan.finetune.evaluate import accuracy
from meshplan.finetune.job import plan_from_json, plan_to_json
from meshplan.models import minilm_path
from meshplan.plan import Plan
from meshplan.recipes import CATALOGUE_DIR

MESHPLAN = Path(sys.executable).with_name("meshplan")
STEPS = 3

# Every front end, and every one of the recipes ddp, zero2, zero3 and tp (tests/test_examples.py
# runs Accelerate with zero2 and the Trainer with ddp and zero2 in users' own scripts). A run costs
# about a minute, mostly start-up and evaluation, so the restart and resume tests below reuse two
# of these runs: their extra arguments are the ones those tests need.
RUNS = {
    ("lightning", "zero2"): ["--max-steps", "6", "--checkpoint-every", "2"],  # the uninterrupted run of the killed one
    ("lightning", "tp"): ["--max-steps", str(STEPS)],
    ("accelerate", "zero3"): ["--max-steps", str(STEPS), "--checkpoint-every", "2"],  # the resume test's first run
    ("trainer", "ddp"): ["--max-steps", str(STEPS), "--verbose"],  # the one run that shows the engines' output
}
# Lines of the engines that a user cannot act on: they belong in the log file, not on the console.
ENGINE_NOISE = ["Setting accelerator to CPU", "deepspeed_shm_comm_op", "litlogger", "Epoch 0/-2", "GPU available"]


def _finetune(*arguments: str, timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run([str(MESHPLAN), "finetune", *arguments], capture_output=True, text=True, timeout=timeout)


class _FinishedRuns:
    """The RUNS, each run once, when a test first asks for it, into a folder of this module's."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.runs: dict[tuple[str, str], tuple[subprocess.CompletedProcess, Path]] = {}

    def __call__(self, framework: str, recipe: str) -> tuple[subprocess.CompletedProcess, Path]:
        """The console and the output folder of the RUNS entry; the caller must not change the folder."""
        if (framework, recipe) not in self.runs:
            output = self.folder / f"{framework}-{recipe}"
            run = _finetune("--framework", framework, "--recipe", str(CATALOGUE_DIR / f"{recipe}.yaml"),
                            *RUNS[framework, recipe], "--output", str(output))
            assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
            self.runs[framework, recipe] = run, output
        return self.runs[framework, recipe]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> _FinishedRuns:
    return _FinishedRuns(tmp_path_factory.mktemp("finetune-runs"))


def _steps(framework: str, recipe: str) -> int:
    arguments = RUNS[framework, recipe]
    return int(arguments[arguments.index("--max-steps") + 1])


@pytest.mark.slow
@pytest.mark.parametrize(("framework", "recipe"), list(RUNS), ids=[f"{framework}-{recipe}" for framework, recipe in RUNS])
def test_finetune_trains_and_saves_a_loadable_model(framework: str, recipe: str, finished_run: _FinishedRuns) -> None:
    run, output = finished_run(framework, recipe)
    steps = _steps(framework, recipe)
    _assert_console(run.stdout + run.stderr, output, steps, verbose="--verbose" in RUNS[framework, recipe])
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["train_steps"] == steps
    assert metrics["samples_per_second"] > 0
    assert metrics["recipe"].endswith(f"{recipe}.yaml") and metrics["framework"] == framework
    assert "held-out accuracy: before" in run.stdout
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (output / name).is_file(), name
    model = AutoModelForSequenceClassification.from_pretrained(output)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    test = _encoded_test_split(output)
    reproduced = accuracy(model, test, dp_rank=0, dp_size=1, batch_size=32, device=torch.device("cpu"))
    # TP sums partial results in another order: a borderline sample may flip.
    assert abs(reproduced - metrics["eval_accuracy_after"]) <= 1 / len(test) + 1e-9


def _assert_console(console: str, output: Path, steps: int, *, verbose: bool) -> None:
    """meshplan's own lines and one progress bar on the console; the engines' lines in the log, or shown with --verbose."""
    log = output / "meshplan-finetune.log"
    assert f"{steps}/{steps} steps" in console and "loss " in console and "samples/s" in console
    assert "measuring held-out accuracy before training" in console
    if verbose:
        assert not log.exists()
        assert "Loading weights" in console  # the workers' own output (transformers' loading bar), shown
        return
    noise = [line for line in ENGINE_NOISE if line in console]
    assert not noise, f"engine output on the console: {noise}"
    assert "[WARNING]" not in console and "Traceback" not in console
    assert "Loading weights" in log.read_text()  # the workers' own output went where a user can read it


def _encoded_test_split(model_dir: Path):
    from meshplan.finetune.data import encode, label_names

    splits = load_splits(None)
    text, label = find_columns(splits["train"], "classification", None)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return encode(splits, tokenizer, text, label, label_names(splits, label, None), 48)["test"]


@pytest.mark.slow
def test_lora_finetune_learns_the_task_and_leaves_an_adapter_and_a_merged_model(tmp_path: Path) -> None:
    # The default run with --lora (MiniLM, the reviews, ZeRO-2 under Lightning, 100 steps): issue 14 asks for
    # 0.85 held-out accuracy within 5 minutes on 2 cores; it takes 1 to 2.5 (0.54 -> 0.95).
    output = tmp_path / "out"
    run = _finetune("--lora", "--output", str(output), timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    _assert_console(run.stdout + run.stderr, output, 100, verbose=False)  # the merge's library output went to the log too
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["eval_accuracy_after"] >= 0.85 and metrics["learning_rate"] == 1e-3
    adapter = output / "adapter"
    lora = metrics["lora"]
    assert (lora["r"], lora["alpha"], lora["targets"], lora["adapter"]) == (8, 16, "q,v", str(adapter))
    # Only the adapters and the head train: about 0.3% of MiniLM's 22.7M weights, in a file of about 0.3 MB.
    assert 0 < lora["trainable_parameters"] < 100_000
    assert lora["adapter_bytes"] == sum(path.stat().st_size for path in adapter.iterdir()) < 2**20
    assert "LoRA adapter" in run.stdout and str(adapter) in run.stdout
    # The model path is a whole model, as without --lora; the adapter loads onto the base with peft.
    merged = AutoModelForSequenceClassification.from_pretrained(output)
    assert merged.config.id2label == {0: "negative", 1: "positive"}
    test = _encoded_test_split(output)
    reproduced = accuracy(merged, test, dp_rank=0, dp_size=1, batch_size=32, device=torch.device("cpu"))
    assert abs(reproduced - metrics["eval_accuracy_after"]) <= 1 / len(test) + 1e-9
    from peft import PeftModel

    adapted = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2), adapter)
    batch = test[:32]
    with torch.no_grad():
        logits = [model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                  for model in (merged, adapted)]
    torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_a_failing_worker_shows_its_traceback_from_this_run(tmp_path: Path) -> None:
    model_dir = tmp_path / "torn-model"
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=30522)).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(model_dir)
    (model_dir / "model.safetensors").write_bytes(b"not a safetensors file")  # the config is fine: the workers start
    data = tmp_path / "notes.json"
    data.write_text("\n".join(json.dumps({"text": f"note {i}"}) for i in range(20)))
    output = tmp_path / "out"
    output.mkdir()
    (output / "meshplan-finetune.log").write_text("Traceback: an earlier run's failure\n")
    run = _finetune("--model", str(model_dir), "--data", str(data), "--recipe", str(CATALOGUE_DIR / "ddp.yaml"),
                    "--max-steps", "2", "--output", str(output))
    assert run.returncode not in (0, 2), run.stderr[-3000:]
    assert "a worker failed" in run.stderr and "Traceback (most recent call last)" in run.stderr
    assert "safetensors" in run.stderr.split("a worker failed", 1)[1]  # the cause, from this run's log
    assert "an earlier run's failure" not in run.stderr


@pytest.mark.slow
def test_ctrl_c_stops_every_worker(tmp_path: Path) -> None:
    process = subprocess.Popen([str(MESHPLAN), "finetune", "--max-steps", "100000", "--output", str(tmp_path / "out")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    pids = _worker_pids(process)
    # Keep reading what it prints: a full pipe would block it on a write, as no terminal ever does.
    printed: list[str] = []
    reader = threading.Thread(target=lambda: printed.extend(process.stderr), daemon=True)
    reader.start()
    time.sleep(15)  # the workers are importing, loading or training by now
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("meshplan finetune did not stop within 30 s of Ctrl-C; it printed:\n" + "".join(printed)[-2000:])
    reader.join(timeout=5)
    assert process.returncode == 130
    for pid in pids:
        assert not _alive(pid), f"worker {pid} outlived Ctrl-C"


def _worker_pids(process: subprocess.Popen) -> list[int]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        match = re.search(r"started \d+ workers \(pids ([\d ]+)\)", line)
        if match:
            return [int(pid) for pid in match.group(1).split()]
    process.kill()
    pytest.fail("meshplan finetune never reported its workers")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent has not read its status yet.
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


@pytest.fixture()
def tiny_llama_dir(tmp_path: Path) -> Path:
    """A model whose single key/value head cannot be split two ways."""
    model_dir = tmp_path / "one-kv-head"
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=1, vocab_size=64)).save_pretrained(model_dir)
    return model_dir


def _bad_input_cases(tmp_path: Path, tiny_llama_dir: Path) -> dict[str, tuple[list[str], str]]:
    (tmp_path / "broken.yaml").write_text("distributed_type: [unclosed\n")
    (tmp_path / "no-label.csv").write_text("text,score\nfine,1\nbad,0\n")
    (tmp_path / "fsdp2-layers.yaml").write_text((CATALOGUE_DIR / "fsdp2.yaml").read_text().replace(
        "fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP", "fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n"
                                                         "  fsdp_transformer_layer_cls_to_wrap: NoSuchLayer"))
    return {
        "missing recipe": (["--recipe", str(tmp_path / "nope.yaml")], "does not exist"),
        "unparsable recipe": (["--recipe", str(tmp_path / "broken.yaml")], "is not valid YAML"),
        "unknown model": (["--model", str(tmp_path / "no-such-model")], "is not a model directory"),
        "data without labels": (["--data", str(tmp_path / "no-label.csv")], "has no label column"),
        "tp size the model cannot take": (["--model", str(tiny_llama_dir), "--recipe", str(CATALOGUE_DIR / "tp.yaml"),
                                           "--data", str(tmp_path / "no-label.csv")],
                                          "tp_size=2 does not divide num_key_value_heads=1"),
        "more devices than the machine has": (["--devices", "4096"], "--devices 4096 is more than this machine has"),
        "no devices": (["--devices", "0"], "--devices 0 must be at least 1"),
        "restarts under the HF Trainer": (["--framework", "trainer", "--max-restarts", "1"],
                                          "need --framework lightning or accelerate"),
        "restarts without checkpoints": (["--max-restarts", "2", "--checkpoint-every", "0"],
                                         "--max-restarts 2 needs checkpoints to resume from"),
        "negative checkpoint interval": (["--checkpoint-every", "-1"], "cannot be negative"),
        "fsdp2 layer classes the model lacks": (["--recipe", str(tmp_path / "fsdp2-layers.yaml")],
                                                "fsdp_layer_classes='NoSuchLayer' names NoSuchLayer"),
        "fsdp2 under the HF Trainer on the CPU": (["--framework", "trainer", "--recipe", "fsdp2"],
                                                  "cannot run under the HF Trainer on the CPU"),
        "lora target the model lacks": (["--lora", "--lora-targets", "q,gate"], "LoRA target 'gate' matches no nn.Linear"),
        "lora rank 0": (["--lora", "--lora-r", "0"], "--lora-r 0 and --lora-alpha 16 must be at least 1"),
        "lora option without --lora": (["--lora-targets", "q,k,v"], "--lora-targets sets up LoRA adapters and needs --lora"),
    }


@pytest.mark.parametrize("case", ["missing recipe", "unparsable recipe", "unknown model", "data without labels",
                                  "tp size the model cannot take", "more devices than the machine has", "no devices",
                                  "restarts under the HF Trainer", "restarts without checkpoints",
                                  "negative checkpoint interval", "fsdp2 layer classes the model lacks",
                                  "fsdp2 under the HF Trainer on the CPU", "lora target the model lacks", "lora rank 0",
                                  "lora option without --lora"])
def test_bad_input_exits_2_with_one_paragraph(case: str, tmp_path: Path, tiny_llama_dir: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    if case == "fsdp2 under the HF Trainer on the CPU" and torch.cuda.is_available():
        pytest.skip("the HF Trainer runs FSDP2 on GPUs")
    arguments, expected = _bad_input_cases(tmp_path, tiny_llama_dir)[case]
    assert main(["finetune", *arguments, "--output", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert expected in error
    assert "Traceback" not in error
    assert error.count("\n") == 1  # one paragraph, one line
    assert not (tmp_path / "out").exists()  # nothing started


@pytest.mark.parametrize("plan", [Plan.build("zero", zero_stage=2, engine="fsdp2", options={"fsdp_layer_classes": "BertLayer"}),
                                  Plan.build("tp", tp_size=2, data_parallel="shard")], ids=["fsdp2", "tp-fsdp"])
def test_a_chosen_layout_reaches_the_workers_whole(plan: Plan) -> None:
    # What meshplan finetune --recipe auto writes into the job file for its workers.
    assert plan_from_json(json.loads(json.dumps(plan_to_json(plan)))) == plan


@pytest.mark.slow
def test_the_console_script_exits_2_without_a_traceback(tmp_path: Path) -> None:
    run = _finetune("--recipe", str(tmp_path / "nope.yaml"), "--output", str(tmp_path / "out"), timeout=120)
    assert run.returncode == 2
    assert "does not exist" in run.stderr and "Traceback" not in run.stderr


def _weights(output: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(output / "model.safetensors")


def _run_and_kill_a_worker_after_a_checkpoint(arguments: list[str], output: Path, timeout: float = 420) -> str:
    """Starts `meshplan finetune`, SIGKILLs its second worker once a checkpoint exists, returns the console."""
    log = output.with_suffix(".console")
    with open(log, "w") as console:
        process = subprocess.Popen([str(MESHPLAN), "finetune", *arguments, "--output", str(output)],
                                   stdout=console, stderr=console, text=True)
        deadline = time.monotonic() + timeout
        try:
            while latest_checkpoint(output / "checkpoints") is None:
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
            pids = re.search(r"started 2 workers \(pids (\d+) (\d+)\)", log.read_text())
            os.kill(int(pids.group(2)), signal.SIGKILL)
            assert process.wait(timeout=max(1.0, deadline - time.monotonic())) == 0, log.read_text()[-3000:]
        finally:
            if process.poll() is None:
                process.kill()
    return log.read_text()


@pytest.mark.slow
def test_killed_worker_is_restarted_and_the_run_ends_as_if_uninterrupted(tmp_path: Path,
                                                                         finished_run: _FinishedRuns) -> None:
    _, uninterrupted = finished_run("lightning", "zero2")
    arguments = ["--framework", "lightning", "--recipe", str(CATALOGUE_DIR / "zero2.yaml"), *RUNS["lightning", "zero2"]]
    log = _run_and_kill_a_worker_after_a_checkpoint([*arguments, "--max-restarts", "1"], tmp_path / "killed")
    assert "restarting every worker (1 of 1 restarts)" in log
    metrics = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    steps = _steps("lightning", "zero2")
    # The bar counts out of all steps throughout; after the restart it goes on from the checkpoint's step, one at a time.
    assert all(total == str(steps) for _, total in re.findall(r"(\d+)/(\d+) steps", log))
    # The resumed run's bar starts fresh ("[00:00<?]": no rate yet). Redraws of the killed run's bar
    # may come before it, at a step below or above the checkpoint's.
    after_restart = log.split("restarting every worker", 1)[1]
    fresh_bar = after_restart.rfind("training: ", 0, after_restart.rfind("<?]"))
    resumed = [int(done) for done in re.findall(rf"(\d+)/{steps} steps", after_restart[fresh_bar:])]
    assert resumed[0] == metrics["resumed_at_step"] and resumed[-1] == steps
    assert all(later - earlier in (0, 1) for earlier, later in zip(resumed, resumed[1:]))
    assert metrics["train_steps"] == steps and 0 < metrics["resumed_at_step"] < steps
    expected, actual = _weights(uninterrupted), _weights(tmp_path / "killed")
    assert max((actual[name] - expected[name]).abs().max().item() for name in expected) < 1e-6
    before = json.loads((uninterrupted / "metrics.json").read_text())["eval_accuracy_before"]
    assert metrics["eval_accuracy_before"] == before  # measured once, before the first step, and checkpointed


@pytest.mark.slow
def test_accelerate_front_end_resumes_from_its_latest_checkpoint(tmp_path: Path, finished_run: _FinishedRuns) -> None:
    _, first = finished_run("accelerate", "zero3")  # 3 steps, a checkpoint at step 2
    output = tmp_path / "out"
    shutil.copytree(first, output)
    before = json.loads((output / "metrics.json").read_text())["eval_accuracy_before"]
    second = _finetune("--framework", "accelerate", "--recipe", str(CATALOGUE_DIR / "zero3.yaml"),
                       "--checkpoint-every", "2", "--max-steps", "4", "--output", str(output))  # goes on from step=2
    assert second.returncode == 0, second.stderr[-3000:]
    metrics = json.loads((output / "metrics.json").read_text())
    assert (metrics["train_steps"], metrics["resumed_at_step"]) == (4, 2)
    assert metrics["eval_accuracy_before"] == before  # restored from the checkpoint, not measured again
