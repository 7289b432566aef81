"""Prints the checkpoint figures: exact resume per strategy and resume under another layout.

    python tests/scripts/checkpoint_report.py

Runs the same spawns as tests/test_checkpoints.py (4 workers for TP 2 x DP 2, 2 workers for
every strategy and the cross-layout cases, 1 worker for ZeRO-3 -> one process) and prints,
for each resumed run, the worst difference from the reference loss of steps 3 and 4 and the
worst final-weight difference. Exits non-zero when any case misses the tolerances.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the helpers package

import torch  # noqa: E402

from helpers import parity, resume  # noqa: E402
from helpers.resume import CROSS_LAYOUT, LAYOUTS, RESUMED_AFTER, step_checkpoint  # noqa: E402
from meshplan.plan import Plan  # noqa: E402
from meshplan.testing import spawn  # noqa: E402


def main() -> int:
    with tempfile.TemporaryDirectory() as folder:
        reference_path = str(Path(folder) / "llama.pt")
        torch.save(parity.reference_run("llama"), reference_path)
        references = {"llama": reference_path}
        results = spawn(resume.train_and_resume, 4, [{"label": "TP-2xDP-2", "model": "llama", "plan": Plan.build("tp", tp_size=2)}],
                        references, folder, timeout=300)[0]
        runs = [{"label": label, "model": "llama", "plan": plan} for label, plan in LAYOUTS.items()]
        runs += [{"label": f"{label} -> itself", "model": "llama", "plan": plan,
                  "resume": str(Path(folder) / step_checkpoint(label, RESUMED_AFTER))} for label, plan in LAYOUTS.items()]
        runs += [{"label": label, "model": "llama", "plan": LAYOUTS[target],
                  "resume": str(Path(folder) / step_checkpoint(source, RESUMED_AFTER))} for label, source, target in CROSS_LAYOUT]
        results.update(spawn(resume.train_and_resume, 2, runs, references, folder, timeout=900)[0])
        results.update(spawn(resume.train_and_resume, 1, [{"label": "ZeRO-3->one-process", "model": "llama", "plan": Plan.build("ddp"),
                                                          "resume": str(Path(folder) / step_checkpoint("ZeRO-3", RESUMED_AFTER))}],
                             references, folder, timeout=300)[0])
        reference_losses, _ = torch.load(reference_path, weights_only=True)
    failed = False
    print(f"{'run':<28} {'steps':>5} {'loss error':>11} {'weight error':>13}")
    for label, result in results.items():
        expected = reference_losses[parity.STEPS - len(result["losses"]):]
        loss_error = max(abs(a - b) for a, b in zip(result["losses"], expected))
        ok = loss_error < parity.LOSS_TOLERANCE and result["weight_error"] < parity.WEIGHT_TOLERANCE
        failed |= not ok
        print(f"{label:<28} {len(result['losses']):>5} {loss_error:>11.1e} {result['weight_error']:>13.1e}{'' if ok else '  FAIL'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
