"""Every strategy trains the same model to the same losses and weights as one process.

Two spawns carry all the runs (process start-up dominates the cost): one of 2 workers for
DDP, ZeRO 1/2/3, ZeRO-3 with offload, TP 2, ZeRO 2/3 on FSDP2 and every registered strategy
name, and one of 4 workers for TP 2 x DP 2 and TP 2 x FSDP2 2. Gradient clipping and accumulation
are in the cases that say so, and the ``-lora`` models are wrapped in peft LoRA adapters. Each case
is then checked by its own test.
"""

from __future__ import annotations

import pytest

from helpers import parity
from helpers.parity import CLIP, Case, load_reference
from helpers.parity_cases import FOUR_PROCESS_CASES, TWO_PROCESS_CASES
from meshplan.testing import spawn

pytestmark = pytest.mark.slow  # every case trains in spawned workers


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


# Bytes of optimizer state per trainable parameter: AdamW's two moments, plus DeepSpeed's fp32 master copy.
ADAM_STATE_BYTES = {"DDP": 8, "ZeRO-2": 12, "ZeRO-3": 12}


@pytest.mark.parametrize("label", ADAM_STATE_BYTES)
def test_a_lora_models_frozen_base_carries_no_optimizer_state(label: str, two_process_results: dict) -> None:
    # The bound for ZeRO-2: at most 1.10 x 12 bytes x trainable / N per rank (N = 2); DDP keeps
    # AdamW's 8 bytes of every trainable parameter on each rank. A frozen base with optimizer state
    # would add over 5 times as much (the base has 22,688 parameters, the adapters 4,096).
    result = two_process_results[f"llama-lora/{label}"]
    share = ADAM_STATE_BYTES[label] * result["trainable"] / (1 if label == "DDP" else 2)
    assert 0.9 * share <= result["optimizer_state_bytes"] <= 1.10 * share, (result["optimizer_state_bytes"], share)


def test_clipping_is_active_in_the_reference(reference_paths: dict[str, str]) -> None:
    # Otherwise the clipped cases would prove nothing about clipping: clipping must move the
    # weights far more than the parity tolerance.
    _, clipped = load_reference(reference_paths, parity.reference_key("llama", CLIP))
    _, unclipped = load_reference(reference_paths, "llama")
    moved = max((clipped[key] - unclipped[key]).abs().max().item() for key in clipped)
    assert moved > 10 * parity.WEIGHT_TOLERANCE
