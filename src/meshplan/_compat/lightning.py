"""Lightning internals meshplan relies on, each behind one small function, with a canary each.

Read from lightning 2.6.6. meshplan's strategies subclass Lightning's own (DDPStrategy,
DeepSpeedStrategy, ModelParallelStrategy) and reach past their public surface in a few places:
to run DeepSpeed on CPU (Lightning's DeepSpeedStrategy refuses anything but CUDA), to size
ModelParallelStrategy's mesh from the Plan, to shard the model in ``setup`` without a
``configure_model`` hook, and to put the strategy meshplan_auto chose into the running Trainer.
Each such place is here; ``INTERNALS`` lists a canary per touch point.

Public equivalents used instead (no wrapper, no canary): ``LightningOptimizer.optimizer`` for
``LightningOptimizer._optimizer``.

Private names are imported where they are used, so that one Lightning has dropped fails its
canary (and the code path that needs it), not the import of meshplan.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy
from torch.optim import Optimizer

from meshplan._compat import Internal, require_attributes, require_parameters, require_source, source_fingerprint

READ_FROM = "2.6.6"


# -- DeepSpeedStrategy on CPU (meshplan.lightning.zero) ----------------------------------------

def validate_device_index_selection(parallel_devices: list[torch.device]) -> None:
    """Lightning's check that CUDA device indices match the local ranks (DeepSpeedStrategy.setup_distributed; 2.6.6)."""
    from lightning.fabric.strategies.deepspeed import _validate_device_index_selection

    _validate_device_index_selection(parallel_devices)


def init_deepspeed_distributed(strategy: DeepSpeedStrategy) -> None:
    """Lightning's DeepSpeed process-group start (``deepspeed.init_distributed`` with its environment; 2.6.6)."""
    strategy._init_deepspeed_distributed()


def setup_environment_without_cuda_check(strategy: DeepSpeedStrategy) -> None:
    """DeepSpeedStrategy.setup_environment minus its CUDA-only refusal: its parent's, DDPStrategy's (2.6.6)."""
    DDPStrategy.setup_environment(strategy)


# DeepSpeedStrategy.setup_distributed, copied into meshplan.lightning.zero.ZeRO.setup_distributed
# with its device-index check limited to CUDA devices (fingerprint of lightning 2.6.6's).
SETUP_DISTRIBUTED_FINGERPRINTS = ("a7764dfde5c363d9",)
# DeepSpeedStrategy.setup_environment as read when meshplan chose to skip it (2.6.6): a CUDA check,
# then its parent's. A new version may add to it what meshplan would then skip too.
SETUP_ENVIRONMENT_FINGERPRINTS = ("87eb9ff78b274761",)


# -- ModelParallelStrategy without configure_model (meshplan.lightning.model_parallel) ----------

def set_model_parallel_sizes(strategy: ModelParallelStrategy, *, data_parallel: int, tensor_parallel: int) -> None:
    """Sizes ModelParallelStrategy's 2-D mesh once the world is known (its constructor's sizes, stored privately; 2.6.6).

    The constructor takes the sizes, but meshplan learns the number of processes per node only
    after Lightning has set the strategy's devices; ``setup_environment`` reads these attributes.
    """
    strategy._data_parallel_size = data_parallel
    strategy._tensor_parallel_size = tensor_parallel


def optimizers_to_device(optimizers: Iterable[Optimizer], device: torch.device) -> None:
    """Lightning's move of optimizer state to the device, as ModelParallelStrategy.setup does (2.6.6)."""
    from lightning.fabric.utilities.optimizer import _optimizers_to_device

    _optimizers_to_device(optimizers, device)


def clip_gradients_with(plugin: Any, *, norm: Callable[[list[torch.Tensor], float], Any],
                        value: Callable[[list[torch.Tensor], float], Any]) -> None:
    """Makes ``plugin`` clip gradients with ``norm(parameters, max_norm)`` and ``value(parameters, clip_value)``.

    Lightning's ``Precision.clip_gradients`` (which ``Trainer(gradient_clip_val=...)`` reaches
    through ``LightningModule.clip_gradients``) calls the plugin's ``clip_grad_by_norm`` or
    ``clip_grad_by_value``, which call torch's clipping on ``main_params(optimizer)`` (2.6.6); the
    plugin's own methods are replaced on this instance, the one the strategy's Trainer uses.
    """
    plugin.clip_grad_by_norm = lambda optimizer, clip_val: norm(list(plugin.main_params(optimizer)), clip_val)
    plugin.clip_grad_by_value = lambda optimizer, clip_val: value(list(plugin.main_params(optimizer)), clip_val)


# ModelParallelStrategy.setup, copied into meshplan.lightning.model_parallel.ModelParallelPlanStrategy.setup
# with the configure_model requirement and the materialization replaced by meshplan's sharding
# (fingerprint of lightning 2.6.6's).
MODEL_PARALLEL_SETUP_FINGERPRINTS = ("7a79a2378fefc19c",)


# -- DDPStrategy --------------------------------------------------------------------------------

def ddp_keyword_arguments(strategy: DDPStrategy) -> dict[str, Any]:
    """The keyword arguments a DDPStrategy forwards to DistributedDataParallel (its constructor's ``**kwargs``; 2.6.6)."""
    return dict(strategy._ddp_kwargs)


# -- meshplan_auto: the strategy chosen once the model is known (meshplan.lightning.auto) ------------

def replace_trainer_strategy(trainer: Any, strategy: Any) -> None:
    """Makes ``strategy`` the Trainer's: ``Trainer.strategy`` reads the accelerator connector's (2.6.6)."""
    trainer._accelerator_connector.strategy = strategy


def hand_over_launch(source: Any, target: Any) -> None:
    """Gives ``target`` the launcher that started these processes and the layer sync (``sync_batchnorm``)
    that the Trainer's connector set on ``source`` (stored privately; 2.6.6)."""
    target._launcher = source.launcher
    target._layer_sync = source._layer_sync


def given_train_loader(trainer: Any) -> Any:
    """What ``fit`` was given for training: the ``train_dataloaders`` argument, else the datamodule or module (2.6.6)."""
    return trainer.fit_loop._data_source.instance


# -- The checkpoint dict Lightning's Trainer writes and reads (meshplan.checkpoint.lightning_state) --

# The entry that names the Lightning version that wrote a checkpoint (2.6.6).
CHECKPOINT_VERSION_KEY = "pytorch-lightning_version"
# The entries that hold tensors: the LightningModule's weights and the optimizers' states (2.6.6).
CHECKPOINT_TENSOR_PARTS = ("state_dict", "optimizer_states")
# The loops whose states the "loops" entry holds (2.6.6).
CHECKPOINT_LOOPS = ("fit_loop", "validate_loop", "test_loop", "predict_loop")
# The older entry whose gradient-scaler state Lightning still loads into a mixed-precision plugin (2.6.6).
LEGACY_SCALER_KEY = "native_amp_scaling_state"


def checkpoint_key_of(owner: object) -> str:
    """The entry under which Lightning keeps the precision plugin's or the datamodule's state: its class's qualname (2.6.6)."""
    return type(owner).__qualname__


# -- Canaries -------------------------------------------------------------------------------------

def _require_fingerprint(function: Any, accepted: tuple[str, ...], copy: str) -> None:
    fingerprint = source_fingerprint(function)
    assert fingerprint in accepted, (
        f"its source changed (fingerprint {fingerprint}, copied at {', '.join(accepted)}); compare it with {copy} "
        f"and add the new fingerprint once that matches"
    )


def _check_validate_device_index_selection() -> None:
    from lightning.fabric.strategies.deepspeed import _validate_device_index_selection

    require_parameters(_validate_device_index_selection, "parallel_devices")
    _validate_device_index_selection([torch.device("cuda", 0), torch.device("cuda", 1)])  # indices match local ranks
    try:
        _validate_device_index_selection([torch.device("cuda", 1)])
    except RuntimeError:
        return
    raise AssertionError("it no longer refuses a device index that differs from the local rank")


def _check_init_deepspeed_distributed() -> None:
    require_attributes(DeepSpeedStrategy, "_init_deepspeed_distributed")
    parameters = list(inspect.signature(DeepSpeedStrategy._init_deepspeed_distributed).parameters)
    assert parameters == ["self"], f"it now takes {parameters}"


def _check_setup_distributed() -> None:
    _require_fingerprint(DeepSpeedStrategy.setup_distributed, SETUP_DISTRIBUTED_FINGERPRINTS,
                         "meshplan.lightning.zero.ZeRO.setup_distributed")


def _check_setup_environment() -> None:
    assert DeepSpeedStrategy.__bases__ == (DDPStrategy,), f"DeepSpeedStrategy's bases are now {DeepSpeedStrategy.__bases__}"
    _require_fingerprint(DeepSpeedStrategy.setup_environment, SETUP_ENVIRONMENT_FINGERPRINTS,
                         "meshplan.lightning.zero.ZeRO.setup_environment, which skips it")


def _check_parallel_size(name: str) -> None:
    strategy = ModelParallelStrategy()
    assert getattr(strategy, name, None) == "auto", f"a new ModelParallelStrategy has no {name} of 'auto'"
    require_source(ModelParallelStrategy.setup_environment, f"self.{name}")


def _check_optimizers_to_device() -> None:
    from lightning.fabric.utilities.optimizer import _optimizers_to_device

    require_parameters(_optimizers_to_device, "optimizers", "device")


def _check_model_parallel_setup() -> None:
    _require_fingerprint(ModelParallelStrategy.setup, MODEL_PARALLEL_SETUP_FINGERPRINTS,
                         "meshplan.lightning.model_parallel.ModelParallelPlanStrategy.setup")


def _check_clip_gradients() -> None:
    from lightning.pytorch.core.module import LightningModule
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision

    require_source(Precision.clip_gradients, "self.clip_grad_by_norm(optimizer, clip_val)",
                   "self.clip_grad_by_value(optimizer, clip_val)")
    require_source(LightningModule.clip_gradients, "self.trainer.precision_plugin.clip_gradients(")
    # The plugins ModelParallelStrategy gets (32-true, bf16-mixed) clip through Precision's methods.
    for plugin in (MixedPrecision, Precision):
        for name in ("clip_grad_by_norm", "clip_grad_by_value"):
            assert getattr(plugin, name) is getattr(Precision, name), f"{plugin.__name__} overrides {name}"


def _check_ddp_kwargs() -> None:
    strategy = DDPStrategy(static_graph=True, bucket_cap_mb=50)
    assert getattr(strategy, "_ddp_kwargs", None) == {"static_graph": True, "bucket_cap_mb": 50}, (
        "DDPStrategy(static_graph=True, bucket_cap_mb=50) no longer keeps them in _ddp_kwargs"
    )


def _check_checkpoint_dict() -> None:
    from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector

    require_source(_CheckpointConnector.dump_checkpoint, f'"{CHECKPOINT_VERSION_KEY}"', '"epoch"', '"global_step"',
                       *(f'"{part}"' for part in CHECKPOINT_TENSOR_PARTS), '"loops"', '"callbacks"', '"lr_schedulers"',
                       "prec_plugin.__class__.__qualname__", "datamodule.__class__.__qualname__")
    require_source(_CheckpointConnector._get_loops_state_dict, *(f'"{loop}"' for loop in CHECKPOINT_LOOPS))
    require_source(_CheckpointConnector.restore_precision_plugin_state, f'"{LEGACY_SCALER_KEY}"')


def _check_trainer_strategy() -> None:
    from lightning.pytorch import Trainer
    from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector

    require_source(Trainer.strategy.fget, "return self._accelerator_connector.strategy")
    require_source(_AcceleratorConnector._init_strategy, "self.strategy =")


def _check_launcher() -> None:
    from lightning.pytorch.strategies import Strategy

    require_source(Strategy.launcher.fget, "return self._launcher")
    require_source(DDPStrategy._configure_launcher, "self._launcher =")


def _check_layer_sync() -> None:
    from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector

    assert DDPStrategy()._layer_sync is None, "a new DDPStrategy has no _layer_sync of None"
    require_source(_AcceleratorConnector._lazy_init_strategy, "self.strategy._layer_sync = self._layer_sync")
    require_source(DDPStrategy.setup, "self._layer_sync")


def _check_train_data_source() -> None:
    from lightning.pytorch.loops import _FitLoop
    from lightning.pytorch.trainer.connectors.data_connector import _DataConnector, _DataLoaderSource

    require_source(_FitLoop.__init__, "self._data_source = _DataLoaderSource(")
    require_source(_DataConnector.attach_dataloaders,
                   "trainer.fit_loop._data_source.instance = train_dataloaders if train_dataloaders is not None else model")
    require_attributes(_DataLoaderSource(None, "train_dataloader"), "instance")


def _internal(name: str, purpose: str, check: Any) -> Internal:
    return Internal("lightning", name, purpose, READ_FROM, check)


INTERNALS: list[Internal] = [
    _internal("lightning.fabric.strategies.deepspeed._validate_device_index_selection",
              "ZeRO.setup_distributed checks CUDA device indices as DeepSpeedStrategy does",
              _check_validate_device_index_selection),
    _internal("DeepSpeedStrategy._init_deepspeed_distributed",
              "ZeRO.setup_distributed starts DeepSpeed's process group as DeepSpeedStrategy does",
              _check_init_deepspeed_distributed),
    _internal("DeepSpeedStrategy.setup_distributed (copied body)",
              "ZeRO.setup_distributed is a copy with the device-index check limited to CUDA",
              _check_setup_distributed),
    _internal("DeepSpeedStrategy.setup_environment (skipped for DDPStrategy.setup_environment)",
              "ZeRO.setup_environment skips only DeepSpeedStrategy's CUDA-only refusal",
              _check_setup_environment),
    _internal("ModelParallelStrategy._data_parallel_size",
              "TensorParallel sizes the data-parallel mesh dimension once the world is known",
              lambda: _check_parallel_size("_data_parallel_size")),
    _internal("ModelParallelStrategy._tensor_parallel_size",
              "TensorParallel sizes the tensor-parallel mesh dimension once the world is known",
              lambda: _check_parallel_size("_tensor_parallel_size")),
    _internal("lightning.fabric.utilities.optimizer._optimizers_to_device",
              "TensorParallel.setup moves optimizer state to the device as ModelParallelStrategy.setup does",
              _check_optimizers_to_device),
    _internal("ModelParallelStrategy.setup (copied body)",
              "TensorParallel.setup and FSDP2.setup are a copy that shards the model in place of configure_model",
              _check_model_parallel_setup),
    _internal("Precision.clip_gradients -> clip_grad_by_norm / clip_grad_by_value",
              "TensorParallel and FSDP2 clip gradients that span DTensors on several meshes with meshplan's norm",
              _check_clip_gradients),
    _internal("DDPStrategy._ddp_kwargs",
              "tests read the DistributedDataParallel arguments a DDP strategy forwards",
              _check_ddp_kwargs),
    _internal("Trainer._accelerator_connector.strategy",
              "meshplan_auto puts the strategy it chose in the Trainer once the model is known",
              _check_trainer_strategy),
    _internal("Strategy._launcher",
              "meshplan_auto gives the strategy it chose the launcher that started the processes",
              _check_launcher),
    _internal("ParallelStrategy._layer_sync",
              "meshplan_auto gives the strategy it chose the Trainer's sync_batchnorm",
              _check_layer_sync),
    _internal("_FitLoop._data_source.instance",
              "meshplan_auto plans for the batch size of the DataLoader passed to fit",
              _check_train_data_source),
    _internal("_CheckpointConnector.dump_checkpoint (checkpoint dict entries)",
              "meshplan.checkpoint.lightning_state saves, checks and restores the entries of Lightning's checkpoint dict",
              _check_checkpoint_dict),
]
