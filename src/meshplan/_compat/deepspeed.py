"""The DeepSpeed internals meshplan relies on, read from deepspeed 0.19.8.

meshplan saves and loads ZeRO's state one whole tensor at a time, in any layout; for that it
must tell ZeRO's parameters and optimizers apart, find each parameter's flat fp32 partition and
cut a whole tensor as ZeRO-3 cuts it. DeepSpeed's public ``deepspeed.utils`` getters and setters
(``safe_get_full_*``, ``safe_set_full_*``, ``safe_set_local_*``, ``lazy_init_hp_params_optimizer_state``)
do the rest and are called directly. The planner's measurements also read which gradient
buffers a ZeRO optimizer holds and what its offload keeps on the CPU. DeepSpeed is imported only
where it is used: ``import meshplan`` does not load it.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from meshplan._compat import Internal, require_attributes, require_parameters, require_source

READ_FROM = "0.19.8"

# What DeepSpeed imports the first time a process builds a ZeRO engine: its engines, its op
# builders and (0.19.8) its Muon optimizer, which imports torch's inductor. About 2.5 s of CPU per
# process; meshplan.testing's fork server imports them once for all its workers.
ENGINE_MODULES = ("deepspeed.runtime.engine", "deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.zero.stage3",
                  "deepspeed.runtime.zero.muon.original_muon", "deepspeed.ops.op_builder.all_ops")

# DeepSpeedEngine's step counters, which its own checkpoints save and restore.
ENGINE_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")


# ---------------------------------------------------------------- ZeRO parameters


def is_zero3_parameter(tensor: torch.Tensor) -> bool:
    """Whether ZeRO-3 partitions ``tensor`` (``Init`` gives each such parameter a ``ds_id``; deepspeed 0.19.8)."""
    return hasattr(tensor, "ds_id")


def has_zero12_master(tensor: torch.Tensor) -> bool:
    """Whether a ZeRO 1/2 optimizer keeps a fp32 master fragment of ``tensor`` (its ``_hp_mapping``; deepspeed 0.19.8)."""
    return hasattr(tensor, "_hp_mapping")


def zero3_optimizer(tensor: torch.Tensor) -> Any:
    """The ZeRO-3 optimizer that steps ``tensor`` (``_z3_optimizer``), or None; deepspeed 0.19.8."""
    return getattr(tensor, "_z3_optimizer", None)


def has_fp32_master(tensor: torch.Tensor) -> bool:
    """Whether a ZeRO optimizer keeps a fp32 master copy of ``tensor``: what ``deepspeed.utils.safe_*_fp32_param``
    and ``safe_*_optimizer_state`` read and write (deepspeed 0.19.8)."""
    return has_zero12_master(tensor) or zero3_optimizer(tensor) is not None


def full_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """The whole shape of a parameter: ZeRO-3's ``ds_shape`` for a partitioned one (its own is empty), else its shape."""
    return tuple(tensor.ds_shape) if is_zero3_parameter(tensor) else tuple(tensor.shape)


def zero3_local_part(parameter: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of the whole tensor ``full`` as ZeRO-3 cuts ``parameter``: flattened, in parts of the
    size of its ``ds_tensor``, part number its rank in ``ds_process_group``, the last zero-padded (deepspeed
    0.19.8, ``Init._partition_param``). Local, no collective."""
    size = parameter.ds_tensor.numel()
    start = dist.get_rank(group=parameter.ds_process_group) * size
    flat = full.reshape(-1)
    count = max(0, min(size, flat.numel() - start))
    local = flat.new_zeros(size)
    local[:count] = flat[start:start + count]
    return local


def set_zero3_partition(parameter: torch.Tensor, full: torch.Tensor) -> None:
    """Puts this rank's part of the whole tensor ``full`` into ZeRO-3 ``parameter``'s partition (its ``ds_tensor``;
    deepspeed 0.19.8)."""
    with torch.no_grad():
        parameter.ds_tensor.data.view(-1).copy_(zero3_local_part(parameter, full))


# ---------------------------------------------------------------- ZeRO optimizers


def zero_optimizer_classes() -> tuple[type, ...]:
    """DeepSpeed's ZeRO optimizers (stage 1/2, stage 3; their deepspeed 0.19.8 modules), or () while DeepSpeed
    is not loaded (then no object can be one)."""
    if "deepspeed" not in sys.modules:
        return ()
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3)


def is_zero_optimizer(optimizer: Any) -> bool:
    """Whether ``optimizer`` is one of DeepSpeed's ZeRO optimizers."""
    classes = zero_optimizer_classes()
    return bool(classes) and isinstance(optimizer, classes)


def _is_zero3_optimizer(optimizer: Any) -> bool:
    classes = zero_optimizer_classes()
    return bool(classes) and isinstance(optimizer, classes[1])


def zero_partition_groups(optimizer: Any) -> list[list[nn.Parameter]]:
    """The model parameters of each flat partition a ZeRO optimizer steps: per parameter group for stages 1
    and 2 (``bit16_groups``), per sub-group for stage 3 (``fp16_groups``); deepspeed 0.19.8."""
    return optimizer.fp16_groups if _is_zero3_optimizer(optimizer) else optimizer.bit16_groups


def zero_flat_partitions(optimizer: Any) -> list[torch.Tensor]:
    """This rank's flat fp32 partition of each of ``zero_partition_groups``: what the wrapped torch optimizer
    steps and keys its state by (``fp32_partitioned_groups_flat``, ``single_partition_of_fp32_groups``; deepspeed 0.19.8)."""
    if _is_zero3_optimizer(optimizer):
        return optimizer.fp32_partitioned_groups_flat
    return optimizer.single_partition_of_fp32_groups


def zero_param_group_members(optimizer: Any) -> list[list[nn.Parameter]]:
    """The model parameters of each of a ZeRO optimizer's ``param_groups`` (stage 3 splits a group into
    sub-groups, mapped back by ``sub_group_to_group_id``; deepspeed 0.19.8)."""
    if not _is_zero3_optimizer(optimizer):
        return optimizer.bit16_groups
    members: list[list[nn.Parameter]] = [[] for _ in optimizer.param_groups]
    for sub_group, parameters in enumerate(optimizer.fp16_groups):
        members[optimizer.sub_group_to_group_id[sub_group]].extend(parameters)
    return members


def zero_flat_state(optimizer: Any) -> dict[torch.Tensor, dict[str, Any]]:
    """The state of the torch optimizer a ZeRO optimizer wraps (its ``optimizer``), keyed by the flat
    partitions of ``zero_flat_partitions``; deepspeed 0.19.8."""
    return optimizer.optimizer.state


def link_zero12_optimizer_state(optimizer: Any) -> None:
    """Points each parameter of a ZeRO 1/2 optimizer at its fragment of the flat optimizer state, as DeepSpeed
    does after its first step (for state made before it); a no-op for ZeRO-3. Public
    ``deepspeed.utils.lazy_init_hp_params_optimizer_state``, in place of the optimizer's private
    ``_lazy_init_hp_params_optimizer_state``, which does the same once per optimizer."""
    if _is_zero3_optimizer(optimizer):
        return
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    state = zero_flat_state(optimizer)
    for parameters, flat in zip(optimizer.bit16_groups, optimizer.single_partition_of_fp32_groups):
        if flat in state:
            lazy_init_hp_params_optimizer_state(parameters, flat, state)


def zero3_optimizers(tensors: Any) -> list[Any]:
    """The ZeRO-3 optimizers that partition any of ``tensors``, each once."""
    found: dict[int, Any] = {}
    for tensor in tensors:
        optimizer = zero3_optimizer(tensor)
        if optimizer is not None:
            found[id(optimizer)] = optimizer
    return list(found.values())


def release_zero3_parameters(optimizer: Any) -> None:
    """Partitions every parameter of a ZeRO-3 optimizer, persistent ones included, before they are loaded
    (``checkpoint_event_prologue``, as DeepSpeed's own ``load_checkpoint`` does; deepspeed 0.19.8)."""
    optimizer.checkpoint_event_prologue()


def regather_zero3_parameters(optimizer: Any) -> None:
    """Gathers a ZeRO-3 optimizer's persistent parameters again from their loaded partitions
    (``checkpoint_event_epilogue``; deepspeed 0.19.8). Collective."""
    optimizer.checkpoint_event_epilogue()


# ---------------------------------------------------------------- the engine


def engine_counters(engine: Any) -> dict[str, int]:
    """A DeepSpeedEngine's step counters (``ENGINE_COUNTERS``; deepspeed 0.19.8)."""
    return {name: int(getattr(engine, name)) for name in ENGINE_COUNTERS}


def set_engine_counters(engine: Any, counters: dict[str, int]) -> None:
    """Sets a DeepSpeedEngine's step counters, as its own ``load_checkpoint`` does (deepspeed 0.19.8)."""
    for name in ENGINE_COUNTERS:
        setattr(engine, name, counters[name])


def remove_engine_forward_hooks(engine: Any) -> None:
    """Removes the forward hooks a DeepSpeedEngine put on its module (``module_forward_pre_hook`` and
    ``module_forward_post_hook``, which ``destroy`` leaves in place; deepspeed 0.19.8)."""
    for name in ("module_forward_pre_hook", "module_forward_post_hook"):
        handle = getattr(engine, name, None)  # absent on an engine that never hooked its module
        if handle is not None:
            handle.remove()


def use_cpu_accelerator() -> None:
    """Makes DeepSpeed run on the CPU even where it found GPUs (its ``CPU_Accelerator``, set through the
    public ``deepspeed.accelerator.set_accelerator``; deepspeed 0.19.8)."""
    from deepspeed.accelerator import get_accelerator, set_accelerator

    if get_accelerator().device_name() != "cpu":
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        set_accelerator(CPU_Accelerator())


def build_cpu_communication_op() -> None:
    """Compiles (or loads from its cache) the C++ op DeepSpeed's CPU communication loads in each worker,
    ``ShareMemCommBuilder`` (deepspeed 0.19.8), so that workers do not race to build it."""
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    ShareMemCommBuilder().load()


# ---------------------------------------------------------------- what ZeRO holds (planner/measure.py)


def zero3_partition(parameter: torch.Tensor) -> torch.Tensor:
    """This rank's partition of a ZeRO-3 parameter (its ``ds_tensor``; deepspeed 0.19.8). The parameter's own
    data is empty, or the whole tensor while it is gathered or persistent (small parameters stay whole)."""
    return parameter.ds_tensor


def zero_gradient_tensors(optimizer: Any) -> list[torch.Tensor]:
    """The gradient buffers a ZeRO optimizer holds now, besides the parameters' ``.grad`` (deepspeed 0.19.8):
    the reduced gradient partitions (``averaged_gradients``; stage 1/2's ``grads_in_partition``, stage 3's
    ``grad_partitions_flat_buffer``) and the fp32 gradient of each flat fp32 partition, while the step has
    it (offload keeps it). Communication buckets are not gradients and are left out."""
    tensors = [flat.grad for flat in zero_flat_partitions(optimizer) if flat.grad is not None]
    for value in getattr(optimizer, "averaged_gradients", {}).values():  # group -> list, tensor or None
        tensors += [value] if isinstance(value, torch.Tensor) else [tensor for tensor in value or [] if tensor is not None]
    buffer_name = "grad_partitions_flat_buffer" if _is_zero3_optimizer(optimizer) else "grads_in_partition"
    buffer = getattr(optimizer, buffer_name, None)  # made on first use (stage 1/2 offload) or at init (stage 3)
    return tensors + ([buffer] if buffer is not None else [])


def zero_offload(optimizer: Any) -> tuple[bool, bool]:
    """Whether a ZeRO optimizer keeps its optimizer states and fp32 masters on the CPU, and whether it keeps
    the parameters' partitions there (stage 3): ``cpu_offload`` (stage 1/2), ``offload_optimizer`` and
    ``offload_param`` (stage 3); deepspeed 0.19.8."""
    if _is_zero3_optimizer(optimizer):
        return bool(optimizer.offload_optimizer), bool(optimizer.offload_param)
    return bool(optimizer.cpu_offload), False


def zero_offloaded_tensors(optimizer: Any) -> list[torch.Tensor]:
    """The model-state tensors a ZeRO optimizer's offload keeps on the CPU (deepspeed 0.19.8): with an
    offloaded optimizer the fp32 partitions, their gradients and the optimizer state (and stage 3's gradient
    partitions, which it then makes on the CPU); with offloaded parameters every parameter's partition."""
    optimizer_offloaded, parameters_offloaded = zero_offload(optimizer)
    tensors: list[torch.Tensor] = []
    if optimizer_offloaded:
        for flat in zero_flat_partitions(optimizer):
            tensors += [flat] + ([flat.grad] if flat.grad is not None else [])
        tensors += [value for state in zero_flat_state(optimizer).values() for value in state.values()
                    if isinstance(value, torch.Tensor)]
        if _is_zero3_optimizer(optimizer) and optimizer.grad_partitions_flat_buffer is not None:
            tensors.append(optimizer.grad_partitions_flat_buffer)
    if parameters_offloaded:
        tensors += [zero3_partition(parameter) for group in zero_partition_groups(optimizer) for parameter in group]
    return tensors


def forget_zero3_module(module: nn.Module) -> None:
    """Lets a finished ZeRO-3 model, its engine and their buffers be freed (deepspeed 0.19.8), for a process
    that trains several engines one after the other: each engine puts its model on a process-wide stack of
    modules in forward when it is built and never takes it off (``parameter_offload.FWD_MODULE_STACK``), and
    its parameter coordinator caches, for the whole process, which parameters each submodule releases
    (``PartitionedParameterCoordinator.__params_to_release``, an ``lru_cache`` keyed by the coordinator and
    submodule). ``destroy`` leaves both. This drops ``module`` and its submodules from the stack (a forward
    recomputed by activation checkpointing leaves submodules there too) and empties the cache (which live
    engines fill again as they go)."""
    from deepspeed.runtime.zero import parameter_offload

    owned = {id(submodule) for submodule in module.modules()}
    parameter_offload.FWD_MODULE_STACK[:] = [entry for entry in parameter_offload.FWD_MODULE_STACK if id(entry) not in owned]
    _params_to_release_cache().cache_clear()


def _params_to_release_cache() -> Any:
    """The ``lru_cache`` of ``PartitionedParameterCoordinator.__params_to_release``, under DeepSpeed's
    ``instrument_w_nvtx`` wrapper, which keeps it in its closure."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    function = vars(PartitionedParameterCoordinator)["_PartitionedParameterCoordinator__params_to_release"]
    candidates = [function, *(cell.cell_contents for cell in function.__closure__ or ())]
    return next(candidate for candidate in candidates if hasattr(candidate, "cache_clear"))


# ---------------------------------------------------------------- canaries


def _stage12() -> type:
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return DeepSpeedZeroOptimizer


def _stage3() -> type:
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    return DeepSpeedZeroOptimizer_Stage3


def _engine() -> type:
    from deepspeed.runtime.engine import DeepSpeedEngine

    return DeepSpeedEngine


def _check_zero3_parameter_attributes() -> None:
    from deepspeed.runtime.zero.partition_parameters import Init

    require_source(Init._convert_to_deepspeed_param, "param.ds_id =", "param.ds_shape =", "param.ds_tensor =",
                    "param.ds_process_group =")


def _check_zero3_partition_layout() -> None:
    from deepspeed.runtime.zero.partition_parameters import Init

    # Init's own source: _partition_param is wrapped by a decorator that hides it.
    require_source(Init, "param.ds_tensor = partitioned_tensor")
    require_source(Init.get_partition_dp_group, "return param.ds_process_group")
    if hasattr(Init, "_partition_rank"):  # 0.19: each parameter's rank in its own group
        require_source(Init, "start = partition_size * self._partition_rank(param)")
        require_source(Init._partition_rank, "dist.get_rank(group=self.get_partition_dp_group(param))")
    else:  # 0.17-0.18: the rank in Init's group, which is every parameter's ds_process_group
        require_source(Init, "start = partition_size * self.get_partition_rank()",
                       "self.rank = dist.get_rank(group=self.ds_process_group)")


def _check_hp_mapping() -> None:
    from deepspeed.utils import link_hp_params, safe_set_full_fp32_param

    require_source(link_hp_params, "lp_param._hp_mapping =")
    require_source(safe_set_full_fp32_param, "hasattr(param, '_hp_mapping')")


def _check_z3_optimizer() -> None:
    from deepspeed.utils import safe_set_local_fp32_param

    require_source(_stage3(), "p._z3_optimizer = self")
    require_source(safe_set_local_fp32_param, "param._z3_optimizer.set_local_hp_param(value, param)")


def _check_local_setters() -> None:
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    require_parameters(safe_set_local_fp32_param, "param", "value")
    require_parameters(safe_set_local_optimizer_state, "param", "value", "optim_state_key")
    # The local value is as large as the parameter's partition: what zero3_local_part cuts.
    require_source(_stage3().set_local_hp_param, "value.numel() == param.ds_tensor.numel(")


def _check_stage12_groups() -> None:
    require_source(_stage12().__init__, "self.optimizer = init_optimizer", "self.bit16_groups = []",
                    "self.single_partition_of_fp32_groups = []")


def _check_stage3_groups() -> None:
    require_source(_stage3().__init__, "self.optimizer = init_optimizer", "self.fp16_groups = []",
                    "self.fp32_partitioned_groups_flat = []", "self.sub_group_to_group_id = {}")


def _check_lazy_init() -> None:
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    require_parameters(lazy_init_hp_params_optimizer_state, "lp_param_list", "flat_hp_partition", "optimizer_state")
    # The private method it replaces loops over the same groups.
    require_source(_stage12(), "lazy_init_hp_params_optimizer_state(self.bit16_groups[i], "
                                "self.single_partition_of_fp32_groups[i]")


def _check_checkpoint_events() -> None:
    require_attributes(_stage3(), "checkpoint_event_prologue", "checkpoint_event_epilogue")


def _check_engine_counters() -> None:
    require_source(_engine().__init__, *(f"self.{name} = 0" for name in ENGINE_COUNTERS))
    require_attributes(_engine(), "train_batch_size", "gradient_accumulation_steps")


def _check_forward_hooks() -> None:
    require_source(_engine().__init__, "self.module_forward_pre_hook = ", "self.module_forward_post_hook = ")
    require_source(_engine(), "return self.module.register_forward_pre_hook(",
                    "return self.module.register_forward_hook(")


def _check_cpu_accelerator() -> None:
    from deepspeed.accelerator import set_accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    require_parameters(set_accelerator, "accel_obj")
    require_attributes(CPU_Accelerator, "device_name")


def _check_cpu_communication_op() -> None:
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    require_attributes(ShareMemCommBuilder, "load")
    # What DeepSpeed's torch communication backend loads in each worker on the CPU.
    require_source(importlib.import_module("deepspeed.comm.torch"), 'create_op_builder("ShareMemCommBuilder")')



def _check_gradient_buffers() -> None:
    require_source(_stage12().__init__, "self.averaged_gradients = {}")
    require_source(_stage12(), "self.grads_in_partition = torch.empty(", "self.single_partition_of_fp32_groups[i].grad =")
    require_source(_stage3(), "self.averaged_gradients = {}", "self.grad_partitions_flat_buffer: Tensor = torch.zeros(",
                   "self.fp32_partitioned_groups_flat[sub_group_id].grad = single_grad_partition")


def _check_offload_flags() -> None:
    require_source(_stage12().__init__, "self.cpu_offload = True")
    require_source(_stage3(), "self.offload_optimizer = True", "self.offload_param = True",
                   "self.device = get_accelerator().current_device_name() if not self.offload_optimizer else OffloadDeviceEnum.cpu")


def _check_module_stack() -> None:
    from deepspeed.runtime.zero import parameter_offload

    assert isinstance(parameter_offload.FWD_MODULE_STACK, list), "FWD_MODULE_STACK is no longer a list"
    require_source(parameter_offload.DeepSpeedZeRoOffload, "FWD_MODULE_STACK.append(self.module)")
    assert callable(_params_to_release_cache().cache_clear), "PartitionedParameterCoordinator.__params_to_release has no cache"


def _check_engine_modules() -> None:
    for module in ENGINE_MODULES:
        importlib.import_module(module)


INTERNALS: list[Internal] = [
    Internal("deepspeed", "Parameter.ds_id, ds_shape, ds_tensor, ds_process_group (ZeRO-3)",
             "tell ZeRO-3 parameters, their whole shape and their partition (checkpoint/, lightning tests)",
             READ_FROM, _check_zero3_parameter_attributes),
    Internal("deepspeed", "Init._partition_param (how ZeRO-3 cuts a parameter)",
             "cut a whole checkpoint tensor as ZeRO-3 cuts the parameter (zero3_local_part)",
             READ_FROM, _check_zero3_partition_layout),
    Internal("deepspeed", "Parameter._hp_mapping",
             "tell the parameters whose fp32 master a ZeRO 1/2 optimizer keeps", READ_FROM, _check_hp_mapping),
    Internal("deepspeed", "Parameter._z3_optimizer",
             "find the ZeRO-3 optimizer of a parameter (master copy, load around its checkpoint events)",
             READ_FROM, _check_z3_optimizer),
    Internal("deepspeed", "deepspeed.utils.safe_set_local_fp32_param, safe_set_local_optimizer_state "
                          "(replace _get_fp32_opt_state_partition and _get_param_partition_rank)",
             "set this rank's part of a ZeRO-3 master copy and optimizer state", READ_FROM, _check_local_setters),
    Internal("deepspeed", "DeepSpeedZeroOptimizer.bit16_groups, single_partition_of_fp32_groups, optimizer",
             "the parameters and flat fp32 partition of each ZeRO 1/2 group, and the state keyed by it",
             READ_FROM, _check_stage12_groups),
    Internal("deepspeed", "DeepSpeedZeroOptimizer_Stage3.fp16_groups, fp32_partitioned_groups_flat, "
                          "sub_group_to_group_id, optimizer",
             "the parameters and flat fp32 partition of each ZeRO-3 sub-group, its group, and the state keyed by it",
             READ_FROM, _check_stage3_groups),
    Internal("deepspeed", "deepspeed.utils.lazy_init_hp_params_optimizer_state "
                          "(replaces _lazy_init_hp_params_optimizer_state and _hp_optimizer_states_linked)",
             "link ZeRO 1/2 parameters to optimizer state that loading created", READ_FROM, _check_lazy_init),
    Internal("deepspeed", "DeepSpeedZeroOptimizer_Stage3.checkpoint_event_prologue, checkpoint_event_epilogue",
             "release and regather persistent ZeRO-3 parameters around loading them", READ_FROM, _check_checkpoint_events),
    Internal("deepspeed", "DeepSpeedEngine.global_steps, global_samples, micro_steps, skipped_steps",
             "save and restore the engine's step counters with a checkpoint", READ_FROM, _check_engine_counters),
    Internal("deepspeed", "DeepSpeedEngine.module_forward_pre_hook, module_forward_post_hook",
             "remove a finished engine's forward hooks before Lightning builds the next (lightning/zero.py)",
             READ_FROM, _check_forward_hooks),
    Internal("deepspeed", "deepspeed.accelerator.cpu_accelerator.CPU_Accelerator, set_accelerator",
             "run DeepSpeed on the CPU when the Trainer does, on a machine with GPUs (lightning/zero.py)",
             READ_FROM, _check_cpu_accelerator),
    Internal("deepspeed", "deepspeed.ops.op_builder.cpu.ShareMemCommBuilder",
             "build DeepSpeed's CPU communication op once before tests start workers (tests/conftest.py)",
             READ_FROM, _check_cpu_communication_op),
    Internal("deepspeed", "DeepSpeedZeroOptimizer.averaged_gradients, grads_in_partition; DeepSpeedZeroOptimizer_Stage3."
                          "averaged_gradients, grad_partitions_flat_buffer; the fp32 partitions' .grad",
             "count the gradient bytes a ZeRO rank holds (planner/measure.py)", READ_FROM, _check_gradient_buffers),
    Internal("deepspeed", "DeepSpeedZeroOptimizer.cpu_offload; DeepSpeedZeroOptimizer_Stage3.offload_optimizer, offload_param, device",
             "tell the model states ZeRO's offload keeps on the CPU (planner/measure.py)", READ_FROM, _check_offload_flags),
    Internal("deepspeed", ", ".join(ENGINE_MODULES),
             "import what building a ZeRO engine imports once, in the test workers' fork server (meshplan/testing.py)",
             READ_FROM, _check_engine_modules),
    Internal("deepspeed", "deepspeed.runtime.zero.parameter_offload.FWD_MODULE_STACK, "
                          "PartitionedParameterCoordinator.__params_to_release (its lru_cache)",
             "let a finished ZeRO-3 engine and its model be freed before the next layout (tests/scripts/planner_measure.py)",
             READ_FROM, _check_module_stack),
]
