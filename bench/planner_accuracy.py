"""How close meshplan.estimate comes to what training really holds and sends, layout by layout.

    python bench/planner_accuracy.py [--quick] [--json OUT.json]

Runs tests/scripts/planner_measure.py (real engines through meshplan.accelerator, gloo CPU
processes, one thread each) for:

- model states and communication: a Llama-style decoder and a BERT-style encoder, every layout
  (ddp, zero1, zero2, zero3, zero3-offload, fsdp2, fsdp2-stage2, tp; tp-dp and tp-fsdp at 4), bf16,
  sequence 128, at 2 and 4 processes;
- peak memory: both families under ddp, zero2, zero3, fsdp2 and tp at 2 processes, fp32, sequences 64
  and 256, with and without gradient checkpointing (DeepSpeed's buckets at 1e6 elements, so that
  the activations, not a fixed 1 GB bucket, decide the peak);

then prints every measured/estimated pair, the largest error of each kind, and writes them as
JSON when asked. ``--quick`` runs one family at 2 processes. About 15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

WORKER = Path(__file__).resolve().parents[1] / "tests" / "scripts" / "planner_measure.py"
SMALL_BUCKETS = ["--zero-option", "reduce_bucket_size=1000000", "--zero-option", "stage3_prefetch_bucket_size=1000000"]


def runs(quick: bool) -> list[tuple[str, list[str]]]:
    """(what it checks, worker arguments) for each launch."""
    families = "llama" if quick else "llama,bert"
    launches = [("states", ["--nprocs", "2", "--families", families, "--layouts",
                            "ddp,zero1,zero2,zero3,zero3-offload,fsdp2,fsdp2-stage2,tp"])]
    if not quick:
        launches.append(("states", ["--nprocs", "4", "--families", families, "--layouts", "zero2,zero3,fsdp2,tp,tp-dp,tp-fsdp"]))
    launches.append(("peak", ["--nprocs", "2", "--families", families, "--layouts", "ddp,zero2,zero3,fsdp2,tp", "--precision", "no",
                              "--seq-len", "64,256", "--gradient-checkpointing", "off,on", *SMALL_BUCKETS]))
    return launches


def measure(arguments: list[str], folder: Path) -> list[dict[str, Any]]:
    """The worker's rows (measured beside estimated) for one launch."""
    output = folder / f"launch{len(list(folder.iterdir()))}.json"
    finished = subprocess.run([sys.executable, str(WORKER), str(output), *arguments], capture_output=True, text=True, cwd=folder)
    if finished.returncode != 0:
        raise SystemExit(f"planner_accuracy: the launch {' '.join(arguments)} failed:\n{(finished.stdout + finished.stderr)[-4000:]}")
    worker = _worker_module()
    records = json.loads(output.read_text())["records"]
    return worker.comparisons(records, worker._arguments([str(output), *arguments]))


def _worker_module() -> Any:
    spec = importlib.util.spec_from_file_location("planner_measure", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table(kind: str, rows: list[dict[str, Any]]) -> str:
    """One line per measured/estimated pair of ``kind`` ("states" with "sent", or "peak")."""
    pairs = (("states", "sent") if kind == "states" else ("peak",))
    heading = f"{'family':6} {'layout':13} {'N':>2} {'rank':>4} {'prec':4} {'seq':>4} {'ckpt':4}"
    heading += "".join(f" {name + ' MB':>10} {'estimate':>9} {'error':>7}" for name in pairs)
    lines = [heading]
    for row in rows:
        line = (f"{row['family']:6} {row['layout']:13} {row['world_size']:>2} {row['rank']:>4} {row['precision']:4} "
                f"{row['seq_len']:>4} {'on' if row['gradient_checkpointing'] else 'off':4}")
        line += "".join(f" {row[name] / 1e6:10.2f} {row[name + '_estimate'] / 1e6:9.2f} {row[name + '_error']:+7.1%}" for name in pairs)
        lines.append(line)
    for name in pairs:
        worst = max(rows, key=lambda row: abs(row[f"{name}_error"]))
        lines.append(f"largest {name} error: {worst[name + '_error']:+.1%} ({worst['family']} {worst['layout']} on {worst['world_size']})")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one family, 2 processes")
    parser.add_argument("--json", type=Path, help="write every row here")
    arguments = parser.parse_args()
    results: dict[str, list[dict[str, Any]]] = {"states": [], "peak": []}
    with tempfile.TemporaryDirectory() as folder:
        for kind, launch in runs(arguments.quick):
            results[kind] += measure(launch, Path(folder))
    for kind, rows in results.items():
        print(f"\n{'Model states and bytes sent per step' if kind == 'states' else 'Peak memory of a step'} (measured / estimated)")
        print(table(kind, rows))
    if arguments.json:
        arguments.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
