"""Writes docs/compatibility.md, the conformance matrix, from what the conformance tests proved.

    python scripts/compatibility.py                 # runs the conformance tests (about 10 minutes on 2 cores)
    python scripts/compatibility.py --from-log F    # renders a log a test run wrote (MESHPLAN_MATRIX_LOG=F pytest ...)

Each conformance test asserts its cells, then records them (tests/helpers/matrix.py); a cell that failed
is never recorded, so the table shows only what passed, and an empty cell means "not proven".
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFORMANCE_TESTS = ["tests/test_conformance_lightning.py", "tests/test_accelerate_launch.py", "tests/test_conformance_accelerate.py",
                     "tests/test_hf_trainer.py"]
FRONT_ENDS = ["Lightning", "Accelerate", "HF Trainer"]
LAYOUTS = ["ddp", "zero1", "zero2", "zero3", "zero3-offload", "tp", "tp-dp", "fsdp2", "fsdp2-stage2", "tp-fsdp", "ddp-2node",
           "zero3-2node", "ddp+lora", "zero2+lora", "zero3+lora", "tp+lora", "tp-dp+lora"]
PACKAGES = ["torch", "lightning", "accelerate", "deepspeed", "transformers", "peft"]


def run_conformance_tests(log: Path) -> int:
    """Runs the conformance tests with the matrix log enabled; returns pytest's exit code."""
    env = {**os.environ, "MESHPLAN_MATRIX_LOG": str(log)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CONFORMANCE_TESTS],
                          cwd=ROOT, env=env).returncode


def read_cells(log: Path) -> dict[str, dict[str, dict[str, str]]]:
    """front end -> API -> layout -> outcome, from a matrix log (later records win)."""
    cells: dict[str, dict[str, dict[str, str]]] = {}
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        apis = cells.setdefault(entry["front_end"], {})
        for api, outcome in entry["cells"].items():
            apis.setdefault(api, {})[entry["layout"]] = outcome
    return cells


def render(cells: dict[str, dict[str, dict[str, str]]]) -> str:
    """The Markdown page."""
    versions = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in PACKAGES)
    lines = [
        "# Compatibility: what works under which layout",
        "",
        "Each cell is a test in the suite that ran the front end's everyday API under the layout, on CPU with",
        "2 processes (4 for tp-dp and tp-fsdp), and checked the outcome: a number against a single-process reference, an exact",
        "sample count, or saved weights equal to the live model's. **yes** means that test passed; **PlanError**",
        "means meshplan refuses the combination before it can go wrong (a hang, a silently ignored setting), with a",
        "message that says what to do instead, and the test checks that error; an empty cell does not apply to the",
        "layout or was not tested. The reasons for the PlanError cells follow each table. A `+lora` column is the",
        "layout training a model wrapped in peft LoRA adapters (see [LoRA](lora.md)).",
        "",
        f"Written by `python scripts/compatibility.py` from the test results ({versions}).",
    ]
    for front_end in FRONT_ENDS:
        apis = cells.get(front_end)
        if not apis:
            continue
        layouts = [layout for layout in LAYOUTS if any(layout in outcomes for outcomes in apis.values())]
        lines += ["", f"## {front_end}", "", "| | " + " | ".join(layouts) + " |", "|---" * (len(layouts) + 1) + "|"]
        for api, outcomes in apis.items():
            lines.append(f"| {api} | " + " | ".join(_cell(outcomes.get(layout)) for layout in layouts) + " |")
        refusals = sorted({outcome for outcomes in apis.values() for outcome in outcomes.values() if outcome != "works"})
        if refusals:
            lines += ["", "PlanError cells: " + "; ".join(refusal.removeprefix("refused: ") for refusal in refusals) + "."]
    lines += ["", *_precision(), "", *_platforms(), "", *_tensor_parallel_models()]
    return "\n".join(lines) + "\n"


def _precision() -> list[str]:
    """What each layout does in each precision (static: it follows from the engines and the tests above)."""
    return [
        "## Precision per layout",
        "",
        "| layout | fp32 (`\"32-true\"`, `mixed_precision: 'no'`) | bf16 (`\"bf16-mixed\"`, `mixed_precision: bf16`) | fp16 |",
        "|---|---|---|---|",
        "| ddp, tp, tp-dp | yes | yes: fp32 weights, forward under bf16 autocast | passed on, not tested |",
        "| zero1, zero2, zero3, zero3-offload | yes | yes: DeepSpeed's bf16 mode, bf16 weights and an fp32 master copy | passed on, not tested |",
        "| fsdp2, fsdp2-stage2, tp-fsdp | yes | yes: fp32 weights (sharded), forward under bf16 autocast | passed on, not tested |",
        "",
        "The Lightning rows `precision \"32-true\"` and `precision \"bf16-mixed\"` above train every layout in",
        "both. Accelerate (`mixed_precision` in the recipe or in `meshplan.accelerator()`) and the HF Trainer",
        "(`bf16=True`) take the same setting; their conformance tests train in fp32, and the Accelerate row",
        "`mixed_precision bf16` checks that the forward of the models meshplan shards in `prepare` runs in bf16. fp16 is rendered for the",
        "engines (DeepSpeed's `fp16` section, `fp16=True`) but no test trains in it, and DeepSpeed's fp16 loss",
        "scaler is not saved in meshplan checkpoints.",
    ]


def _platforms() -> list[str]:
    """Python, the declared dependencies, the versions tested here, and what needs Linux."""
    metadata = importlib.metadata.metadata("meshplan")
    requirements = [requirement for requirement in metadata.get_all("Requires-Dist") or [] if "extra ==" not in requirement]
    versions = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in PACKAGES)
    return [
        "## Platforms and Python",
        "",
        f"- **Tested**: Python {platform.python_version()} on Linux ({platform.machine()}), with {versions}, on CPU",
        "  processes (gloo); on a machine with NVIDIA GPUs, `scripts/gpu_smoke.sh` runs the parity checks on CUDA (nccl).",
        f"- **Declared**: Python {metadata['Requires-Python']}; " + ", ".join(f"`{r}`" for r in requirements) + ".",
        "- **Lowest versions**: `scripts/check_versions.sh` installs every dependency at its declared lower bound",
        "  and runs the fast tier and a parity spawn for ddp, ZeRO-3 and TP; see [versions](versions.md).",
        "- **Linux** runs everything. Two things need it: `meshplan.accelerator()` finds the recipe of an",
        "  `accelerate launch` through the launcher's command line in `/proc`; on macOS (or under Slurm, pdsh or a",
        "  wrapper script) set `MESHPLAN_RECIPE` to the recipe, or pass it, `meshplan.accelerator(\"zero3\")`, else",
        "  the launch is refused with a PlanError. DeepSpeed's shared-memory collectives on CPU",
        "  (`deepspeed_shm_comm`, built with a C++ compiler on first use) are Linux only; elsewhere DeepSpeed uses",
        "  gloo alone. macOS and Windows are not tested.",
    ]


def _tensor_parallel_models() -> list[str]:
    return [
        "## Models for tensor parallelism",
        "",
        "Which model architectures of transformers meshplan can shard, and how (their own TP plan, an inferred",
        "one, or not at all, with the reason): [tp-plans.md](tp-plans.md), written by `python scripts/tp_coverage.py`.",
    ]


def _cell(outcome: str | None) -> str:
    if outcome is None:
        return ""
    return "yes" if outcome == "works" else "PlanError"


def main() -> int:
    """Runs the conformance tests (or reads a log) and writes docs/compatibility.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-log", type=Path, help="a matrix log written by an earlier test run")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "compatibility.md")
    args = parser.parse_args()
    if args.from_log is not None:
        cells = read_cells(args.from_log)
    else:
        with tempfile.TemporaryDirectory() as folder:
            log = Path(folder) / "matrix.jsonl"
            log.touch()
            code = run_conformance_tests(log)
            cells = read_cells(log)
        if code != 0:
            print(f"conformance tests failed (pytest exit code {code}); {args.output} is left as it was", file=sys.stderr)
            return 1
    args.output.write_text(render(cells))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
