"""Run a function in N gloo-ready worker processes, with a hard timeout.

Distributed code hangs when one rank fails and the others wait in a collective. ``spawn`` turns
that hang into a prompt, readable test failure: the first rank that raises stops every worker
and its traceback becomes the error, and a job that outlives its timeout is killed.

Example::

    def train(strategy_name):
        trainer = lightning.Trainer(accelerator="cpu", devices=2, strategy=strategy_name)
        ...
        return trainer.callback_metrics["loss"].item()

    losses = meshplan.testing.spawn(train, 2, "meshplan_zero2", timeout=300)

``fn`` must be importable by name (a module-level function): workers receive it pickled. Each
worker sees the caller's environment plus that of a torchrun worker (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT, ...), so Lightning, Accelerate and DeepSpeed treat it as
a process started by a launcher.

Workers are forked from a server process (Python's "forkserver" start method, the default on
Linux from Python 3.14) that imports torch, transformers, Lightning, Accelerate, DeepSpeed and
meshplan once, when the first ``spawn`` of the process starts it: a worker then starts in a
fraction of a second instead of spending seconds on those imports. Those modules read some
environment variables when imported (HF_HUB_OFFLINE, DS_ACCELERATOR, ...), so the server serves
only calls made from the environment it started with (launcher variables aside); after the
caller's environment changed, workers start as fresh interpreters (the "spawn" method) that
import under it. ``env`` is applied as each worker starts running ``fn``, after meshplan and what
it imports are loaded, under either method. Where a GPU is visible the server imports nothing
ahead (CUDA cannot be used in a process forked after it was initialized).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import sys
import traceback
import time
from typing import Any, Callable

from meshplan._compat import deepspeed as deepspeed_compat
from meshplan.launch import free_port, worker_environment

__all__ = ["WorkerError", "WorkerTimeout", "free_port", "spawn"]


class WorkerError(RuntimeError):
    """A worker raised; the message carries its rank and traceback."""


class WorkerTimeout(WorkerError):
    """Workers were still running when the timeout expired, and were killed."""


# Imported once by the fork server; each is skipped if it is not installed. DeepSpeed's engine
# modules are what it imports when a worker builds its first ZeRO engine.
PRELOADED_MODULES = ("torch", "transformers", "lightning.pytorch", "accelerate", "deepspeed", "meshplan.lightning",
                     "meshplan.accelerate", "meshplan.hf_trainer", "meshplan.checkpoint", *deepspeed_compat.ENGINE_MODULES)


def _worker(fn: Callable[..., Any], args: tuple, env: dict[str, str], results: Any) -> None:
    # A forked worker inherits the fork server's environment, from when it started: the caller's
    # environment now replaces it whole, as a freshly started interpreter would have it.
    os.environ.clear()
    os.environ.update(env)
    rank = int(env["RANK"])
    try:
        # The function's module was imported before the environment was set: torch, if it came
        # along, has already read OMP_NUM_THREADS.
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(int(env["OMP_NUM_THREADS"]))
        results.put((rank, True, fn(*args)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))


def spawn(fn: Callable[..., Any], nprocs: int, *args: Any, timeout: float = 300.0,
          nnodes: int = 1, env: dict[str, str] | None = None) -> list[Any]:
    """Runs ``fn(*args)`` in ``nprocs`` new worker processes and returns their results by rank.

    Args:
        fn: a module-level function; its return value must be picklable.
        nprocs: the world size.
        timeout: seconds after which every worker is killed and WorkerTimeout is raised.
        nnodes: pretend the world spans this many nodes (ranks are split evenly).
        env: extra environment variables for every worker, set before ``fn`` runs (modules that
            were imported earlier, such as meshplan's dependencies, do not see them).

    Raises:
        WorkerError: a worker raised; the others are killed at once.
        WorkerTimeout: the workers did not all finish within ``timeout`` seconds.
    """
    if nprocs < 1 or nprocs % nnodes:
        raise ValueError(f"nprocs={nprocs} must be a positive multiple of nnodes={nnodes}")
    port = free_port()
    ignored = set(worker_environment(0, nprocs, port, nnodes=nnodes)) | _VARIABLES_NO_MODULE_READS
    context = _worker_context({key: value for key, value in os.environ.items() if key not in ignored})
    results = context.Queue()
    processes = []
    for rank in range(nprocs):
        worker_env = {**os.environ, **worker_environment(rank, nprocs, port, nnodes=nnodes), **(env or {})}
        # Not daemonic: a worker may start processes of its own (DataLoader workers); the
        # finally clause below kills every worker that outlives the call.
        process = context.Process(target=_worker, args=(fn, args, worker_env, results))
        process.start()
        processes.append(process)
    try:
        return _collect(processes, results, timeout)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=10)


# Variables that change between calls but that no preloaded module reads at import: pytest names
# the running test in PYTEST_CURRENT_TEST, so counting it would start fresh interpreters for every
# call made from any test but the first; threadpoolctl (imported with scikit-learn, by some datasets
# code) sets KMP_DUPLICATE_LIB_OK the first time it is imported.
_VARIABLES_NO_MODULE_READS = frozenset({"PYTEST_CURRENT_TEST", "KMP_DUPLICATE_LIB_OK"})

# The environment the fork server started with (its preloaded modules read it); None before it starts.
_server_environment: dict[str, str] | None = None


def _worker_context(environment: dict[str, str]) -> Any:
    """The forkserver context when this process's ``environment`` is the server's, else the spawn context.

    The first call starts the server (at its first process, with this environment), which
    preloads PRELOADED_MODULES unless a GPU is visible and keeps running for the rest of the process.
    """
    global _server_environment
    import torch

    if _server_environment is None:
        _server_environment = environment
        multiprocessing.get_context("forkserver").set_forkserver_preload(
            [] if torch.cuda.is_available() else list(PRELOADED_MODULES))
    return multiprocessing.get_context("forkserver" if environment == _server_environment else "spawn")


def _collect(processes: list, results: Any, timeout: float) -> list[Any]:
    deadline = time.monotonic() + timeout
    outputs: dict[int, Any] = {}
    while len(outputs) < len(processes):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            missing = sorted(set(range(len(processes))) - set(outputs))
            raise WorkerTimeout(f"ranks {missing} did not finish within {timeout:.0f} s and were killed")
        try:
            rank, ok, value = results.get(timeout=min(remaining, 1.0))
        except queue.Empty:
            _raise_if_died(processes, outputs, results)
            continue
        if not ok:
            raise WorkerError(f"rank {rank} raised:\n{value}")
        outputs[rank] = value
    return [outputs[rank] for rank in range(len(processes))]


def _raise_if_died(processes: list, outputs: dict[int, Any], results: Any) -> None:
    dead = [rank for rank, process in enumerate(processes) if rank not in outputs and process.exitcode is not None]
    if not dead:
        return
    # A worker flushes its result before it exits; give the queue a moment to deliver it.
    try:
        rank, ok, value = results.get(timeout=5.0)
    except queue.Empty:
        raise WorkerError(f"rank {dead[0]} exited with code {processes[dead[0]].exitcode} without a result") from None
    if not ok:
        raise WorkerError(f"rank {rank} raised:\n{value}")
    outputs[rank] = value
