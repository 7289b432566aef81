"""What the benchmarks share: the layouts, their meshplan strategies, and one launch of workers per process count.

Each benchmark script runs itself in a ``--worker`` mode inside gloo (CPU) or nccl (GPU) workers
started by ``meshplan.launch.run_workers`` (the launcher ``meshplan finetune`` uses, one thread per
worker). Every rank writes its records as a JSON list to ``OUTPUT.rankN``; the parent process
reads them all and summarises.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
# Every layout meshplan runs, in the order the tables list them, named as the catalogue's recipes:
# tp splits the model over every process; tp-dp and tp-fsdp are TP over 2 processes x data parallel
# (replicated, or sharded by FSDP2) over the rest.
LAYOUTS = ("ddp", "zero1", "zero2", "zero3", "fsdp2", "tp", "tp-dp", "tp-fsdp")
# A Llama of about 20M parameters: 4 blocks of 2.9M and an 8192 x 512 embedding and head.
LLAMA_20M = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                 vocab_size=8192, max_position_embeddings=512, attention_dropout=0.0)


def strategy(layout: str, processes: int) -> Any:
    """The meshplan strategy of ``layout`` on ``processes`` processes."""
    import meshplan

    return {
        "ddp": lambda: meshplan.DDP(),
        "zero1": lambda: meshplan.ZeRO(stage=1),
        "zero2": lambda: meshplan.ZeRO(stage=2),
        "zero3": lambda: meshplan.ZeRO(stage=3),
        "fsdp2": lambda: meshplan.ZeRO(stage=3, engine="fsdp2"),
        "tp": lambda: meshplan.TensorParallel(tp_size=processes),
        "tp-dp": lambda: meshplan.TensorParallel(tp_size=2),
        "tp-fsdp": lambda: meshplan.TensorParallel(tp_size=2, data_parallel="shard"),
    }[layout]()


def tp_size(layout: str, processes: int) -> int:
    """The tensor-parallel size ``strategy`` gives ``layout``: 1 for the data-parallel layouts."""
    return {"tp": processes, "tp-dp": 2, "tp-fsdp": 2}.get(layout, 1)


def runs_on(layout: str, processes: int) -> bool:
    """TP needs two processes to split over; TP x DP and TP x FSDP2 a data-parallel dimension beside TP's."""
    return {"tp": processes >= 2, "tp-dp": processes >= 4, "tp-fsdp": processes >= 4}.get(layout, True)


def launch(script: Path, processes: int, folder: Path, layouts: list[str], *options: str, cpu: bool = True) -> list[dict[str, Any]]:
    """Runs ``script --worker LAYOUTS --output ... OPTIONS`` in ``processes`` workers and returns every rank's
    records (the JSON list each rank writes to ``OUTPUT.rankN``)."""
    from meshplan.launch import run_workers

    if cpu:
        from meshplan._compat.deepspeed import build_cpu_communication_op

        build_cpu_communication_op()  # once, before the workers would race to build it
    output = folder / f"{script.stem}-{processes}"
    command = [sys.executable, str(script), "--worker", ",".join(layouts), "--output", str(output), *options]
    # CPU runs hide the GPUs: meshplan, Accelerate and the Trainer would otherwise choose them, the hand loops not.
    code = run_workers(command, processes, threads=1, env={"CUDA_VISIBLE_DEVICES": ""} if cpu else None)
    if code != 0:
        raise SystemExit(f"{script.stem}: the workers of {processes} processes failed (exit code {code})")
    return [record for rank in range(processes) for record in json.loads(_rank_file(output, rank).read_text())]


def launch_layouts(script: Path, processes: int, folder: Path, *options: str) -> list[dict[str, Any]]:
    """``launch`` with every layout that runs on ``processes`` processes."""
    return launch(script, processes, folder, [layout for layout in LAYOUTS if runs_on(layout, processes)], *options)


def write_rank_records(output: Path, rank: int, records: list[dict[str, Any]]) -> None:
    """One rank's records, where ``launch`` reads them."""
    _rank_file(output, rank).write_text(json.dumps(records))


def _rank_file(output: Path, rank: int) -> Path:
    """Where rank ``rank`` of a launch writing to ``output`` leaves its records."""
    return Path(f"{output}.rank{rank}")


def slowest_per_step(ranks: list[dict[str, Any]]) -> list[float]:
    """Per timed step, the slowest rank's seconds: a step ends when every rank has finished it."""
    return [max(times) for times in zip(*(record["step_seconds"] for record in ranks))]


def spread(values: list[float]) -> dict[str, float]:
    """Median, minimum and maximum."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def pyplot() -> Any:
    """matplotlib's pyplot, drawing to files only (raises ImportError without matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plots

    return plots


def write_results(json_path: Path, results: dict[str, Any], plot_path: Path, draw: Callable[[Path], None]) -> None:
    """Writes ``results`` as JSON and, with matplotlib installed, the plot ``draw`` makes; says where each went."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1))
    print(f"written to {json_path}")
    try:
        draw(plot_path)
        print(f"plot written to {plot_path}")
    except ImportError:
        print('matplotlib is not installed: no plot (pip install -e ".[bench]")')
