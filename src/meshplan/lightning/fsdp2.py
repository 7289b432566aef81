"""meshplan.ZeRO(engine="fsdp2"): ZeRO stages 2 and 3 run by torch's FSDP2 (``fully_shard``).

Built, like TensorParallel, on Lightning's ModelParallelStrategy (meshplan.lightning.model_parallel),
with a data-parallel dimension of the whole world and no tensor-parallel one: every Hugging Face
model inside the LightningModule is sharded block by block over all processes
(meshplan.fsdp.fully_shard_models), with no ``configure_model`` in the user's module. Stage 3
frees the gathered parameters after each block's forward; stage 2 keeps them to the backward.
"""

from __future__ import annotations

from typing import Any, Hashable

from typing_extensions import override

from meshplan.fsdp import average_plain_gradients, check_fsdp2_model, fully_shard_whole_models
from meshplan.lightning.model_parallel import ModelParallelPlanStrategy
from meshplan.plan import Plan


class FSDP2(ModelParallelPlanStrategy):
    """ZeRO sharded data parallelism on torch's FSDP2: gradients and optimizer state (stage 2) and parameters (3).

    What ``meshplan.ZeRO(stage, engine="fsdp2")`` returns; its ``plan`` is a ZeRO plan with engine "fsdp2".

    Args:
        stage: 2 (parameters stay gathered from each forward to its backward) or 3 (gathered
            block by block, freed after use).
        offload_optimizer, offload_parameters: not supported under FSDP2 (a PlanError names
            the DeepSpeed layout that offloads).
        **options: ``fsdp_layer_classes`` (comma-separated class names FSDP2 shards one by one;
            by default the model's transformer blocks), ``process_group_backend`` and the training
            settings a recipe may fix.

    Precision, gradient accumulation and clipping come from the Trainer.

    Example::

        trainer = lightning.Trainer(accelerator="cpu", devices=2, strategy=meshplan.ZeRO(stage=3, engine="fsdp2"))
    """

    _uneven_batches_alternative = "run {stage} with ZeRO stage 1 or 2 on DeepSpeed, or in one process"

    def __init__(self, stage: int = 3, offload_optimizer: bool = False, offload_parameters: bool = False,
                 **options: Any) -> None:
        self.plan = Plan.build("zero", zero_stage=stage, engine="fsdp2", offload_optimizer=offload_optimizer,
                               offload_parameters=offload_parameters, options=options)
        super().__init__(process_group_backend=self.plan.option("process_group_backend"))

    @override
    def _mesh_sizes(self) -> tuple[int, int]:
        return self._process_counts()[0], 1

    @override
    def _check_model(self) -> None:
        check_fsdp2_model(self.lightning_module, self.plan)

    @override
    def _shard(self) -> None:
        fully_shard_whole_models(self.lightning_module, self.plan, self.root_device, self.device_mesh["data_parallel"])

    @override
    def _average_gradients(self) -> None:
        average_plain_gradients(self.lightning_module.parameters(), self.device_mesh["data_parallel"])

    @override
    def _sharding(self) -> tuple[str, Hashable]:
        return (f"ZeRO(stage={self.plan.zero_stage}, engine='fsdp2')",
                ("fsdp2", self.plan.zero_stage, self.plan.option("fsdp_layer_classes")))
