"""Step time of ZeRO-3 on torch's FSDP2 against ZeRO-3 on DeepSpeed, on the same model and batches.

    python bench/fsdp2_vs_zero3.py [--steps 10] [--warm-up 3] [--nprocs 2] [--json bench/results/fsdp2_vs_zero3.json]

For each engine, one launch of ``--nprocs`` gloo CPU workers (meshplan.launch.run_workers, one
thread each) trains the same Llama of about 20M parameters (built from its config, seed 0, fp32,
AdamW, no clipping) through meshplan's Accelerate front end, ``meshplan.accelerator(meshplan.ZeRO(
stage=3, engine=...))``, as a user's script would: ``--warm-up`` steps that are not timed (the
optimizer's states, DeepSpeed's first gathers), then ``--steps`` timed ones. A step is forward,
backward, optimizer step and zero_grad, ended by a barrier so that every rank has finished it; its
time is the slowest rank's. DeepSpeed's buckets are sized to the model, as ``meshplan.plan_layout``
sizes them for a model smaller than DeepSpeed's 5e8-element defaults.

Prints the median, minimum and maximum step time per engine, their ratio, the loss of each step
(the two engines train the same model on the same batches: the losses agree to the noise floor)
and the model-state bytes per rank (meshplan.planner.measure), and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("fsdp2", "deepspeed")
# About 20M parameters: 4 blocks of 2.9M and an 8192 x 512 embedding and head.
MODEL = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
             vocab_size=8192, max_position_embeddings=512, attention_dropout=0.0)
SEQ_LEN = 128
MICRO_BATCH = 2


def worker(engine: str, steps: int, warm_up: int, output: Path) -> None:
    """One rank: trains under ``engine`` and writes its step times, losses and model-state bytes."""
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import LlamaConfig, LlamaForCausalLM

    import meshplan
    from meshplan.planner.measure import model_state_bytes

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL))
    numel = sum(parameter.numel() for parameter in model.parameters())
    options = {} if engine == "fsdp2" else {"reduce_bucket_size": numel, "stage3_prefetch_bucket_size": numel}
    accelerator = meshplan.accelerator(meshplan.ZeRO(stage=3, engine=engine, **options), mixed_precision="no")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    rows = (steps + warm_up) * MICRO_BATCH * world_size
    tokens = torch.randint(0, MODEL["vocab_size"], (rows, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    loader = DataLoader(TensorDataset(tokens), batch_size=MICRO_BATCH)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    seconds, losses = [], []
    for index, (ids,) in enumerate(loader):
        batch = {"input_ids": ids, "labels": ids}
        dist.barrier()
        started = time.perf_counter()
        loss = model(**batch).loss
        accelerator.backward(loss)  # under DeepSpeed this steps its engine too; the prepared optimizer's step is then a no-op
        optimizer.step()
        optimizer.zero_grad()
        dist.barrier()
        elapsed = time.perf_counter() - started
        if index >= warm_up:
            seconds.append(elapsed)
        losses.append(accelerator.reduce(loss.detach(), "mean").item())
    states = model_state_bytes(model, optimizer)
    record = {"engine": engine, "rank": rank, "world_size": world_size, "numel": numel, "step_seconds": seconds,
              "losses": losses, "model_state_bytes": {k: states[k] for k in ("parameters", "optimizer_states")}}
    Path(f"{output}.rank{rank}").write_text(json.dumps(record))
    accelerator.end_training()


def launch(engine: str, arguments: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    """Starts the workers for ``engine`` and gathers their records."""
    from meshplan.launch import run_workers

    if engine == "deepspeed":
        from meshplan._compat.deepspeed import build_cpu_communication_op

        build_cpu_communication_op()  # once, before the workers would race to build it
    output = folder / engine
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", engine, "--steps", str(arguments.steps),
               "--warm-up", str(arguments.warm_up), "--output", str(output)]
    code = run_workers(command, arguments.nprocs, threads=1)
    if code != 0:
        raise SystemExit(f"fsdp2_vs_zero3: the {engine} workers failed (exit code {code})")
    return [json.loads(Path(f"{output}.rank{rank}").read_text()) for rank in range(arguments.nprocs)]


def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One engine's figures: per step the slowest rank's time, and their median, minimum and maximum."""
    per_step = [max(times) for times in zip(*(record["step_seconds"] for record in records))]
    first = records[0]
    return {"engine": first["engine"], "world_size": first["world_size"], "numel": first["numel"],
            "median_step_seconds": statistics.median(per_step), "min_step_seconds": min(per_step),
            "max_step_seconds": max(per_step), "step_seconds": per_step, "losses": first["losses"],
            "model_state_bytes_per_rank": [record["model_state_bytes"] for record in records]}


def table(results: dict[str, dict[str, Any]]) -> str:
    """The engines side by side."""
    lines = [f"{'engine':10} {'median s':>9} {'min s':>7} {'max s':>7} {'states MB/rank':>15} {'last loss':>10}"]
    for engine, result in results.items():
        states = sum(result["model_state_bytes_per_rank"][0].values())
        lines.append(f"{engine:10} {result['median_step_seconds']:9.3f} {result['min_step_seconds']:7.3f} "
                     f"{result['max_step_seconds']:7.3f} {states / 1e6:15.1f} {result['losses'][-1]:10.5f}")
    ratio = results["fsdp2"]["median_step_seconds"] / results["deepspeed"]["median_step_seconds"]
    gap = max(abs(a - b) for a, b in zip(results["fsdp2"]["losses"], results["deepspeed"]["losses"]))
    lines.append(f"fsdp2 / deepspeed median step time: {ratio:.2f}; largest loss difference over the steps: {gap:.2e}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warm-up", type=int, default=3, help="steps before the timed ones")
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "fsdp2_vs_zero3.json")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker:
        worker(arguments.worker, arguments.steps, arguments.warm_up, arguments.output)
        return 0
    with tempfile.TemporaryDirectory() as folder:
        results = {engine: summary(launch(engine, arguments, Path(folder))) for engine in ENGINES}
    print(f"ZeRO-3, {arguments.nprocs} CPU processes (gloo, 1 thread each), Llama of {results['fsdp2']['numel'] / 1e6:.1f}M "
          f"parameters, fp32, micro-batch {MICRO_BATCH} x {SEQ_LEN} tokens, median of {arguments.steps} steps after "
          f"{arguments.warm_up} warm-up steps")
    print(table(results))
    arguments.json.parent.mkdir(parents=True, exist_ok=True)
    arguments.json.write_text(json.dumps({"settings": {"model": MODEL, "seq_len": SEQ_LEN, "micro_batch": MICRO_BATCH,
                                                       "steps": arguments.steps, "warm_up": arguments.warm_up,
                                                       "nprocs": arguments.nprocs}, "results": results}, indent=1))
    print(f"written to {arguments.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
