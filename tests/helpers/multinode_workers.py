"""Worker code of tests/test_multinode.py: every layout of one front end, in the processes of one two-node launch.

tests/scripts/multinode_train.py runs one of the entries below in each worker that two launcher
agents (one per "node", both on 127.0.0.1) started. Each entry trains the parity model under
ddp, zero2, zero3 and (where the front end has TP) tp-dp one after the other, in the same
processes and process group, and returns per layout the global loss of every step and the worst
weight error against a single-process reference. ``placement`` then records where each rank ran,
so that the test can check that the job really spanned two nodes and kept each TP group in one.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import meshplan
from meshplan._compat.accelerate import TENSOR_PARALLEL_DIMENSION, deepspeed_engine

from . import accelerate_train, parity, trainer_train

# name -> strategy factory; tp-dp is TP over the 2 processes of a node, data parallel across the 2 nodes.
LAYOUTS: dict[str, Callable[[], Any]] = {
    "ddp": lambda: meshplan.DDP(),
    "zero2": lambda: meshplan.ZeRO(stage=2),
    "zero3": lambda: meshplan.ZeRO(stage=3),
    "tp-dp": lambda: meshplan.TensorParallel(tp_size=2),
}
TP_SIZE = 2
# The HF Trainer has no TP (training_arguments() refuses it); DDP first, as in tests/test_hf_trainer.py:
# a DeepSpeed run leaves ACCELERATE_USE_DEEPSPEED set in its process, and a DDP layout is refused after it.
TRAINER_LAYOUTS = ("ddp", "zero2", "zero3")


def _world() -> tuple[int, int]:
    """(nodes, processes per node), as the launcher set them."""
    per_node = int(os.environ["LOCAL_WORLD_SIZE"])
    return int(os.environ["WORLD_SIZE"]) // per_node, per_node


def _batch_size(layout: str, world_size: int) -> int:
    """Per rank: the global batch over the data-parallel ranks (a TP group shares one batch)."""
    return parity.GLOBAL_BATCH * (TP_SIZE if layout == "tp-dp" else 1) // world_size


def lightning_layouts(reference_path: str) -> dict[str, dict[str, Any]]:
    """``lightning.Trainer(num_nodes=2, devices=2)`` under each layout (parity.lightning_run)."""
    nodes, per_node = _world()  # read once: Lightning's teardown removes WORLD_SIZE
    results = {}
    for layout, strategy_of in LAYOUTS.items():
        strategy = strategy_of()
        case = parity.Case("llama", layout, strategy, _batch_size(layout, nodes * per_node))
        result = _timed(lambda: parity.lightning_run(case, reference_path, (nodes, per_node)))
        # What Lightning itself made of the launch: its node count and this process's node rank.
        result["lightning_nodes"] = strategy.num_nodes
        result["lightning_node_rank"] = strategy.node_rank
        if layout == "tp-dp":
            result["tp_group"] = strategy.device_mesh["tensor_parallel"].mesh.tolist()
        results[layout] = result
    return results


def accelerate_layouts(reference_path: str) -> dict[str, dict[str, Any]]:
    """An Accelerate training loop through ``meshplan.accelerator`` under each layout.

    The first (ddp) is the recipe ``accelerate launch`` was given (``meshplan.accelerator()``),
    the others are passed as strategies.
    """
    results = {}
    for layout, strategy_of in LAYOUTS.items():
        results[layout] = _timed(lambda: _accelerate_run(None if layout == "ddp" else strategy_of(), layout, reference_path))
    return results


def _accelerate_run(strategy: Any, layout: str, reference_path: str) -> dict[str, Any]:
    accelerator = meshplan.accelerator(strategy)
    model = parity.build_model("llama")
    optimizer = torch.optim.AdamW(model.parameters(), lr=parity.LEARNING_RATE["llama"], eps=parity.ADAM_EPS)
    loader = DataLoader(parity.TokenDataset("llama"), batch_size=_batch_size(layout, accelerator.num_processes))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    # The global loss of each step, reduced over the world: TP ranks share theirs, so it is the DP mean.
    losses = accelerate_train._train(accelerator, model, optimizer, scheduler, loader, clip=None, loss_scale=1.0)
    engine = deepspeed_engine(accelerator)
    result = {"losses": losses, "weight_error": _weight_error(accelerator.unwrap_model(model), reference_path),
              "num_processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
              "zero_stage": engine.zero_optimization_stage() if engine is not None else 0}
    if layout == "tp-dp":
        result["tp_group"] = accelerator.torch_device_mesh[TENSOR_PARALLEL_DIMENSION].mesh.tolist()
    accelerate_train.tear_down(accelerator)
    return result


def trainer_layouts(reference_path: str, output_dir: str) -> dict[str, dict[str, Any]]:
    """The HF Trainer (trainer_train.train) with ``strategy.training_arguments()`` under each layout it can run.

    The training set is read in order, so that every step's global batch is the one of
    ``trainer_train.plain_loop_reference``, whose result ``reference_path`` holds.
    """
    world_size = int(os.environ["WORLD_SIZE"])
    results = {}
    for layout in TRAINER_LAYOUTS:
        arguments = {**LAYOUTS[layout]().training_arguments(), **trainer_train.DATA_IN_ORDER}
        results[layout] = _timed(lambda: _trainer_run(str(Path(output_dir) / layout), parity.GLOBAL_BATCH // world_size,
                                                      arguments, reference_path))
    return results


def _trainer_run(output_dir: str, batch_size: int, arguments: dict[str, Any], reference_path: str) -> dict[str, Any]:
    losses, trainer = trainer_train.train(output_dir, batch_size, arguments)
    return {"losses": losses, "weight_error": _weight_error(trainer.model, reference_path),
            "num_processes": trainer.accelerator.num_processes, "deepspeed": trainer.is_deepspeed_enabled}


def _timed(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``run()``'s result with the seconds it took (reported, not asserted)."""
    started = time.perf_counter()
    result = run()
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def _weight_error(model: torch.nn.Module, reference_path: str) -> float:
    """The largest difference between the trained weights, whole (a collective), and the reference's."""
    weights = parity.full_parameters(model)
    _, reference = torch.load(reference_path, weights_only=True)
    return max((weights[key].cpu() - reference[key]).abs().max().item() for key in reference)


# What each rank records of its own view of a layout, besides the figures rank 0 reports.
RANK_VIEWS = ("tp_group", "lightning_nodes", "lightning_node_rank")


def placement(launched: dict[str, str], results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Where every rank ran, by rank (a collective): the node and local rank in ``launched`` (the
    environment the launcher gave this process, read before any training), the process id of the
    launcher agent that started it, and per layout this rank's RANK_VIEWS in ``results``."""
    mine = {
        "rank": dist.get_rank(),
        "launched_rank": int(launched["RANK"]),
        "group_rank": int(launched["GROUP_RANK"]),  # torchrun's node rank, which Lightning and Accelerate read
        "local_rank": int(launched["LOCAL_RANK"]),
        "local_world_size": int(launched["LOCAL_WORLD_SIZE"]),
        "master_addr": launched.get("MASTER_ADDR"),
        "agent_pid": os.getppid(),
        "views": {layout: {name: result[name] for name in RANK_VIEWS if name in result} for layout, result in results.items()},
    }
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone
