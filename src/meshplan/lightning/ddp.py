"""meshplan.DDP: Lightning's DDP strategy, built from a validated Plan."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import DDPStrategy
from typing_extensions import override

from meshplan.lightning.base import PlanStrategyMixin
from meshplan.plan import Plan


class DDP(PlanStrategyMixin, DDPStrategy):
    """Distributed data parallel: every process holds the whole model, gradients are averaged.

    Args:
        **options: ``find_unused_parameters``, ``static_graph``, ``gradient_as_bucket_view``,
            ``bucket_cap_mb`` (forwarded to ``torch.nn.parallel.DistributedDataParallel``) and
            ``process_group_backend`` (derived from the device when unset: gloo on CPU, nccl on GPU).

    Example::

        trainer = lightning.Trainer(accelerator="cpu", devices=2, strategy=meshplan.DDP())
    """

    def __init__(self, **options: Any) -> None:
        self.plan = Plan.build("ddp", options=options)
        super().__init__(process_group_backend=self.plan.option("process_group_backend"), **self.plan.engine_options)

    @override
    def setup_environment(self) -> None:
        self._validate_layout()
        super().setup_environment()
