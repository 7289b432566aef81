"""What meshplan's DTensor strategies share: Lightning's ModelParallelStrategy, sharded by meshplan in ``setup``.

meshplan.TensorParallel (TP, and TP x FSDP2) and meshplan.FSDP2 (ZeRO on torch's ``fully_shard``)
both run on Lightning's ModelParallelStrategy: its 2-D (data_parallel, tensor_parallel) device
mesh, its sampler over the data-parallel dimension, its process group. They differ only in how
the model is sharded on that mesh and how the gradients FSDP2 does not reduce are averaged, the
two methods each subclass gives. Everything else is here once: the checks before the process
group, sharding a module only once across Trainer entry points, gradient clipping that spans
DTensors on different meshes, and evaluation outside ``torch.inference_mode`` (FSDP2's
all-gather fails in it).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Hashable, Iterable

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.experimental import implicit_replication
from torch.optim import Optimizer
from typing_extensions import override

from meshplan._compat.lightning import clip_gradients_with, optimizers_to_device, set_model_parallel_sizes
from meshplan.errors import PlanError
from meshplan.fsdp import clip_grad_norm, is_fully_sharded
from meshplan.lightning.base import PlanStrategyMixin, check_equal_batch_counts
from meshplan.tp.shard import sharding_mesh


class ModelParallelPlanStrategy(PlanStrategyMixin, ModelParallelStrategy):
    """Lightning's ModelParallelStrategy with the model sharded by meshplan, no ``configure_model`` needed.

    Subclasses say how big the mesh is (``_mesh_sizes``), check the model before the process
    group (``_check_model``), shard it on the mesh (``_shard``) and average what FSDP2 does not
    (``_average_gradients``).
    """

    # -- what each layout gives ------------------------------------------------------------------

    # What a user can do instead of a loader that gives the processes different numbers of batches.
    _uneven_batches_alternative = "run {stage} in one process"

    def _mesh_sizes(self) -> tuple[int, int]:
        """(data-parallel size, tensor-parallel size) of the device mesh; their product is the world."""
        raise NotImplementedError

    def _check_model(self) -> None:
        """Refuses, before any process group exists, a model this layout cannot shard."""
        raise NotImplementedError

    def _shard(self) -> None:
        """Shards the LightningModule's models on ``self.device_mesh`` (collective)."""
        raise NotImplementedError

    def _average_gradients(self) -> None:
        """Averages over the data-parallel dimension the gradients that no engine has reduced (collective)."""
        raise NotImplementedError

    def _sharding(self) -> tuple[str, Hashable]:
        """How this layout shards a module: a description for messages, and a key equal for equal shardings."""
        raise NotImplementedError

    # -- Lightning's hooks -----------------------------------------------------------------------

    @override
    def setup_environment(self) -> None:
        # Everything that can be wrong with the layout is checked before the process group exists.
        self._validate_layout()
        _check_earlier_sharding(self.lightning_module, self._sharding())
        self._check_model()
        data_parallel, tensor_parallel = self._mesh_sizes()
        set_model_parallel_sizes(self, data_parallel=data_parallel, tensor_parallel=tensor_parallel)
        super().setup_environment()

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        # ModelParallelStrategy.setup's body (canary: meshplan._compat.lightning), with meshplan's
        # sharding in place of its configure_model requirement and materialization.
        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        self._shard_once()
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        # torch.nn.utils.clip_grad_norm_ cannot mix DTensors of different meshes (TP x FSDP2 has a
        # 2-D and a 1-D one) nor DTensors with plain tensors: the norm is meshplan's.
        clip_gradients_with(self.precision_plugin, norm=clip_grad_norm, value=_clip_local_values)
        if trainer.state.fn == TrainerFn.FITTING:
            optimizers_to_device(self.optimizers, self.root_device)

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        # Lightning runs forward and backward inside the closure; averaging right after it keeps
        # gradient clipping and the step on gradients of the whole global batch.
        def closure_then_average() -> Any:
            result = closure()
            self._average_gradients()
            return result

        # Sharded (DTensor) and replicated (plain) parameters meet in foreach optimizers; implicit
        # replication lets torch treat the plain ones as replicated DTensors.
        with implicit_replication():
            return super().optimizer_step(optimizer, closure_then_average, model, **kwargs)

    @override
    def process_dataloader(self, dataloader: object) -> object:
        if self.plan.uses_fsdp2 and dist.is_initialized():
            check_equal_batch_counts(dataloader, self.lightning_module.trainer, "FSDP2", self._uneven_batches_alternative,
                                     self.distributed_sampler_kwargs["num_replicas"])
        return super().process_dataloader(dataloader)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with _outside_inference_mode():
            return super().validation_step(*args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        with _outside_inference_mode():
            return super().test_step(*args, **kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        with _outside_inference_mode():
            return super().predict_step(*args, **kwargs)

    # -- sharding once ---------------------------------------------------------------------------

    def _shard_once(self) -> None:
        """Shards the module, or checks that an earlier run sharded it the same way on the same processes.

        Every Trainer entry point (fit, validate, test, predict, on this Trainer or a new one) sets
        the strategy up again, but a module can be sharded only once: torch's distribute_module and
        fully_shard refuse a second time. A module sharded earlier is used as it is (its DTensors
        keep the earlier mesh, whose process groups live as long as the world does).
        """
        module = self.lightning_module
        ranks = self.device_mesh.mesh.tolist()
        earlier = _SHARDED.get(module)
        if earlier is None:
            self._shard()
            _SHARDED[module] = (self._sharding(), ranks)
        elif earlier[1] != ranks:
            raise PlanError(
                f"{type(module).__name__} was already sharded by {earlier[0][0]} over the mesh of ranks {earlier[1]}, but "
                f"this run's mesh is {ranks}; use a new module (or load a checkpoint into a new module with ckpt_path=...)."
            )


# Per LightningModule, weakly: how meshplan sharded it, ((description, key), mesh ranks).
_SHARDED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[str, Hashable], list]] = weakref.WeakKeyDictionary()


def _check_earlier_sharding(module: nn.Module, sharding: tuple[str, Hashable]) -> None:
    """Refuses, before any collective, a module that was sharded another way than ``sharding``."""
    earlier = _SHARDED.get(module)
    if earlier is None:
        if sharding_mesh(module) is not None or is_fully_sharded(module):
            raise PlanError(
                f"{type(module).__name__} holds parameters that were sharded outside meshplan (DTensors or FSDP2 "
                f"modules); give {sharding[0]} a whole module, or load a checkpoint into a new module with ckpt_path=...."
            )
        return
    (description, key), _ = earlier
    if key != sharding[1]:
        raise PlanError(
            f"{type(module).__name__} was already sharded by {description} and cannot be re-sharded as {sharding[0]}; "
            f"use the earlier layout, or a new module (or load a checkpoint into a new module with ckpt_path=...)."
        )


class _outside_inference_mode:
    """Runs an evaluation step under ``no_grad`` instead of ``inference_mode`` (which Lightning uses off gloo).

    The first forward of a fresh FSDP2 model over one process (one GPU) fails inside inference
    mode: FSDP2 records the versions of the tensors it gathers, which inference tensors lack
    ("Inference tensors do not track version counter"; torch 2.13, tests/test_conformance_lightning.py).
    A step run with inference mode switched off, and gradients off, computes the same values.
    """

    def __enter__(self) -> None:
        self._contexts = [torch.inference_mode(False), torch.no_grad()] if torch.is_inference_mode_enabled() else []
        for context in self._contexts:
            context.__enter__()

    def __exit__(self, *exc: Any) -> None:
        for context in reversed(self._contexts):
            context.__exit__(*exc)


@torch.no_grad()
def _clip_local_values(parameters: Iterable[torch.Tensor], clip_value: float) -> None:
    """Clamps every gradient to [-clip_value, clip_value]: elementwise, so each process clamps its own shard."""
    for parameter in parameters:
        if parameter.grad is not None:
            grad = parameter.grad.to_local() if isinstance(parameter.grad, DTensor) else parameter.grad
            grad.clamp_(-clip_value, clip_value)
