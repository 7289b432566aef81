"""Prints the parity figures: every strategy against the single-process reference.

    python tests/scripts/parity_report.py                 # CPU, gloo: 2- and 4-process cases
    MESHPLAN_TEST_ACCELERATOR=gpu python tests/scripts/parity_report.py --max-processes 8   # CUDA, nccl

Runs the same cases as tests/test_parity.py (cases that need more processes than
--max-processes are skipped; with one process, each strategy runs on one device) and exits
non-zero when any case misses the tolerances.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the helpers package

import torch  # noqa: E402

import meshplan  # noqa: E402
from helpers import parity  # noqa: E402
from helpers.parity_cases import FOUR_PROCESS_CASES, TWO_PROCESS_CASES  # noqa: E402
from meshplan.testing import spawn  # noqa: E402

ONE_PROCESS_CASES = [
    parity.Case(model, label, strategy, parity.GLOBAL_BATCH)
    for model in ("llama", "minilm", "llama-lora")
    for label, strategy in (
        ("DDP", meshplan.DDP()),
        ("ZeRO-2", meshplan.ZeRO(stage=2)),
        ("ZeRO-3", meshplan.ZeRO(stage=3)),
        ("TP-1", meshplan.TensorParallel(tp_size=1)),
        ("FSDP2-2", meshplan.ZeRO(stage=2, engine="fsdp2")),
        ("FSDP2-3", meshplan.ZeRO(stage=3, engine="fsdp2")),
        ("TP-1xFSDP-1", meshplan.TensorParallel(tp_size=1, data_parallel="shard")),
    )
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-processes", type=int, default=4)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference is strict fp32
    with tempfile.TemporaryDirectory() as folder:
        references = {}
        for model, clip in parity.REFERENCE_RUNS:
            key = parity.reference_key(model, clip)
            references[key] = f"{folder}/{key}.pt"
            torch.save(parity.reference_run(model, clip), references[key])
        failures = 0
        print(f"{'case':<40} {'procs':>5} {'max |dloss|':>12} {'max |dw|':>10}  ok   ({parity.ACCELERATOR})")
        for world, cases in ((1, ONE_PROCESS_CASES), (2, TWO_PROCESS_CASES), (4, FOUR_PROCESS_CASES)):
            if world > args.max_processes:
                print(f"skipped: {len(cases)} cases that need {world} processes")
                continue
            started = time.monotonic()
            results = spawn(parity.run_cases, world, cases, references, timeout=1800)[0]
            for case in cases:
                failures += _report(case, world, results[f"{case.model}/{case.label}"], references)
            print(f"({world}-process spawn: {time.monotonic() - started:.0f} s)")
    print("all cases within tolerance" if not failures else f"{failures} cases out of tolerance")
    return 1 if failures else 0


def _report(case: parity.Case, world: int, result: dict, references: dict[str, str]) -> int:
    reference_losses, _ = torch.load(references[case.reference], weights_only=True)
    loss_error = max(abs(a - b) for a, b in zip(result["losses"], reference_losses))
    ok = result["steps"] == parity.STEPS and loss_error < parity.LOSS_TOLERANCE and result["weight_error"] < parity.WEIGHT_TOLERANCE
    print(f"{case.model + '/' + case.label:<40} {world:>5} {loss_error:>12.2e} {result['weight_error']:>10.2e}  {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
