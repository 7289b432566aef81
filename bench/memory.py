"""Model-state bytes per rank of every layout at 1, 2 and 4 processes, against the ZeRO paper's 16 Psi / N.

    python bench/memory.py [--processes 1 2 4] [--bf16] [--json bench/results/memory.json] [--plot bench/results/memory.png]

(memory-bf16.json and memory-bf16.png with ``--bf16``)

For each process count, one launch of gloo CPU workers (meshplan.launch.run_workers, one thread
each) trains the same Llama of about 20M parameters (Psi; fp32, AdamW) under each layout in turn
through meshplan's Accelerate front end, ``meshplan.accelerator(layout)``, as a user's script would:
one step (forward, backward, optimizer step) and the bytes this rank holds in parameters,
gradients (after the backward: ZeRO-1 and -2 free theirs in the step) and optimizer states (after
the step; ZeRO's fp32 partitions included), each storage counted once
(meshplan.planner.measure.model_state_bytes). Communication buffers (DDP's buckets, ZeRO's reduce
buckets) and the transient gradients of a bucketed backward are not model states and not counted.
fp32 AdamW holds 16 bytes per parameter (4 of weights, 4 of gradients, 8 of moments); sharding all of them over N ranks gives the ZeRO paper's
16 Psi / N line, which ZeRO-3, FSDP2, TP (over every process) and TP x FSDP2 should follow and the
others sit above. With ``--bf16`` (mixed precision, as on GPUs) DeepSpeed keeps bf16 weights and
gradients beside a fp32 master copy (2 + 2 + 12 bytes: the paper's own accounting); the other
engines keep fp32 weights and compute under autocast.

Prints a table (MB per rank, and the ratio to 16 Psi / N), writes the JSON and, with matplotlib
installed (``pip install -e ".[bench]"``), a plot.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LAYOUTS, LLAMA_20M, ROOT, launch_layouts, strategy, write_rank_records, write_results  # noqa: E402
from common import pyplot as plots  # noqa: E402

MODEL = LLAMA_20M
SEQ_LEN = 64
MICRO_BATCH = 2
KINDS = ("parameters", "gradients", "optimizer_states")


def worker(layouts: list[str], output: Path, bf16: bool) -> None:
    """One rank: one step under each layout in turn, then the bytes it holds; written as JSON per rank."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import LlamaConfig, LlamaForCausalLM

    import meshplan
    from meshplan._compat.accelerate import deepspeed_engine, release_accelerator
    from meshplan.planner.measure import model_state_bytes

    world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    records = []
    for layout in layouts:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**MODEL))
        numel = sum(parameter.numel() for parameter in model.parameters())
        accelerator = meshplan.accelerator(strategy(layout, world_size), mixed_precision="bf16" if bf16 else "no")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        tokens = torch.randint(0, MODEL["vocab_size"], (MICRO_BATCH * world_size, SEQ_LEN), generator=torch.Generator().manual_seed(1))
        # A loader too: Accelerate sizes DeepSpeed's micro-batch from it.
        loader = DataLoader(TensorDataset(tokens), batch_size=MICRO_BATCH)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        (ids,) = next(iter(loader))
        loss = model(input_ids=ids, labels=ids).loss
        engine = deepspeed_engine(accelerator)
        if engine is not None:
            engine.backward(loss)  # what accelerator.backward does before it steps the engine
            gradients = model_state_bytes(model, optimizer)["gradients"]  # ZeRO-1/2 free them in the step
            engine.step()
        else:
            accelerator.backward(loss)
            gradients = model_state_bytes(model, optimizer)["gradients"]
            optimizer.step()
        held = model_state_bytes(model, optimizer)  # the optimizer's states exist once it has stepped
        records.append({"layout": layout, "rank": rank, "world_size": world_size, "numel": numel,
                        "parameters": held["parameters"], "gradients": gradients,
                        "optimizer_states": held["optimizer_states"]})
        del model, optimizer, loader
        release_accelerator(accelerator)  # the next layout starts from nothing
        del accelerator
    write_rank_records(output, rank, records)
    torch.distributed.destroy_process_group()


def summary(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (layout, process count): the largest rank's bytes by kind, their sum and its ratio to 16 Psi / N."""
    rows = []
    for key in sorted({(record["layout"], record["world_size"]) for record in records}, key=lambda k: (LAYOUTS.index(k[0]), k[1])):
        ranks = [record for record in records if (record["layout"], record["world_size"]) == key]
        largest = max(ranks, key=lambda record: sum(record[kind] for kind in KINDS))
        total = sum(largest[kind] for kind in KINDS)
        line = 16 * largest["numel"] / key[1]
        rows.append({"layout": key[0], "processes": key[1], "numel": largest["numel"], **{kind: largest[kind] for kind in KINDS},
                     "total": total, "zero_line": line, "ratio": total / line})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """MB per rank (the largest rank) and the ratio to 16 Psi / N."""
    lines = [f"{'layout':9} {'N':>2} {'params MB':>10} {'grads MB':>9} {'optim MB':>9} {'total MB':>9} {'16Psi/N MB':>11} {'ratio':>6}"]
    for row in rows:
        lines.append(f"{row['layout']:9} {row['processes']:2d} {row['parameters'] / 1e6:10.1f} {row['gradients'] / 1e6:9.1f} "
                     f"{row['optimizer_states'] / 1e6:9.1f} {row['total'] / 1e6:9.1f} {row['zero_line'] / 1e6:11.1f} "
                     f"{row['ratio']:6.2f}")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, precision: str) -> None:
    """Total MB per rank against the process count, a line per layout, and the 16 Psi / N line."""
    pyplot = plots()
    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    for layout in LAYOUTS:
        points = [(row["processes"], row["total"] / 1e6) for row in rows if row["layout"] == layout]
        if points:
            axes.plot(*zip(*points), marker="o", label=layout)
    counts = sorted({row["processes"] for row in rows})
    axes.plot(counts, [16 * rows[0]["numel"] / count / 1e6 for count in counts], "k--", label="16 Psi / N")
    axes.set_xlabel("processes (N)")
    axes.set_ylabel("model states per rank (MB)")
    axes.set_xticks(counts)
    axes.set_title(f"{precision} AdamW, Llama of {rows[0]['numel'] / 1e6:.1f}M parameters")
    axes.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision: DeepSpeed's bf16 weights, autocast elsewhere")
    parser.add_argument("--json", type=Path, help="default: bench/results/memory.json (memory-bf16.json with --bf16)")
    parser.add_argument("--plot", type=Path, help="default: bench/results/memory.png (memory-bf16.png with --bf16)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    name = "memory-bf16" if arguments.bf16 else "memory"
    arguments.json = arguments.json or ROOT / "bench" / "results" / f"{name}.json"
    arguments.plot = arguments.plot or ROOT / "bench" / "results" / f"{name}.png"
    if arguments.worker:
        worker(arguments.worker.split(","), arguments.output, arguments.bf16)
        return 0
    with tempfile.TemporaryDirectory() as folder:
        records = [record for processes in arguments.processes
                   for record in launch_layouts(Path(__file__).resolve(), processes, Path(folder),
                                                *(["--bf16"] if arguments.bf16 else []))]
    rows = summary(records)
    precision = "bf16 mixed" if arguments.bf16 else "fp32"
    print(f"Model states per rank after one step, {precision} AdamW, Llama of {rows[0]['numel'] / 1e6:.1f}M parameters "
          f"(the largest rank; 16 Psi / N is the ZeRO paper's fully sharded line)")
    print(table(rows))
    settings = {"model": MODEL, "seq_len": SEQ_LEN, "micro_batch": MICRO_BATCH, "precision": precision}
    write_results(arguments.json, {"settings": settings, "rows": rows}, arguments.plot, lambda path: plot(rows, path, precision))
    return 0


if __name__ == "__main__":
    sys.exit(main())
