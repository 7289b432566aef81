"""meshplan.TensorParallel: Megatron-style TP through torch DTensor, with no configure_model.

Built on Lightning's ModelParallelStrategy (meshplan.lightning.model_parallel): every Hugging
Face model inside the LightningModule is sharded with its own TP plan (or an inferred or
user-given one). Across the data-parallel dimension the TP-sharded model is either replicated,
with gradients averaged before each optimizer step, or sharded once more by FSDP2
(``data_parallel="shard"``, torchtitan's 2-D layout), which then reduces the gradients itself.
"""

from __future__ import annotations

from typing import Any, Hashable

from typing_extensions import override

from meshplan.fsdp import average_plain_gradients, check_fsdp2_model, fully_shard_models
from meshplan.lightning.model_parallel import ModelParallelPlanStrategy
from meshplan.plan import Plan
from meshplan.tp.shard import plan_models, shard_models
from meshplan.tp.sync import average_gradients


class TensorParallel(ModelParallelPlanStrategy):
    """Tensor parallelism over ``tp_size`` processes, data parallelism over the rest.

    Args:
        tp_size: processes that share one sharded copy of the model. None means every process of
            a node. With more processes than ``tp_size`` the remaining factor is a data-parallel
            dimension (4 processes with tp_size=2 form a 2 x 2 mesh).
        tp_plan: ``{module pattern: style}`` in the syntax of ``base_model_tp_plan`` (patterns
            relative to the base model), overriding the model's own or inferred plan.
        data_parallel: ``"replicate"``: every data-parallel replica holds the whole TP-sharded
            model and gradients are averaged across replicas; ``"shard"``: FSDP2 shards the
            TP-sharded model over the replicas too (parameters, gradients and optimizer state),
            after TP, as torchtitan does.
        **options: ``process_group_backend`` (derived from the device when unset) and, with
            ``data_parallel="shard"``, ``fsdp_layer_classes`` (the blocks FSDP2 shards one by one).

    Example::

        trainer = lightning.Trainer(accelerator="cpu", devices=4,
                                    strategy=meshplan.TensorParallel(tp_size=2, data_parallel="shard"))
    """

    _uneven_batches_alternative = "run {stage} with data_parallel='replicate', or in one process"

    def __init__(self, tp_size: int | None = None, tp_plan: dict[str, str] | None = None,
                 data_parallel: str = "replicate", **options: Any) -> None:
        self.plan = Plan.build("tp", tp_size=tp_size, tp_plan=tp_plan, data_parallel=data_parallel, options=options)
        super().__init__(process_group_backend=self.plan.option("process_group_backend"))
        self._tp_plans: dict[str, dict[str, str]] = {}

    @property
    def tp_size(self) -> int:
        """The tensor-parallel size; ``tp_size=None`` resolves to the processes of one node."""
        return self.plan.resolved_tp_size(self._process_counts()[1])

    @override
    def _mesh_sizes(self) -> tuple[int, int]:
        return self._process_counts()[0] // self.tp_size, self.tp_size

    @override
    def _check_model(self) -> None:
        self._tp_plans = plan_models(self.lightning_module, self.tp_size, self.plan.tp_plan_dict)
        if self.plan.uses_fsdp2:
            check_fsdp2_model(self.lightning_module, self.plan)

    @override
    def _shard(self) -> None:
        data_parallel = self.device_mesh["data_parallel"]
        # TP first; every data-parallel replica then starts from the weights of data-parallel rank 0.
        shard_models(self.lightning_module, self._tp_plans, self.root_device, self.device_mesh["tensor_parallel"],
                     data_parallel)
        if self.plan.uses_fsdp2:
            fully_shard_models(self.lightning_module, self.plan, data_parallel)

    @override
    def _average_gradients(self) -> None:
        data_parallel = self.device_mesh["data_parallel"]
        if self.plan.uses_fsdp2:  # FSDP2 has reduced the gradients of what it shards
            average_plain_gradients(self.lightning_module.parameters(), data_parallel)
        else:
            average_gradients(self.lightning_module, data_parallel)

    @override
    def _sharding(self) -> tuple[str, Hashable]:
        description = f"TensorParallel over {self.tp_size} processes (tp_size={self.tp_size}, " \
                      f"data_parallel={self.plan.data_parallel!r})"
        return description, ("tp", self.tp_size, self.plan.tp_plan, self.plan.data_parallel,
                             self.plan.option("fsdp_layer_classes"))
