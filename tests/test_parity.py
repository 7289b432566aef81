"""Every strategy trains the same model to the same losses and weights as one process.

Two spawns carry all the runs (process start-up dominates the cost): one of 2 workers for
DDP, ZeRO 1/2/3, ZeRO-3 with offload, TP 2 and every registered strategy name, and one of 4
workers for TP 2 x DP 2. Each case is then checked by its own test.
"""

from __future__ import annotations

import pytest

import meshplan
import parity
from conftest import load_reference
from meshplan.recipes import CATALOGUE_DIR
from meshplan.testing import spawn
from parity import CLIP, Case

TWO_PROCESS_CASES = [
    *(
        case
        for model in ("llama", "minilm")
        for case in (
            Case(model, "DDP", meshplan.DDP(), 4),
            Case(model, "ZeRO-1", meshplan.ZeRO(stage=1), 4),
            Case(model, "ZeRO-2", meshplan.ZeRO(stage=2), 4),
            Case(model, "ZeRO-3", meshplan.ZeRO(stage=3), 4),
            Case(model, "ZeRO-3-offload", meshplan.ZeRO(stage=3, offload_optimizer=True, offload_parameters=True), 4),
            Case(model, "TP-2", meshplan.TensorParallel(tp_size=2), 8),
        )
    ),
    # The registered names, as Trainer(strategy="...") resolves them; meshplan_tp takes both processes.
    *(Case("llama", name, name, 8 if name == "meshplan_tp" else 4) for name in meshplan.lightning.REGISTERED_STRATEGIES),
    # Gradient clipping: Lightning clips for DDP and TP (on DTensors), DeepSpeed clips inside the engine.
    Case("llama", "DDP-clip", meshplan.DDP(), 4, clip=CLIP),
    Case("llama", "ZeRO-2-clip", meshplan.ZeRO(stage=2), 4, clip=CLIP),
    Case("llama", "ZeRO-3-clip", meshplan.ZeRO(stage=3), 4, clip=CLIP),
    Case("llama", "TP-2-clip", meshplan.TensorParallel(tp_size=2), 8, clip=CLIP),
    # Tied embeddings stay whole (and tied) under TP; ZeRO-3 partitions the shared weight once.
    Case("llama-tied", "TP-2", meshplan.TensorParallel(tp_size=2), 8),
    Case("llama-tied", "ZeRO-3", meshplan.ZeRO(stage=3), 4),
    # The catalogue's recipes in the Lightning Trainer, through meshplan.from_recipe.
    *(
        Case("llama", f"recipe-{name}", meshplan.from_recipe(CATALOGUE_DIR / f"{name}.yaml"), 8 if name == "tp" else 4)
        for name in ("ddp", "zero1", "zero2", "zero3", "zero3-offload", "tp")
    ),
]

FOUR_PROCESS_CASES = [
    Case("llama", "TP-2xDP-2", meshplan.TensorParallel(tp_size=2), 4),
    Case("minilm", "TP-2xDP-2", meshplan.TensorParallel(tp_size=2), 4),
    Case("llama", "TP-2xDP-2-clip", meshplan.TensorParallel(tp_size=2), 4, clip=CLIP),
    Case("llama", "recipe-tp-dp", meshplan.from_recipe(CATALOGUE_DIR / "tp-dp.yaml"), 4),
    Case("llama-tied", "TP-2xDP-2", meshplan.TensorParallel(tp_size=2), 4),
]


@pytest.fixture(scope="module")
def two_process_results(reference_paths: dict[str, str], deepspeed_ops: None) -> dict:
    return spawn(parity.run_cases, 2, TWO_PROCESS_CASES, reference_paths, timeout=900)[0]


@pytest.fixture(scope="module")
def four_process_results(reference_paths: dict[str, str]) -> dict:
    return spawn(parity.run_cases, 4, FOUR_PROCESS_CASES, reference_paths, timeout=600)[0]


def _assert_matches_reference(result: dict, case: Case, reference_paths: dict[str, str]) -> None:
    reference_losses, _ = load_reference(reference_paths, case.reference)
    assert result["steps"] == parity.STEPS
    loss_errors = [abs(a - b) for a, b in zip(result["losses"], reference_losses)]
    assert max(loss_errors) < parity.LOSS_TOLERANCE, f"global loss per step {result['losses']} vs {reference_losses}"
    assert result["weight_error"] < parity.WEIGHT_TOLERANCE


@pytest.mark.parametrize("case", TWO_PROCESS_CASES, ids=lambda case: f"{case.model}-{case.label}")
def test_two_processes_match_one(case: Case, two_process_results: dict, reference_paths: dict[str, str]) -> None:
    _assert_matches_reference(two_process_results[f"{case.model}/{case.label}"], case, reference_paths)


@pytest.mark.parametrize("case", FOUR_PROCESS_CASES, ids=lambda case: f"{case.model}-{case.label}")
def test_tp_by_dp_mesh_matches_one_process(case: Case, four_process_results: dict, reference_paths: dict[str, str]) -> None:
    _assert_matches_reference(four_process_results[f"{case.model}/{case.label}"], case, reference_paths)


def test_clipping_is_active_in_the_reference(reference_paths: dict[str, str]) -> None:
    # Otherwise the clipped cases would prove nothing about clipping: clipping must move the
    # weights far more than the parity tolerance.
    _, clipped = load_reference(reference_paths, parity.reference_key("llama", CLIP))
    _, unclipped = load_reference(reference_paths, "llama")
    moved = max((clipped[key] - unclipped[key]).abs().max().item() for key in clipped)
    assert moved > 10 * parity.WEIGHT_TOLERANCE
