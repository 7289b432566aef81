"""meshplan.ZeRO: Lightning's DeepSpeed strategy, on CPU as well as on CUDA.

Lightning's DeepSpeedStrategy refuses anything but CUDA; DeepSpeed itself trains on CPU (its
CPU accelerator, with gloo when oneCCL is absent). This subclass lifts Lightning's CUDA-only
checks and gives DeepSpeed the config rendered from the Plan; everything else is Lightning's.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch.nn import Module
from typing_extensions import override

from meshplan._compat.deepspeed import remove_engine_forward_hooks, use_cpu_accelerator
from meshplan._compat.lightning import (
    init_deepspeed_distributed,
    setup_environment_without_cuda_check,
    validate_device_index_selection,
)
from meshplan.deepspeed_config import deepspeed_config
from meshplan.errors import PlanError
from meshplan.lightning.base import PlanStrategyMixin, check_equal_batch_counts
from meshplan.plan import Plan


class ZeRO(PlanStrategyMixin, DeepSpeedStrategy):
    """DeepSpeed ZeRO data parallelism: optimizer state (stage 1), gradients (2) and parameters (3) sharded.

    Args:
        stage: 1, 2 or 3.
        engine: ``"deepspeed"``, or ``"fsdp2"`` for torch's FSDP2 (stages 2 and 3, no offload):
            ``ZeRO(stage=3, engine="fsdp2")`` then returns a ``meshplan.lightning.fsdp2.FSDP2``, a
            strategy built on Lightning's ModelParallelStrategy (not a DeepSpeedStrategy).
        offload_optimizer: keep optimizer state on the CPU and step it there.
        offload_parameters: keep parameters on the CPU between uses (stage 3 only).
        **options: DeepSpeed ``zero_optimization`` settings (``overlap_comm``,
            ``contiguous_gradients``, ``reduce_bucket_size``, ``allgather_bucket_size``,
            ``stage3_*``), ``pin_memory`` for offloaded buffers and ``process_group_backend``.

    The optimizer is the one ``configure_optimizers`` returns. Precision, gradient accumulation
    and clipping come from the Trainer, as with Lightning's own DeepSpeedStrategy.

    Example::

        trainer = lightning.Trainer(accelerator="cpu", devices=2, strategy=meshplan.ZeRO(stage=3))
    """

    def __new__(cls, stage: int = 2, offload_optimizer: bool = False, offload_parameters: bool = False, *,
                engine: str = "deepspeed", **options: Any) -> Any:
        # ZeRO(engine="fsdp2") is torch's FSDP2, which Lightning runs in ModelParallelStrategy, not in
        # DeepSpeedStrategy: the call builds meshplan.lightning.fsdp2.FSDP2 (not an instance of ZeRO,
        # so Python does not call __init__ on it again).
        if engine == "fsdp2" and cls is ZeRO:
            from meshplan.lightning.fsdp2 import FSDP2

            return FSDP2(stage, offload_optimizer, offload_parameters, **options)
        return super().__new__(cls)

    def __init__(self, stage: int = 2, offload_optimizer: bool = False, offload_parameters: bool = False, *,
                 engine: str = "deepspeed", **options: Any) -> None:
        self.plan = Plan.build(
            "zero", zero_stage=stage, engine=engine, offload_optimizer=offload_optimizer,
            offload_parameters=offload_parameters, options=options,
        )
        if not self.plan.uses_deepspeed:
            raise PlanError(f"{type(self).__name__} runs ZeRO on DeepSpeed, not engine={engine!r}; "
                            f"meshplan.ZeRO(stage={stage}, engine={engine!r}) builds the strategy for it.")
        super().__init__(config=deepspeed_config(self.plan), process_group_backend=self.plan.option("process_group_backend"))

    @override
    def setup_environment(self) -> None:
        self._validate_layout()
        _use_deepspeed_accelerator_for(self.root_device)
        # DeepSpeedStrategy.setup_environment only adds a CUDA-only check; skip to its parent.
        setup_environment_without_cuda_check(self)

    @override
    def setup_distributed(self) -> None:
        # DeepSpeedStrategy's body (canary: meshplan._compat.lightning), whose device-index check
        # only makes sense for CUDA devices.
        if self.root_device.type == "cuda":
            validate_device_index_selection(self.parallel_devices)
        reset_seed()
        self.set_world_ranks()
        init_deepspeed_distributed(self)

    @override
    def init_deepspeed(self) -> None:
        module = self.model
        if self.lightning_module.trainer.training:
            _unhook_earlier_engines(module)
        super().init_deepspeed()
        _remember_engine(module, self.model)

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Lightning's loop has already divided the loss by accumulate_grad_batches; DeepSpeed's
        # engine.backward would divide it by its gradient_accumulation_steps (the same number) again,
        # shrinking every accumulated gradient: invisible while clipping rescales them, and not
        # with AdamW's eps or a norm below the clip.
        kwargs.setdefault("scale_wrt_gas", False)
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    @override
    def process_dataloader(self, dataloader: object) -> object:
        if self.zero_stage_3 and dist.is_initialized():
            check_equal_batch_counts(dataloader, self.lightning_module.trainer, "ZeRO stage 3",
                                     "run {stage} with ZeRO stage 1 or 2, or in one process")
        return super().process_dataloader(dataloader)

    @property
    @override
    def root_device(self) -> torch.device:
        # deepspeed.initialize is given the device index as the process's device rank; a plain
        # CPU device has none, so CPU processes get the local rank (tensors on "cpu:N" are on the CPU).
        device = super().root_device
        return torch.device("cpu", self.local_rank) if device.type == "cpu" else device


# Per module, the DeepSpeed engines built around it, weakly: what keeps an engine alive once its
# Trainer stage is over is the hooks it left on the module.
_EARLIER_ENGINES: weakref.WeakKeyDictionary[Module, list[weakref.ref]] = weakref.WeakKeyDictionary()


def _remember_engine(module: Module, engine: Any) -> None:
    """Notes that ``engine`` has put its hooks on ``module``."""
    _EARLIER_ENGINES.setdefault(module, []).append(weakref.ref(engine))


def _unhook_earlier_engines(module: Module) -> None:
    """Takes the hooks of every earlier DeepSpeed engine off ``module`` before a training engine is built.

    Every Trainer stage (validate, fit, test, ...), of any Trainer, builds a new engine, and under
    ZeRO-3 each engine hooks every submodule to gather its parameters. Lightning removes earlier
    hooks before an evaluation engine but not before a training one, so a fit after a validate
    also ran the evaluation engine's hooks, with that engine's own parameter-fetch trace; after a
    single validation batch that trace was still being recorded, under module ids the new engine
    had since renumbered, and the first training step failed inside DeepSpeed with "IndexError:
    pop from an empty deque". Those engines are finished with: ``destroy`` removes their ZeRO
    optimizer's module and gradient hooks, and the engine's own forward hooks are removed here
    (destroy leaves them, and they would keep the engine and its optimizer state alive).
    """
    for reference in _EARLIER_ENGINES.pop(module, []):
        engine = reference()
        if engine is None:
            continue
        engine.destroy()
        remove_engine_forward_hooks(engine)


def _use_deepspeed_accelerator_for(device: torch.device) -> None:
    """Points DeepSpeed at the CPU when the Trainer runs on CPU, even on a machine that has GPUs."""
    if device.type == "cpu":
        use_cpu_accelerator()
