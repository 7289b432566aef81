"""``meshplan plan``: the candidate layouts for a model on some hardware, as a table or JSON, and the choice."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from meshplan.plan import Plan, normalize_precision
from meshplan.planner.hardware import format_bytes
from meshplan.planner.types import COMPONENTS, LayoutChoice

# The sequence length planned for when none is given (the model's limit when that is lower).
DEFAULT_SEQ_LEN = 2048
_HEADINGS = ("layout", "tp", "parameters", "gradients", "optimizer", "activations", "buffers", "total", "host",
             "sent/step", "fits")


def add_plan_command(commands: Any, refuse: Callable[[str, Exception | str], int]) -> None:
    """Adds ``meshplan plan`` to the ``meshplan`` command's subcommands."""
    plan = commands.add_parser(
        "plan", help="which layout fits a model on some GPUs, what each costs per device, and the choice",
        description="Estimate, for every layout meshplan runs (ddp, zero1-3 and zero3 offload on DeepSpeed, fsdp2 and "
                    "fsdp2-stage2 on torch's FSDP2, TP over each divisor of a node, and TP x FSDP2 across nodes or "
                    "node groups), the memory per device by component and the bytes each device sends per step, and "
                    "choose the fastest layout that fits. The formulas are in docs/planning.md.")
    plan.add_argument("--model", required=True, help="a model directory or config.json path (only the config is read)")
    plan.add_argument("--devices", type=int, required=True, help="devices (GPUs) per node")
    plan.add_argument("--nodes", type=int, default=1, help="machines (default 1)")
    plan.add_argument("--device-memory", required=True, help="memory per device, e.g. 80GB or 80GiB")
    plan.add_argument("--seq-len", type=int, help="tokens per sequence (default 2048, or the model's limit when lower)")
    plan.add_argument("--micro-batch", type=int, default=1, help="sequences per device per forward pass (default 1)")
    plan.add_argument("--precision", default="bf16", help="bf16, fp16 or fp32 (default bf16)")
    plan.add_argument("--gradient-checkpointing", action="store_true", help="recompute each layer's activations in backward")
    plan.add_argument("--lora", action="store_true",
                      help="plan for training LoRA adapters (peft) on the frozen model: weights only for the base, "
                           "gradients and optimizer states for the adapters")
    plan.add_argument("--lora-r", type=int, default=8, help="with --lora: the adapters' rank (default 8)")
    plan.add_argument("--lora-targets", default="q,v",
                      help="with --lora: the layers to adapt, by short names (q, k, v, o, gate, up, down) or the "
                           "layers' own names (default q,v)")
    plan.add_argument("--json", action="store_true", help="print the candidates and the choice as JSON")
    plan.add_argument("--write-recipe", metavar="PATH", help="write the chosen layout as a recipe (an Accelerate config file)")
    plan.set_defaults(run=lambda args: _plan(args, refuse))


def _plan(args: argparse.Namespace, refuse: Callable[[str, Exception | str], int]) -> int:
    from meshplan.errors import PlanError
    from meshplan.planner.choose import plan_layout  # here: it imports transformers' models, which --help needs not
    from meshplan.planner.model import model_facts, with_lora
    from meshplan.recipes import write_recipe

    for option, value in (("--devices", args.devices), ("--nodes", args.nodes), ("--seq-len", args.seq_len),
                          ("--micro-batch", args.micro_batch)):
        if value is not None and value < 1:
            return refuse("meshplan plan", f"{option} {value} must be a positive integer.")
    if not args.lora and (args.lora_r != 8 or args.lora_targets != "q,v"):
        return refuse("meshplan plan", "--lora-r and --lora-targets size LoRA adapters: add --lora to plan for them.")
    try:
        facts = model_facts(args.model)
        if args.lora:
            facts = with_lora(facts, r=args.lora_r, targets=args.lora_targets)
        seq_len = args.seq_len or min(DEFAULT_SEQ_LEN, facts.max_positions or DEFAULT_SEQ_LEN)
        choice = plan_layout(facts, devices_per_node=args.devices, nodes=args.nodes, device_memory=args.device_memory,
                             micro_batch_size=args.micro_batch, seq_len=seq_len, precision=args.precision,
                             gradient_checkpointing=args.gradient_checkpointing)
        if args.write_recipe:
            write_recipe(_with_precision(choice.plan, args.precision), Path(args.write_recipe),
                         num_processes=args.devices * args.nodes, num_machines=args.nodes,
                         description=f"Chosen by meshplan plan for {args.model}: {choice.reason}")
    except PlanError as error:
        return refuse("meshplan plan", error)
    except OSError as error:
        return refuse("meshplan plan", f"cannot write the recipe {args.write_recipe!r}: {error.strerror or error}")
    if args.json:
        print(json.dumps({"model": _model_dict(facts), **choice.to_dict()}, indent=2))
    else:
        if facts.trainable_numel < facts.numel:  # adapters or frozen weights: say what trains
            print(f"{facts.description}: {_count(facts.numel)} parameters, {_count(facts.trainable_numel)} of them trained; "
                  f"the frozen ones hold weights only.")
        print(table(choice))
    return 0


def _model_dict(facts: Any) -> dict[str, Any]:
    """What ``--json`` says of the model: its class, its adapters, and how many of its parameters train."""
    return {"name": facts.name, "description": facts.description, "parameters": facts.numel,
            "trainable_parameters": facts.trainable_numel}


def _count(number: int) -> str:
    """A parameter count in a few digits: 8.03B, 3.41M, 12.5K."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if number >= scale:
            return f"{number / scale:.3g}{suffix}"
    return str(number)


def _with_precision(plan: Plan, precision: str) -> Plan:
    """``plan`` with the precision it was planned for as its mixed_precision setting."""
    mixed = "no" if precision == "fp32" else normalize_precision(precision)
    return replace(plan, options=tuple(sorted({**dict(plan.options), "mixed_precision": mixed}.items())))


def table(choice: LayoutChoice) -> str:
    """The candidates as a text table (fastest fitting layout first), then the choice and its reason."""
    rows = [_HEADINGS]
    for candidate in choice.candidates:
        sizes = candidate.estimate.bytes_per_rank()
        rows.append((candidate.layout, str(candidate.tp_size), *(format_bytes(sizes[name]) for name in COMPONENTS),
                     format_bytes(sizes["total"]), format_bytes(candidate.estimate.host_bytes),
                     format_bytes(candidate.estimate.communication_bytes_per_step), "yes" if candidate.fits else "no"))
    widths = [max(len(row[column]) for row in rows) for column in range(len(_HEADINGS))]
    lines = ["  ".join(cell.rjust(width) if index else cell.ljust(width) for index, (cell, width) in enumerate(zip(row, widths)))
             for row in rows]
    lines.append("")
    lines.append("Memory per device; host: what offload keeps in CPU memory; sent/step: bytes each device sends per step.")
    lines.append(f"Chosen: {choice.chosen}" + (f" (tp_size {choice.tp_size})" if choice.chosen.startswith("tp") else "")
                 + f". {choice.reason}")
    return "\n".join(lines)
