"""meshplan.TensorParallel: Megatron-style TP through torch DTensor, with no configure_model.

Built on Lightning's ModelParallelStrategy (its 2-D device mesh, sampler and checkpointing),
but the model is parallelized by meshplan: every Hugging Face model inside the LightningModule
is sharded with its own TP plan (or an inferred or user-given one), and gradients are averaged
across the data-parallel dimension before each optimizer step.
"""

from __future__ import annotations

from typing import Any, Callable

import lightning.pytorch as pl
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.experimental import implicit_replication
from torch.optim import Optimizer
from typing_extensions import override

from meshplan._compat.lightning import optimizers_to_device, set_model_parallel_sizes
from meshplan.errors import PlanError
from meshplan.lightning.base import PlanStrategyMixin
from meshplan.plan import Plan
from meshplan.tp.shard import plan_models, shard_models, sharding_mesh
from meshplan.tp.sync import average_gradients


class TensorParallel(PlanStrategyMixin, ModelParallelStrategy):
    """Tensor parallelism over ``tp_size`` processes, data parallelism over the rest.

    Args:
        tp_size: processes that share one sharded copy of the model. None means every process of
            a node. With more processes than ``tp_size`` the remaining factor is a data-parallel
            dimension (4 processes with tp_size=2 form a 2 x 2 mesh).
        tp_plan: ``{module pattern: style}`` in the syntax of ``base_model_tp_plan`` (patterns
            relative to the base model), overriding the model's own or inferred plan.
        **options: ``process_group_backend`` (derived from the device when unset).

    Example::

        trainer = lightning.Trainer(accelerator="cpu", devices=4, strategy=meshplan.TensorParallel(tp_size=2))
    """

    def __init__(self, tp_size: int | None = None, tp_plan: dict[str, str] | None = None, **options: Any) -> None:
        self.plan = Plan.build("tp", tp_size=tp_size, tp_plan=tp_plan, options=options)
        super().__init__(process_group_backend=self.plan.option("process_group_backend"))
        self._tp_plans: dict[str, dict[str, str]] = {}

    @property
    def tp_size(self) -> int:
        """The tensor-parallel size; ``tp_size=None`` resolves to the processes of one node."""
        return self.plan.resolved_tp_size(self._process_counts()[1])

    @override
    def setup_environment(self) -> None:
        # Everything that can be wrong with the layout is checked before the process group exists.
        world_size = self._process_counts()[0]
        self._validate_layout()
        _check_earlier_sharding(self.lightning_module, self.tp_size)  # the clearer message, before plan_models
        self._tp_plans = plan_models(self.lightning_module, self.tp_size, self.plan.tp_plan_dict)
        set_model_parallel_sizes(self, data_parallel=world_size // self.tp_size, tensor_parallel=self.tp_size)
        super().setup_environment()

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        # ModelParallelStrategy.setup's body (canary: meshplan._compat.lightning), with meshplan's
        # sharding in place of its configure_model requirement and materialization.
        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        tp_mesh = self.device_mesh["tensor_parallel"]
        # Every Trainer entry point (fit, validate, test, predict, on this Trainer or a new one) sets
        # the strategy up again, but a module can be sharded only once: torch's distribute_module
        # refuses a second time. A module sharded earlier over the same processes is used as it is
        # (its DTensors keep the earlier mesh, whose process groups live as long as the world does).
        earlier = sharding_mesh(self.lightning_module)
        if earlier is None:
            shard_models(self.lightning_module, self._tp_plans, self.root_device, tp_mesh, self.device_mesh["data_parallel"])
        else:
            _check_same_tensor_parallel_ranks(self.lightning_module, earlier, tp_mesh)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            optimizers_to_device(self.optimizers, self.root_device)

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        # Lightning runs forward and backward inside the closure; averaging right after it keeps
        # gradient clipping and the step on gradients of the whole global batch.
        def closure_then_average() -> Any:
            result = closure()
            average_gradients(self.lightning_module, self.device_mesh["data_parallel"])
            return result

        # Sharded (DTensor) and replicated (plain) parameters meet in clip_grad_norm_ and in foreach
        # optimizers; implicit replication lets torch treat the plain ones as replicated DTensors.
        with implicit_replication():
            return super().optimizer_step(optimizer, closure_then_average, model, **kwargs)


def _check_earlier_sharding(module: nn.Module, tp_size: int) -> None:
    """Refuses, before any collective, a module that an earlier run sharded over another tp_size."""
    mesh = sharding_mesh(module)
    if mesh is not None and mesh.size() != tp_size:
        raise PlanError(
            f"{type(module).__name__} was already sharded by TensorParallel over {mesh.size()} processes and cannot "
            f"be re-sharded over tp_size={tp_size}; use the earlier tp_size, or a new module (or load a checkpoint "
            f"into a new module with ckpt_path=...)."
        )


def _check_same_tensor_parallel_ranks(module: nn.Module, earlier: DeviceMesh, tp_mesh: DeviceMesh) -> None:
    """Refuses a module sharded earlier (over ``earlier``) on other processes than this run's tensor-parallel group."""
    if earlier.mesh.tolist() != tp_mesh.mesh.tolist():
        raise PlanError(
            f"{type(module).__name__} was already sharded by TensorParallel over ranks {earlier.mesh.tolist()}, but "
            f"this run's tensor-parallel group is {tp_mesh.mesh.tolist()}; use a new module (or load a checkpoint "
            f"into a new module with ckpt_path=...)."
        )
