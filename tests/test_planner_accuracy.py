"""meshplan.estimate against what real engines hold and send, on 2 CPU processes.

One launch of tests/scripts/planner_measure.py trains a Llama-style decoder under ddp, ZeRO-2,
ZeRO-3, ZeRO-3 and ZeRO-2 on FSDP2, and TP through meshplan.accelerator, and the same decoder with
LoRA adapters on q and v (its base frozen) under ZeRO-2, ZeRO-3 and TP, measures one step, and each
figure is compared with the estimate for the same model and settings. The full matrix (a BERT-style encoder too, every
layout, TP x FSDP2 at 4 processes, two sequence lengths, with and without checkpointing) is
bench/planner_accuracy.py; its figures are in docs/planning.md.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

WORKER = Path(__file__).parent / "scripts" / "planner_measure.py"
LAYOUTS = ("ddp", "zero2", "zero3", "fsdp2", "fsdp2-stage2", "tp")
# LoRA where the engines differ most: ZeRO-2 keeps the frozen base whole, ZeRO-3 partitions it, TP splits it.
LORA_LAYOUTS = ("zero2", "zero3", "tp")
ARGUMENTS = ["--nprocs", "2", "--families", "llama,llama-lora", "--family-layouts", f"llama-lora={','.join(LORA_LAYOUTS)}",
             "--layouts", ",".join(LAYOUTS), "--precision", "bf16", "--seq-len", "64",
             "--zero-option", "reduce_bucket_size=1000000", "--zero-option", "stage3_prefetch_bucket_size=1000000"]
# The issue's bounds: model states within 3%, bytes sent within 5%, the peak of a step within 15%.
TOLERANCES = {"states": 0.03, "sent": 0.05, "peak": 0.15}


@pytest.fixture(scope="module")
def worker() -> Any:
    """tests/scripts/planner_measure.py as a module: its models and its comparisons with the estimate."""
    spec = importlib.util.spec_from_file_location("planner_measure", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory, deepspeed_ops: None) -> list[dict[str, Any]]:
    output = tmp_path_factory.mktemp("planner") / "measured.json"
    finished = subprocess.run([sys.executable, str(WORKER), str(output), *ARGUMENTS], capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return json.loads(output.read_text())["records"]


@pytest.fixture(scope="module")
def rows(records: list[dict[str, Any]], worker: Any) -> list[dict[str, Any]]:
    return worker.comparisons(records, worker._arguments(["unused.json", *ARGUMENTS]))


def test_every_layout_and_family_was_measured_on_every_rank(rows):
    assert {(r["family"], r["layout"], r["rank"]) for r in rows} == {
        *((family, layout, rank) for family in ("llama",) for layout in LAYOUTS for rank in (0, 1)),
        *(("llama-lora", layout, rank) for layout in LORA_LAYOUTS for rank in (0, 1))}


@pytest.mark.parametrize("quantity", ["states", "sent", "peak"])
def test_the_estimate_is_within_the_issues_bounds_of_what_was_measured(rows, quantity):
    outside = [f"{r['family']} {r['layout']} rank {r['rank']}: measured {r[quantity]}, estimated {r[quantity + '_estimate']} "
               f"({r[quantity + '_error']:+.1%})" for r in rows if abs(r[f"{quantity}_error"]) > TOLERANCES[quantity]]
    assert not outside, "\n".join(outside)


def test_the_layouts_really_differ_so_the_comparison_can_see_a_wrong_formula(rows):
    # ZeRO-3 (on either engine) and TP hold about half of DDP's 16 bytes a parameter on 2 processes:
    # an estimate that ignored the layout would be off by far more than 3%. FSDP2's stage 3 gathers
    # the weights twice a step, its stage 2 once: 3 and 2 fp32 copies of the model sent.
    states = {r["layout"]: r["states"] for r in rows if r["family"] == "llama" and r["rank"] == 0}
    sent = {r["layout"]: r["sent"] for r in rows if r["family"] == "llama" and r["rank"] == 0}
    assert all(states[layout] < 0.6 * states["ddp"] for layout in ("zero3", "fsdp2", "fsdp2-stage2", "tp"))
    assert sent["fsdp2"] == pytest.approx(1.5 * sent["fsdp2-stage2"], rel=1e-6)


def test_under_lora_zero_2_keeps_optimizer_states_for_the_adapters_share_alone(records, worker):
    # The issue's bound: at most 1.10 x 12 bytes (fp32 master copy and two AdamW moments) x the
    # trainable parameters / N; the frozen base, 99% of the model, carries none.
    model = worker.build_model("llama-lora", worker._arguments(["unused.json", *ARGUMENTS]), 64)
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    assert trainable < sum(parameter.numel() for parameter in model.parameters()) / 100
    held = [r["optimizer_states"] for r in records if r["family"] == "llama-lora" and r["layout"] == "zero2"]
    assert held and all(12 * trainable / 2 <= states <= 1.10 * 12 * trainable / 2 for states in held)
