"""Step time and tokens per second of each layout against the model's size and the number of processes.

    python bench/scaling.py [--processes 1 2] [--sizes small medium large] [--layouts ddp zero2 ...]
                            [--steps 3] [--warm-up 1] [--json bench/results/scaling.json] [--plot bench/results/scaling.png]

For each process count, one launch of gloo CPU workers (meshplan.launch.run_workers, one thread
each) trains Llamas of three sizes under each layout in turn through meshplan's Accelerate front end
(``meshplan.accelerator(layout)``, fp32, AdamW, the same batches): ``--warm-up`` untimed steps,
then ``--steps`` timed ones, each ended by a barrier (a step's time is the slowest rank's). Every
process trains a micro-batch of MICRO_BATCH x SEQ_LEN tokens, so a data-parallel layout's tokens
per step grow with the processes and a TP group's do not.

Prints, per layout, size and process count, the median step time and tokens/s; writes the JSON
and, with matplotlib installed (``pip install -e ".[bench]"``), a plot. CPU figures: on a 2-core
machine processes beyond two share cores, so they show each layout's overheads and communication,
not GPU speed-ups: the default counts are 1 and 2 (``--processes 1 2 4`` on 4 cores or more; TP x
FSDP2 needs 4).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LAYOUTS, ROOT, launch, runs_on, slowest_per_step, strategy, write_rank_records, write_results  # noqa: E402
from common import pyplot as plots  # noqa: E402

# Three Llamas (7.4M, 20.0M and 50.3M parameters), each with a vocabulary of 8192.
SIZES = {
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4),
    "medium": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4),
    "large": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=12, num_key_value_heads=4),
}
COMMON = dict(vocab_size=8192, max_position_embeddings=512, attention_dropout=0.0)
# zero1 and tp-dp with --layouts: ZeRO-1 steps as ZeRO-2 does here, TP x DP as DDP and TP do.
DEFAULT_LAYOUTS = ("ddp", "zero2", "zero3", "fsdp2", "tp", "tp-fsdp")
SEQ_LEN = 128
MICRO_BATCH = 2


def worker(layouts: list[str], sizes: list[str], steps: int, warm_up: int, output: Path) -> None:
    """One rank: each size under each layout in turn; its step times, written as JSON per rank."""
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import LlamaConfig, LlamaForCausalLM

    import meshplan
    from meshplan._compat.accelerate import release_accelerator

    world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    records = []
    for size in sizes:
        for layout in layouts:
            torch.manual_seed(0)
            model = LlamaForCausalLM(LlamaConfig(**SIZES[size], **COMMON))
            numel = sum(parameter.numel() for parameter in model.parameters())
            accelerator = meshplan.accelerator(strategy(layout, world_size), mixed_precision="no")
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            tp_size = getattr(accelerator, "tp_size", 1)
            rows = (steps + warm_up) * MICRO_BATCH * (world_size // tp_size)
            tokens = torch.randint(0, COMMON["vocab_size"], (rows, SEQ_LEN), generator=torch.Generator().manual_seed(1))
            loader = DataLoader(TensorDataset(tokens), batch_size=MICRO_BATCH)
            model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
            seconds = []
            for index, (ids,) in enumerate(loader):
                dist.barrier()
                started = time.perf_counter()
                accelerator.backward(model(input_ids=ids, labels=ids).loss)
                optimizer.step()
                optimizer.zero_grad()
                dist.barrier()
                if index >= warm_up:
                    seconds.append(time.perf_counter() - started)
            records.append({"layout": layout, "size": size, "numel": numel, "rank": rank, "world_size": world_size,
                            "data_parallel": world_size // tp_size, "step_seconds": seconds})
            del model, optimizer, loader
            release_accelerator(accelerator)  # the next run starts from nothing
            del accelerator
    write_rank_records(output, rank, records)
    dist.destroy_process_group()


def launch_count(processes: int, arguments: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    """The workers of one process count; every rank's records."""
    layouts = [layout for layout in arguments.layouts if runs_on(layout, processes)]
    return launch(Path(__file__).resolve(), processes, folder, layouts, "--sizes", *arguments.sizes, "--steps",
                  str(arguments.steps), "--warm-up", str(arguments.warm_up))


def summary(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (layout, size, processes): the median over steps of the slowest rank's time, and tokens/s."""
    rows = []
    keys = sorted({(r["layout"], r["size"], r["world_size"]) for r in records},
                  key=lambda k: (LAYOUTS.index(k[0]), list(SIZES).index(k[1]), k[2]))
    for layout, size, processes in keys:
        ranks = [r for r in records if (r["layout"], r["size"], r["world_size"]) == (layout, size, processes)]
        per_step = slowest_per_step(ranks)
        median = statistics.median(per_step)
        tokens = MICRO_BATCH * SEQ_LEN * ranks[0]["data_parallel"]
        rows.append({"layout": layout, "size": size, "numel": ranks[0]["numel"], "processes": processes,
                     "median_step_seconds": median, "min_step_seconds": min(per_step), "max_step_seconds": max(per_step),
                     "tokens_per_second": tokens / median})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'layout':9} {'size':7} {'params':>7} {'N':>2} {'median s':>9} {'min s':>7} {'max s':>7} {'tokens/s':>9}"]
    for row in rows:
        lines.append(f"{row['layout']:9} {row['size']:7} {row['numel'] / 1e6:6.1f}M {row['processes']:2d} "
                     f"{row['median_step_seconds']:9.3f} {row['min_step_seconds']:7.3f} {row['max_step_seconds']:7.3f} "
                     f"{row['tokens_per_second']:9.0f}")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """tokens/s against the process count, a panel per size, a line per layout."""
    pyplot = plots()
    sizes = [size for size in SIZES if any(row["size"] == size for row in rows)]
    figure, panels = pyplot.subplots(1, len(sizes), figsize=(4.5 * len(sizes), 4), squeeze=False)
    for axes, size in zip(panels[0], sizes):
        for layout in LAYOUTS:
            points = [(row["processes"], row["tokens_per_second"]) for row in rows if (row["layout"], row["size"]) == (layout, size)]
            if points:
                axes.plot(*zip(*points), marker="o", label=layout)
        numel = next(row["numel"] for row in rows if row["size"] == size)
        axes.set_title(f"{size}: {numel / 1e6:.0f}M parameters")
        axes.set_xlabel("processes")
        axes.set_xticks(sorted({row["processes"] for row in rows}))
        axes.set_ylabel("tokens/s")
    panels[0][0].legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # More processes than cores measure the machine's sharing of cores, not the layouts: 1 and 2 here.
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts (tp-fsdp needs 4)")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(DEFAULT_LAYOUTS))
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warm-up", type=int, default=1, help="steps before the timed ones")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "scaling.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "bench" / "results" / "scaling.png")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker:
        worker(arguments.worker.split(","), arguments.sizes, arguments.steps, arguments.warm_up, arguments.output)
        return 0
    with tempfile.TemporaryDirectory() as folder:
        records = [record for processes in arguments.processes for record in launch_count(processes, arguments, Path(folder))]
    rows = summary(records)
    print(f"Step time and tokens/s, fp32 AdamW, {MICRO_BATCH} x {SEQ_LEN} tokens per process and step, median of "
          f"{arguments.steps} steps after {arguments.warm_up}, gloo CPU processes of one thread")
    print(table(rows))
    settings = {"sizes": SIZES, "seq_len": SEQ_LEN, "micro_batch": MICRO_BATCH, "steps": arguments.steps, "warm_up": arguments.warm_up}
    write_results(arguments.json, {"settings": settings, "rows": rows}, arguments.plot, lambda path: plot(rows, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
