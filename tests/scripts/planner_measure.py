"""Measures what one training step holds and sends under each layout, on every rank of one launch.

    python tests/scripts/planner_measure.py OUT.json --nprocs 2 [--families llama,bert]
        [--layouts ddp,zero1,zero2,zero3,zero3-offload,fsdp2,fsdp2-stage2,tp,tp-dp,tp-fsdp] [--precision bf16[,no]]
        [--seq-len 128[,256]]
        [--micro-batch-size 2] [--gradient-checkpointing off[,on]] [--zero-option reduce_bucket_size=1000000 ...]
        [--family-layouts llama-lora=zero2,zero3,tp ...]
        [--hidden 256 --intermediate 688 --bert-intermediate 1024 --layers 4 --heads 8 --kv-heads 4 --vocab 4096]

Started without a launcher (no RANK in the environment) it starts ``--nprocs`` workers of itself
(meshplan.launch.run_workers: gloo on the CPU, one thread each) and writes their records to
OUT.json as ``{"records": [...]}``; under a launcher each rank writes ``OUT.json.rank<R>``.

Every combination of family, layout, precision, sequence length and checkpointing runs in the
same processes, one after the other, through ``meshplan.accelerator(layout)`` as a user's
Accelerate script would, with AdamW: a tiny model built from its config (seed 0), one warm-up
step, then a measured step (forward, backward, optimizer step, zero_grad). One record per rank
and combination, in bytes this rank holds or sends (meshplan.planner.measure):

- ``parameters``, ``optimizer_states``, ``other``, ``gradients_after_step``, and ``offloaded`` with
  ``offloaded_parameters``, ``offloaded_gradients``, ``offloaded_optimizer_states`` (the part of each
  that DeepSpeed's offload keeps on the CPU): held right after the optimizer step
  (``model_state_bytes``); ``gradients``: held right after backward, before the step (their peak:
  DeepSpeed frees its low-precision gradients in the step);
- ``baseline``, ``peak``, ``end``: live tensors before the measured step, at its peak and after it
  (``peak_step_memory``, with a tracker entered before the model is built, so that tensors that
  DDP and DeepSpeed make in C++ are counted too);
- ``communication_bytes_per_step`` and ``communication_calls``: the collectives of the measured
  step (``count_communication``); ``unknown_collectives`` should stay empty;
- ``numel``: the model's parameter count; ``leftover``: live tensor bytes before the model was
  built (what earlier combinations left behind; it is part of ``baseline`` and ``peak``).

The layouts are meshplan.DDP(), meshplan.ZeRO(stage=1, 2, 3; zero3-offload offloads the optimizer
and the parameters) with the ``--zero-option`` settings, meshplan.ZeRO(stage=3 or 2, engine="fsdp2")
(fsdp2, fsdp2-stage2), and meshplan.TensorParallel with tp_size the world size (tp) or 2 (tp-dp, and
tp-fsdp with data_parallel="shard", on 4 or more processes). The llama family is a LlamaForCausalLM,
the bert family a BertForSequenceClassification (2 labels); dropout is off in both. The
llama-lora family is the llama one with LoRA adapters of rank 8 on q_proj and v_proj
(meshplan.peft.lora_model): only they train.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

import meshplan
from meshplan._compat.accelerate import deepspeed_engine
from meshplan.planner.measure import (
    MemoryTracker, count_communication, gradient_bytes, live_tensor_bytes, model_state_bytes, peak_step_memory,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the helpers package
from helpers import accelerate_train  # noqa: E402

LAYOUTS = ("ddp", "zero1", "zero2", "zero3", "zero3-offload", "fsdp2", "fsdp2-stage2", "tp", "tp-dp", "tp-fsdp")
FAMILIES = ("llama", "llama-lora", "bert")


# ---------------------------------------------------------------- what is measured


def build_model(family: str, arguments: argparse.Namespace, seq_len: int) -> torch.nn.Module:
    """The tiny model of ``family``, seeded, in fp32 on the CPU."""
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    if family == "llama-lora":  # the llama family with LoRA r=8 on q and v (meshplan.peft.lora_model): its base frozen
        from meshplan.peft import lora_model

        return lora_model(build_model("llama", arguments, seq_len), r=8, targets="q,v", task_type="CAUSAL_LM")
    torch.manual_seed(0)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(
            hidden_size=arguments.hidden, intermediate_size=arguments.intermediate, num_hidden_layers=arguments.layers,
            num_attention_heads=arguments.heads, num_key_value_heads=arguments.kv_heads, vocab_size=arguments.vocab,
            max_position_embeddings=max(2048, seq_len), attention_dropout=0.0,
        ))
    if family == "bert":
        return BertForSequenceClassification(BertConfig(
            hidden_size=arguments.hidden, intermediate_size=arguments.bert_intermediate, num_hidden_layers=arguments.layers,
            num_attention_heads=arguments.heads, vocab_size=arguments.vocab, max_position_embeddings=max(512, seq_len),
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2,
        ))
    raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")


class Batches(Dataset):
    """Random token rows (and labels: the tokens for llama, a class for bert), the same in every process."""

    def __init__(self, family: str, rows: int, seq_len: int, vocab: int) -> None:
        generator = torch.Generator().manual_seed(1)
        self.input_ids = torch.randint(0, vocab, (rows, seq_len), generator=generator)
        self.labels = self.input_ids if family.startswith("llama") else torch.randint(0, 2, (rows,), generator=generator)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


def strategy(layout: str, world_size: int, zero_options: dict[str, int]) -> Any:
    """The meshplan strategy of a catalogue layout name."""
    if layout == "ddp":
        return meshplan.DDP()
    if layout in ("zero1", "zero2", "zero3"):
        return meshplan.ZeRO(stage=int(layout[-1]), **_options_of_stage(int(layout[-1]), zero_options))
    if layout == "zero3-offload":
        return meshplan.ZeRO(stage=3, offload_optimizer=True, offload_parameters=True, **_options_of_stage(3, zero_options))
    if layout in ("fsdp2", "fsdp2-stage2"):
        return meshplan.ZeRO(stage=2 if layout.endswith("stage2") else 3, engine="fsdp2")
    if layout == "tp":
        return meshplan.TensorParallel(tp_size=world_size)
    if layout in ("tp-dp", "tp-fsdp"):
        if world_size < 4 or world_size % 2:
            raise ValueError(f"{layout} runs tp_size 2 with data parallelism: it needs an even world of 4 or more, not {world_size}")
        return meshplan.TensorParallel(tp_size=2, data_parallel="shard" if layout == "tp-fsdp" else "replicate")
    raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")


def _options_of_stage(stage: int, zero_options: dict[str, int]) -> dict[str, int]:
    """The ``--zero-option`` settings that ZeRO stage ``stage`` takes (meshplan refuses the others,
    such as stage3_prefetch_bucket_size for stage 2)."""
    taken = {}
    for name, value in zero_options.items():
        try:
            meshplan.ZeRO(stage=stage, **{name: value})
        except meshplan.PlanError:
            continue
        taken[name] = value
    return taken


@contextlib.contextmanager
def around_engine_step(engine: Any, before: Callable[[], None], after: Callable[[], None]) -> Iterator[None]:
    """Runs ``before`` and ``after`` around the DeepSpeedEngine's step, which ``accelerator.backward`` calls
    right after the engine's backward (the prepared optimizer's own step does nothing under DeepSpeed)."""
    step = engine.step

    def measured_step(*args: Any, **kwargs: Any) -> Any:
        before()
        result = step(*args, **kwargs)
        after()
        return result

    engine.step = measured_step
    try:
        yield
    finally:
        del engine.step  # the class's step again


def train_step(accelerator: Any, model: Any, optimizer: Any, batch: dict[str, torch.Tensor],
               after_backward: Callable[[], None] = lambda: None, after_step: Callable[[], None] = lambda: None) -> None:
    """One training step as an Accelerate script writes it; the callbacks run between backward and the
    optimizer step, and between the step and zero_grad."""
    engine = deepspeed_engine(accelerator)
    loss = model(**batch).loss
    if engine is not None:
        with around_engine_step(engine, after_backward, after_step):
            accelerator.backward(loss)
    else:
        accelerator.backward(loss)
        after_backward()
        optimizer.step()
        after_step()
    optimizer.zero_grad()


def measure(family: str, layout: str, precision: str, seq_len: int, checkpointing: bool,
            arguments: argparse.Namespace) -> dict[str, Any]:
    """This rank's record for one combination (see the module's docstring)."""
    world_size = int(os.environ["WORLD_SIZE"])
    started = time.perf_counter()
    gc.collect()
    record: dict[str, Any] = {"family": family, "layout": layout, "world_size": world_size, "rank": int(os.environ["RANK"]),
                              "precision": precision, "seq_len": seq_len, "micro_batch_size": arguments.micro_batch_size,
                              "gradient_checkpointing": checkpointing,
                              "zero_options": _options_of_stage(3 if layout == "zero3-offload" else int(layout[-1]), arguments.zero_options)
                              if layout.startswith("zero") else {},
                              "leftover": live_tensor_bytes()}
    with MemoryTracker() as tracker:
        accelerator = meshplan.accelerator(strategy(layout, world_size, arguments.zero_options), mixed_precision=precision)
        model = build_model(family, arguments, seq_len)
        record["numel"] = sum(parameter.numel() for parameter in model.parameters())
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        tp_size = getattr(accelerator, "tp_size", 1)
        rows = 2 * arguments.micro_batch_size * world_size // tp_size  # two steps of every data-parallel rank
        loader = DataLoader(Batches(family, rows, seq_len, arguments.vocab), batch_size=arguments.micro_batch_size)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        record["tp_size"] = tp_size
        batches = iter(loader)
        prepared = time.perf_counter()
        train_step(accelerator, model, optimizer, next(batches))  # warm-up: optimizer states, rebuilt buckets
        warmed_up = time.perf_counter()
        batch = next(batches)
        record.update(_measured_step(accelerator, model, optimizer, batch, tracker))
        accelerate_train.tear_down(accelerator)
        del model, optimizer, loader, batches, batch, accelerator
    dist.barrier()
    record["seconds"] = {"build_and_prepare": round(prepared - started, 2), "warm_up": round(warmed_up - prepared, 2),
                         "all": round(time.perf_counter() - started, 2)}
    return record


def _measured_step(accelerator: Any, model: Any, optimizer: Any, batch: dict[str, torch.Tensor],
                   tracker: MemoryTracker) -> dict[str, Any]:
    held: dict[str, Any] = {}

    def after_backward() -> None:
        held["gradients"] = gradient_bytes(model, optimizer)

    def after_step() -> None:
        states = model_state_bytes(model, optimizer)
        held.update({name: size for name, size in states.items() if name != "gradients"}, gradients_after_step=states["gradients"])

    started = time.perf_counter()
    with count_communication() as sent:
        memory = peak_step_memory(lambda: train_step(accelerator, model, optimizer, batch, after_backward, after_step), tracker)
    return {**held, **memory, "communication_bytes_per_step": sent.bytes,
            "communication_calls": {op: list(calls) for op, calls in sent.calls.items()},
            "unknown_collectives": sent.unknown, "step_seconds": round(time.perf_counter() - started, 3)}


# ---------------------------------------------------------------- measured against the estimate


def comparisons(records: list[dict[str, Any]], arguments: argparse.Namespace) -> list[dict[str, Any]]:
    """Each record beside ``meshplan.estimate`` for the same model, layout and settings.

    Model states: parameters, gradients at their peak (after backward) and optimizer states,
    wherever they are (host bytes included); the peak of the step less what earlier combinations
    left, against ``total`` (plus ``host_bytes``: on the CPU offload keeps them in the same memory);
    bytes sent per step. Errors are measured / estimated - 1.
    """
    rows = []
    for record in records:
        model = build_model(record["family"], arguments, record["seq_len"])
        layout = strategy(record["layout"], record["world_size"], arguments.zero_options)
        predicted = meshplan.estimate(
            model, layout, world_size=record["world_size"], micro_batch_size=record["micro_batch_size"],
            seq_len=record["seq_len"], precision="fp32" if record["precision"] == "no" else record["precision"],
            gradient_checkpointing=record["gradient_checkpointing"])
        states = record["parameters"] + record["gradients"] + record["optimizer_states"]
        peak = record["peak"] - record["leftover"]
        rows.append({
            **{key: record[key] for key in ("family", "layout", "world_size", "rank", "precision", "seq_len", "gradient_checkpointing")},
            "states": states, "states_estimate": predicted.model_states + predicted.host_bytes,
            "peak": peak, "peak_estimate": predicted.total + predicted.host_bytes,
            "sent": record["communication_bytes_per_step"], "sent_estimate": predicted.communication_bytes_per_step,
        })
    for row in rows:
        for name in ("states", "peak", "sent"):
            row[f"{name}_error"] = row[name] / row[f"{name}_estimate"] - 1 if row[f"{name}_estimate"] else 0.0
    return rows


# ---------------------------------------------------------------- command line


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--nprocs", type=int, default=2, help="workers to start when no launcher started this process")
    parser.add_argument("--families", default="llama,bert")
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--precision", default="bf16", help="bf16, no, or both: bf16,no")
    parser.add_argument("--seq-len", default="128", help="one or more, comma-separated")
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", default="off", help="off, on, or both: off,on")
    parser.add_argument("--zero-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a DeepSpeed zero_optimization setting for the ZeRO layouts (integer values)")
    parser.add_argument("--family-layouts", action="append", default=[], metavar="FAMILY=LAYOUT,LAYOUT",
                        help="measure FAMILY under these of --layouts only (each family runs all of them otherwise)")
    for name, default in (("hidden", 256), ("intermediate", 688), ("bert-intermediate", 1024), ("layers", 4),
                          ("heads", 8), ("kv-heads", 4), ("vocab", 4096)):
        parser.add_argument(f"--{name}", type=int, default=default)
    arguments = parser.parse_args(argv)
    arguments.zero_options = {key: int(float(value)) for key, value in (option.split("=", 1) for option in arguments.zero_option)}
    arguments.only = {family: set(layouts.split(",")) for family, layouts in (option.split("=", 1) for option in arguments.family_layouts)}
    return arguments


def _combinations(arguments: argparse.Namespace) -> list[tuple[str, str, str, int, bool]]:
    switches = {"off": False, "on": True}
    combinations = itertools.product(
        arguments.families.split(","), arguments.layouts.split(","), arguments.precision.split(","),
        [int(length) for length in arguments.seq_len.split(",")],
        [switches[value] for value in arguments.gradient_checkpointing.split(",")],
    )
    return [combination for combination in combinations if combination[1] in arguments.only.get(combination[0], {combination[1]})]


def worker(arguments: argparse.Namespace) -> None:
    """One rank: every combination, then its records to OUT.rank<R>."""
    records = [measure(*combination, arguments) for combination in _combinations(arguments)]
    Path(f"{arguments.output}.rank{os.environ['RANK']}").write_text(json.dumps(records))


def launch(argv: list[str], arguments: argparse.Namespace) -> int:
    """Starts the workers, then gathers their records into OUT.json."""
    from meshplan.launch import run_workers

    if any(layout.startswith("zero") for layout in arguments.layouts.split(",")):
        from meshplan._compat.deepspeed import build_cpu_communication_op

        build_cpu_communication_op()  # once, before the workers would race to build it
    started = time.perf_counter()
    code = run_workers([sys.executable, str(Path(__file__).resolve()), *argv], arguments.nprocs, threads=1)
    if code != 0:
        return code
    records = []
    for rank in range(arguments.nprocs):
        part = Path(f"{arguments.output}.rank{rank}")
        records += json.loads(part.read_text())
        part.unlink()
    arguments.output.write_text(json.dumps({"records": records, "wall_seconds": round(time.perf_counter() - started, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    parsed = _arguments(sys.argv[1:])
    if "RANK" in os.environ:
        worker(parsed)
    else:
        sys.exit(launch(sys.argv[1:], parsed))
