"""meshplan's layouts on Ray Train: the Lightning train function of Ray's documentation, one line changed.

::

    import lightning.pytorch as pl
    import ray.train.lightning
    import meshplan.ray

    def train_func():
        trainer = pl.Trainer(
            devices="auto", accelerator="auto",
            strategy=meshplan.ray.strategy("zero3"),     # was ray.train.lightning.RayDDPStrategy()
            plugins=[ray.train.lightning.RayLightningEnvironment()],
            callbacks=[ray.train.lightning.RayTrainReportCallback()],
        )
        trainer = ray.train.lightning.prepare_trainer(trainer)
        trainer.fit(model, train_dataloaders=loader)

    TorchTrainer(train_func, scaling_config=ScalingConfig(num_workers=2)).fit()

Under Ray every worker's Trainer sees only its own device, so Lightning counts one process
(``devices="auto"``, ``num_nodes=1``); these strategies check and size the layout by Ray's
count instead: ``ray.train.get_context()``'s world size and workers per node. A tensor-parallel
group stays inside one node (``tp_size`` must divide the workers of each node), and a bad layout
is a PlanError when the Trainer sets up, before any collective.

The layouts that run under Ray are DDP, ZeRO on DeepSpeed and TensorParallel with
``data_parallel="replicate"``. FSDP2's (``ZeRO(engine="fsdp2")``, ``TensorParallel(data_parallel="shard")``)
are a PlanError: ``prepare_trainer`` accepts only Ray's strategy classes, whose FSDP one is FSDP1.

Checkpoints are meshplan's (one directory, resumable under any layout). ``RayTrainReportCallback``
saves into a directory of each worker's own; a meshplan checkpoint is one directory that all
workers write together, so every worker writes into rank 0's, and Ray's merge of the reported
directories holds it whole. That needs rank 0's directory (under ``tempfile.gettempdir()``) to be
visible to every worker: true on one node; on several, give the workers a ``TMPDIR`` on shared
storage (``RunConfig(worker_runtime_env={"env_vars": {"TMPDIR": ...}})``) or a CheckpointError says so. Resume as
Ray documents it: ``ray.train.get_checkpoint()``, then ``trainer.fit(model, ckpt_path=...)``
with ``RayTrainReportCallback.CHECKPOINT_NAME`` inside its directory.

The HF Trainer (``strategy.training_arguments()``) and Accelerate (``meshplan.accelerator(recipe)``)
need nothing from this module: Ray sets the launcher's variables (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE) they read.

Ray is optional: ``pip install "meshplan[ray]"``; ``import meshplan`` does not import this module.
"""

from __future__ import annotations

import os
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train.lightning import RayDDPStrategy, RayDeepSpeedStrategy, RayLightningEnvironment
from typing_extensions import override

from meshplan._compat.ray import accept_in_prepare_trainer
from meshplan.accelerate import resolve_plan
from meshplan.auto import is_auto
from meshplan.errors import CheckpointError, PlanError, shown, shown_path
from meshplan.lightning.auto import Auto
from meshplan.lightning import from_plan
from meshplan.lightning.ddp import DDP
from meshplan.lightning.tensor_parallel import TensorParallel
from meshplan.lightning.zero import ZeRO
from meshplan.plan import Plan

__all__ = ["RayDDP", "RayTensorParallel", "RayZeRO", "check_runs_on_ray", "check_workers_per_node", "strategy"]


def strategy(layout_or_recipe: Any) -> "RayDDP | RayZeRO | RayTensorParallel":
    """The Lightning strategy that runs a meshplan layout in a Ray Train worker and passes ``prepare_trainer``.

    Args:
        layout_or_recipe: a meshplan strategy (``meshplan.ZeRO(stage=3)``), a Plan, the path of a
            recipe, or the name of a shipped one (``"zero3"``, see ``meshplan recipes``).

    Returns:
        RayDDP, RayZeRO or RayTensorParallel: the meshplan strategy of that layout (an instance of
        meshplan.DDP, meshplan.ZeRO or meshplan.TensorParallel) that counts Ray's workers.

    Raises:
        PlanError: not a layout meshplan knows, ``"auto"`` / ``meshplan.Auto()`` (choose with
            ``meshplan.plan_layout`` first: every worker must build the same layout), or an FSDP2
            layout (``ZeRO(engine="fsdp2")``, ``TensorParallel(data_parallel="shard")``), which Ray
            Train has no strategy for.
    """
    if layout_or_recipe is None or is_auto(layout_or_recipe) or isinstance(layout_or_recipe, Auto):
        raise PlanError(
            f"meshplan.ray.strategy({shown(layout_or_recipe)}) needs a layout: a meshplan strategy, a Plan, a recipe path "
            f"or a catalogue name such as 'zero3'. To have meshplan choose, call meshplan.plan_layout(...) on the driver "
            f"and pass its .plan to every worker."
        )
    plan = resolve_plan(layout_or_recipe)
    check_runs_on_ray(plan)
    return from_plan(plan, ddp=RayDDP, zero=RayZeRO, tensor_parallel=RayTensorParallel)


def check_runs_on_ray(plan: Plan) -> None:
    """Refuses a layout meshplan.ray has no strategy for: FSDP2's (ZeRO on FSDP2, TP x FSDP2).

    ``prepare_trainer`` accepts Ray's three strategy classes only, and Ray's FSDP one is
    Lightning's FSDPStrategy (FSDP1, its own wrapping), not torch's ``fully_shard``.
    """
    if plan.uses_fsdp2:
        layout = ("TensorParallel(data_parallel='shard')" if plan.strategy == "tp"
                  else f"ZeRO(stage={plan.zero_stage}, engine='fsdp2')")
        raise PlanError(
            f"meshplan.ray does not run {layout}: FSDP2 layouts need a Ray strategy that Ray Train lacks (its "
            f"RayFSDPStrategy is FSDP1). Under Ray, meshplan runs DDP, ZeRO with engine='deepspeed' (stages 1-3, "
            f"offload) and TensorParallel with data_parallel='replicate'; ZeRO(stage={plan.zero_stage or 3}, "
            f"engine='deepspeed') shards the same states."
        )


class _RayWorkers:
    """What every meshplan strategy needs under Ray: Ray's count of processes, checks, one checkpoint directory.

    Placed first in the bases, before the meshplan strategy, so that these overrides win.
    """

    @override
    def _process_counts(self) -> tuple[int, int]:
        context = _train_context()
        return context.get_world_size(), context.get_local_world_size()

    @override
    def _validate_layout(self) -> None:
        _train_context()  # first: outside a Ray Train worker nothing else below can hold
        check_runs_on_ray(self.plan)  # type: ignore[attr-defined]
        _check_ray_environment(self.cluster_environment)  # type: ignore[attr-defined]
        _check_backend(self.plan)  # type: ignore[attr-defined]
        check_workers_per_node(self.plan, _workers_per_node())  # type: ignore[attr-defined]
        super()._validate_layout()  # type: ignore[misc]

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        super().save_checkpoint(checkpoint, _one_directory_for_all_workers(filepath), storage_options)  # type: ignore[misc]


class RayDDP(_RayWorkers, DDP, RayDDPStrategy):
    """meshplan.DDP in a Ray Train worker: Ray's device, Ray's world for the sampler (RayDDPStrategy's)."""


class RayZeRO(_RayWorkers, ZeRO, RayDeepSpeedStrategy):
    """meshplan.ZeRO in a Ray Train worker: Ray's device, Ray's world for the sampler (RayDeepSpeedStrategy's)."""


class RayTensorParallel(_RayWorkers, TensorParallel):
    """meshplan.TensorParallel in a Ray Train worker.

    Ray has no tensor-parallel strategy, and ``prepare_trainer`` accepts only instances of its
    three. Of what those add to Lightning's classes, this class takes the device from Ray
    (``root_device``); the sampler's replicas and rank come from the data-parallel dimension of
    the mesh, as in ModelParallelStrategy: Ray's whole world would split a batch that the ranks
    of a tensor-parallel group must share. Deriving from RayDDPStrategy would put DDPStrategy's
    methods inside ModelParallelStrategy's ``super()`` chains (set-up, teardown), so the class is
    instead registered as a virtual subclass of RayDDPStrategy (meshplan._compat.ray): Ray's
    ``isinstance`` test passes, and nothing of DDP's runs. ``isinstance(strategy, DDPStrategy)``
    is then true as well; Lightning uses that test only to call a run distributed (it is) and to
    let a ``torch.compile``d LightningModule through (``lightning.pytorch.utilities.from_compiled``),
    which Lightning refuses under plain meshplan.TensorParallel; such a module is untested here.
    """

    @property
    @override
    def root_device(self) -> torch.device:
        return ray.train.torch.get_device()


accept_in_prepare_trainer(RayTensorParallel)


def _train_context() -> Any:
    """Ray Train's context of this worker, or a PlanError outside a Ray Train worker."""
    try:
        return ray.train.get_context()
    except RuntimeError as error:
        raise PlanError(
            f"meshplan.ray strategies run inside Ray Train's training function (TorchTrainer(train_func).fit()), where "
            f"Ray counts the workers; outside it use meshplan.from_recipe(...) or meshplan.DDP/ZeRO/TensorParallel. "
            f"Ray said: {error}"
        ) from None


def check_workers_per_node(plan: Plan, workers_per_node: list[int]) -> None:
    """Refuses a layout that does not fit the workers Ray placed on each node (one entry per worker, by rank).

    Ray packs workers onto nodes as resources allow, so nodes can hold different numbers of
    them. Every worker sees the whole list and reaches the same verdict, before any collective
    of the layout's.
    """
    if plan.strategy != "tp":
        return
    counts = sorted(set(workers_per_node))
    if plan.tp_size is None and len(counts) > 1:
        raise PlanError(
            f"TensorParallel() with no tp_size takes every worker of a node, but Ray placed {', '.join(map(str, counts))} "
            f"workers on different nodes. Pass a tp_size that divides each of those, or give every node the same number "
            f"of workers (ScalingConfig's num_workers a multiple of the nodes, with resources_per_worker that fill a node)."
        )
    for count in counts:
        plan.check_world_size(len(workers_per_node), count)


def _workers_per_node() -> list[int]:
    """Ray's count of workers on each worker's node, by world rank (gathered in Ray's process group)."""
    local = _train_context().get_local_world_size()
    if not dist.is_initialized():
        return [local]
    counts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(counts, local)
    return counts


def _check_ray_environment(environment: Any) -> None:
    """Refuses a Trainer without RayLightningEnvironment: Lightning's own would count one process per worker."""
    if not isinstance(environment, RayLightningEnvironment):
        raise PlanError(
            f"meshplan.ray strategies need the Trainer to read ranks from Ray: pass "
            f"plugins=[ray.train.lightning.RayLightningEnvironment()] to lightning.Trainer (the cluster environment is "
            f"{type(environment).__name__})."
        )


def _check_backend(plan: Plan) -> None:
    """Refuses a process_group_backend other than the one Ray Train started the process group with."""
    wanted = plan.option("process_group_backend")
    if wanted is not None and dist.is_initialized() and dist.get_backend() != wanted:
        raise PlanError(
            f"option process_group_backend={wanted!r}, but Ray Train started the process group with "
            f"{dist.get_backend()!r}: drop the option and choose the backend with "
            f"TorchTrainer(..., torch_config=ray.train.torch.TorchConfig(backend={wanted!r}))."
        )


def _one_directory_for_all_workers(filepath: Any) -> Any:
    """The checkpoint path every worker writes to: its own if all agree, else rank 0's. Collective.

    ``RayTrainReportCallback`` gives each worker a directory of its own (named after its world
    rank) and reports each one; Ray merges the reported directories into one. A meshplan
    checkpoint is one directory that every worker writes its share of and rank 0 publishes, so
    it goes whole into rank 0's directory, and the other workers report empty ones.
    """
    if not dist.is_initialized():
        return filepath
    paths: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(paths, os.path.abspath(filepath))
    if len(set(paths)) == 1:
        return filepath
    folder = os.path.dirname(paths[0])
    # Rank 0 makes the folder (RayTrainReportCallback has made it already); every rank then
    # learns whether that failed, and which ranks see it, before any of them writes.
    problem = _make_folder(folder) if dist.get_rank() == 0 else None
    problems: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    if problems[0] is not None:
        raise CheckpointError(f"rank 0 could not create the checkpoint folder {shown_path(folder)}, which every worker "
                              f"writes into: {problems[0]}.")
    seen: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(seen, os.path.isdir(folder))
    blind = [rank for rank, visible in enumerate(seen) if not visible]
    if blind:
        raise CheckpointError(
            f"the workers save to different paths (Ray's RayTrainReportCallback gives each its own), and a meshplan "
            f"checkpoint is one directory they write together, so they write into rank 0's folder "
            f"{shown_path(folder)}, which rank(s) {', '.join(map(str, blind))} cannot reach. Put the workers' temporary "
            f"directory on storage every node shares (RunConfig(worker_runtime_env={{'env_vars': {{'TMPDIR': "
            f"'/shared/tmp'}}}})), or save with trainer.save_checkpoint(<one shared path>) and report that directory "
            f"with ray.train.report(checkpoint=ray.train.Checkpoint.from_directory(...))."
        )
    return paths[0]


def _make_folder(folder: str) -> str | None:
    """Creates ``folder``; returns why that failed (the OS's reason), or None."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        return error.strerror or str(error)
    return None
