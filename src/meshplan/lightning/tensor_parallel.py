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
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from torch.distributed.tensor.experimental import implicit_replication
from torch.optim import Optimizer
from typing_extensions import override

from meshplan.errors import PlanError
from meshplan.lightning.base import PlanStrategyMixin
from meshplan.plan import Plan
from meshplan.tp.plans import check_tp_size, find_pretrained_models, resolve_tp_plan
from meshplan.tp.apply import apply_tp_plan, match_plan
from meshplan.tp.sync import average_gradients, broadcast_parameters


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
        return self.plan.resolved_tp_size(self.num_processes)

    @override
    def setup_environment(self) -> None:
        # Everything that can be wrong with the layout is checked before the process group exists.
        world_size = self.num_nodes * self.num_processes
        self._validate_layout()
        self._tp_plans = self._plan_models()
        self._tensor_parallel_size = self.tp_size
        self._data_parallel_size = world_size // self.tp_size
        super().setup_environment()

    def _plan_models(self) -> dict[str, dict[str, str]]:
        models = find_pretrained_models(self.lightning_module)
        if not models:
            raise PlanError(
                f"TensorParallel found no transformers.PreTrainedModel inside {type(self.lightning_module).__name__}; "
                f"it shards Hugging Face models. Keep the model as an attribute of the LightningModule."
            )
        plans = {}
        for name, model in models:
            check_tp_size(model, self.tp_size)
            plans[name] = match_plan(model, resolve_tp_plan(model, self.plan.tp_plan_dict))
        return plans

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        tp_mesh = self.device_mesh["tensor_parallel"]
        modules = dict(self.lightning_module.named_modules())
        for name, plan in self._tp_plans.items():
            apply_tp_plan(modules[name], plan, tp_mesh)
        # Every data-parallel replica starts from the same weights, whatever each process built.
        broadcast_parameters(self.lightning_module, self.device_mesh["data_parallel"])
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

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
