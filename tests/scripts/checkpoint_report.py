"""Prints the checkpoint figures: exact resume per strategy, resume under another layout, the chain.

    python tests/scripts/checkpoint_report.py

Runs the same spawns as tests/test_checkpoints.py (2 workers for every strategy and the
cross-layout cases; 4 workers for TP 2 x DP 2, TP 2 x FSDP2 2 and the chain's 4-process link,
their first 2 then going on for the 4 -> 2 cases; 1 worker for ZeRO-3 -> one process and the
chain's last link) and prints, for each run, the worst difference from the reference loss of
the steps it ran and the worst final-weight difference; then the chain DeepSpeed ZeRO-3 x 2 ->
TP x FSDP2 x 4 -> FSDP2 x 2 -> one process as one run, and whether ``meshplan.export`` of each
link's checkpoint equals the weights that link gathered. Exits non-zero when any case misses
the tolerances.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the helpers package

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import meshplan  # noqa: E402
from helpers import parity, resume  # noqa: E402
from helpers.resume import CHAIN, RESUMED_AFTER, chain_runs, four_process_runs, step_checkpoint, two_process_runs  # noqa: E402
from meshplan.plan import Plan  # noqa: E402
from meshplan.testing import spawn  # noqa: E402


def main() -> int:
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        reference_path = str(folder / "llama.pt")
        torch.save(parity.reference_run("llama"), reference_path)
        references = {"llama": reference_path}
        results = spawn(resume.train_and_resume, 2, two_process_runs(folder), references, name, timeout=900)[0]
        results.update(spawn(resume.train_and_resume, 4, four_process_runs(folder), references, name, timeout=600)[0])
        last = [{"label": "ZeRO-3->one-process", "model": "llama", "plan": Plan.build("ddp"),
                 "resume": str(folder / step_checkpoint("ZeRO-3", RESUMED_AFTER))}, *chain_runs(1, folder)]
        results.update(spawn(resume.train_and_resume, 1, last, references, name, timeout=300)[0])
        reference_losses, _ = torch.load(reference_path, weights_only=True)
        failed = _print_runs(results, reference_losses)
        failed |= _print_chain(results, reference_losses, folder)
    return 1 if failed else 0


def _print_runs(results: dict, reference_losses: list[float]) -> bool:
    failed = False
    print(f"{'run':<28} {'steps':>5} {'loss error':>11} {'weight error':>13} {'seconds':>8}")
    for label, result in results.items():
        first = result["global_step"] - len(result["losses"])
        loss_error = max(abs(a - b) for a, b in zip(result["losses"], reference_losses[first:]))
        weights = result["weight_error"]
        ok = loss_error < parity.LOSS_TOLERANCE and (weights is None or weights < parity.WEIGHT_TOLERANCE)
        failed |= not ok
        shown = "-" if weights is None else f"{weights:.1e}"
        print(f"{label:<28} {first + 1:>2}-{result['global_step']:<2} {loss_error:>11.1e} {shown:>13} "
              f"{result['seconds']:>8.1f}{'' if ok else '  FAIL'}")
    return failed


def _print_chain(results: dict, reference_losses: list[float], folder: Path) -> bool:
    links = [results[label] for label, _, _, _ in CHAIN]
    losses = links[0]["losses"][:1] + [loss for link in links[1:] for loss in link["losses"]]
    loss_error = max(abs(a - b) for a, b in zip(losses, reference_losses))
    weights = links[-1]["weight_error"]
    failed = not (len(losses) == parity.STEPS and loss_error < parity.LOSS_TOLERANCE and weights < parity.WEIGHT_TOLERANCE)
    route = " -> ".join(f"{label} x{processes}" for label, _, processes, _ in CHAIN)
    print(f"\nchain {route}: loss error {loss_error:.1e} over {len(losses)} steps, final weight error {weights:.1e}"
          f"{'' if not failed else '  FAIL'}")
    for step, (label, _, _, _) in enumerate(CHAIN[1:], start=2):
        exported = meshplan.export(folder / step_checkpoint(label, step), folder / f"{label}-export")
        gathered = torch.load(folder / f"{label}.weights.pt", weights_only=True)
        tensors = load_file(exported / "model.safetensors")
        equal = sorted(tensors) == sorted(gathered) and all(torch.equal(tensors[key], gathered[key]) for key in gathered)
        failed |= not equal
        print(f"export of {label} step {step}: {len(tensors)} tensors, {'equal to' if equal else 'DIFFERENT from'} "
              f"the weights the run gathered")
    return failed


if __name__ == "__main__":
    sys.exit(main())
