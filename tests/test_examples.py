"""Tier 3: the scripts in examples/, launched as examples/README.md says, for a few steps each.

Each run must exit 0, print its layout, world size, steps, training loss and held-out accuracy
before and after, write nothing outside its --output, and leave a model directory that
`from_pretrained` loads with the two review labels and that, evaluated here on the same
held-out reviews, reproduces the accuracy the run printed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from datasets import load_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from meshplan.models import minilm_path
from meshplan.recipes import CATALOGUE_DIR

pytestmark = pytest.mark.slow  # each example trains in a process of its own

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BIN = Path(sys.executable).parent  # the virtual environment's python, accelerate and torchrun
STEPS = 2
MAX_LENGTH = 48  # as the examples tokenize
TIMEOUT = 300


@dataclass(frozen=True)
class Run:
    """One launch of one example, and what it must print."""

    command: tuple[str, ...]
    layout: str  # a part of the printed "layout:" line
    world_size: int
    eval_samples: int = 32


RUNS = {
    # 32 samples: one validation batch per process, before and after fit (the case that once
    # broke ZeRO-3's first training step; tests/conformance_lightning.py checks it too).
    "lightning-zero3": Run((sys.executable, str(EXAMPLES / "lightning_finetune.py"), "--recipe", "zero3"),
                           "zero_stage=3", 2),
    "accelerate-zero2": Run((str(BIN / "accelerate"), "launch", "--config_file", str(CATALOGUE_DIR / "zero2.yaml"),
                             "--num_processes", "2", str(EXAMPLES / "accelerate_finetune.py")), "ZeRO stage 2", 2),
    "trainer-zero2-torchrun": Run((str(BIN / "torchrun"), "--nproc-per-node", "2", str(EXAMPLES / "trainer_finetune.py"),
                                   "--recipe", "zero2"), "zero_stage=2", 2),
    # A plain `python` process, no launcher: DDP trains as a world of one (ZeRO needs a launcher).
    "trainer-ddp-one-process": Run((sys.executable, str(EXAMPLES / "trainer_finetune.py"), "--recipe", "ddp"),
                                   "strategy='ddp'", 1),
}
ACCURACY_LINE = re.compile(r"held-out accuracy \((\d+) reviews\): before (\d\.\d+), after (\d\.\d+)")


@pytest.mark.parametrize("name", list(RUNS))
def test_example_fine_tunes_and_saves_a_loadable_model(name: str, tmp_path: Path, deepspeed_ops: None) -> None:
    run = RUNS[name]
    output = tmp_path / "out"
    process = subprocess.run(
        [*run.command, "--max-steps", str(STEPS), "--eval-samples", str(run.eval_samples), "--output", str(output)],
        cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    printed = process.stdout
    assert run.layout in _line(printed, "layout:")
    assert f"world size: {run.world_size}\n" in printed
    assert re.search(rf"^steps: {STEPS}\b", printed, re.MULTILINE) and "training loss" in printed
    accuracy = ACCURACY_LINE.search(printed)
    assert accuracy is not None, printed[-3000:]
    assert int(accuracy[1]) == run.eval_samples
    assert 0.0 <= float(accuracy[2]) <= 1.0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"], "the example wrote outside its --output"
    model = AutoModelForSequenceClassification.from_pretrained(output / "model")
    assert model.config.id2label == {0: "negative", 1: "positive"}
    # The saved weights are the trained ones, whole: moved from the pretrained MiniLM's, and
    # reproducing the printed accuracy (a sample on the edge may flip with the batch's summation order).
    pretrained = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    assert not torch.equal(_query_weight(model), _query_weight(pretrained))
    reproduced = _accuracy(model, AutoTokenizer.from_pretrained(output / "model"), run.eval_samples)
    assert abs(reproduced - float(accuracy[3])) <= 1 / run.eval_samples + 1e-3


def _line(printed: str, prefix: str) -> str:
    """The first printed line that starts with ``prefix``."""
    return next((line for line in printed.splitlines() if line.startswith(prefix)), f"no line starts with {prefix!r}")


def _query_weight(model: torch.nn.Module) -> torch.Tensor:
    return model.bert.encoder.layer[0].attention.self.query.weight


@torch.no_grad()
def _accuracy(model: torch.nn.Module, tokenizer, samples: int) -> float:
    """Accuracy on the first ``samples`` held-out reviews, tokenized as the examples tokenize them."""
    reviews = load_dataset("csv", data_files=str(files("meshplan") / "data" / "reviews-test.csv"))["train"]
    reviews = reviews.select(range(samples))
    inputs = tokenizer(list(reviews["text"]), truncation=True, padding="max_length", max_length=MAX_LENGTH,
                       return_tensors="pt")
    predictions = model.eval()(**inputs).logits.argmax(-1)
    return (predictions == torch.tensor(list(reviews["label"]))).float().mean().item()
