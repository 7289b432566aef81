"""Plan -> accelerate.Accelerator, on CPU (gloo, every worker counted) and on GPUs.

A script written for plain Accelerate (prepare, backward, step, reduce, save_state) needs no
other change than ``accelerator = meshplan.accelerator()``. What meshplan adds to Accelerate:

- CPU workers are counted: Accelerate only runs multi-process on CPU when asked for the CPU,
  and DeepSpeed needs the gloo backend named, or it sees one process and refuses the batch size.
- ZeRO's DeepSpeed config is rendered by meshplan.deepspeed_config, like every front end's.
- Tensor parallelism applies meshplan's TP plan in ``prepare`` to models built or loaded the
  ordinary way, shards the data over the data-parallel dimension only, and averages gradients
  over it.
- FSDP2 (ZeRO(engine="fsdp2"), TensorParallel(data_parallel="shard")) shards the models in
  ``prepare`` with meshplan.fsdp, block by block; a launched FSDP config is read from the
  environment, and Accelerate's own FSDP plugin is kept off (it would shard the model again).
"""

from __future__ import annotations

import atexit
import math
import os
import weakref
from pathlib import Path
from types import MethodType
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate import state as accelerate_state
from accelerate.utils import (
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    convert_outputs_to_fp32,
    get_mixed_precision_context_manager,
    recursively_apply,
)
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.experimental import implicit_replication

from meshplan._compat import accelerate as accelerate_compat
from meshplan._compat.accelerate import DATA_PARALLEL_DIMENSION, TENSOR_PARALLEL_DIMENSION
from meshplan.auto import announcement, choose_layout, is_auto
from meshplan.checkpoint.accelerate_state import CheckpointingAccelerator
from meshplan.checkpoint.pretrained import consolidated_state_dict
from meshplan.deepspeed_config import deepspeed_config
from meshplan.errors import PlanError
from meshplan.fsdp import (
    average_plain_gradients,
    check_fsdp2_model,
    clip_grad_norm,
    fully_shard_models,
    fully_shard_whole_models,
)
from meshplan.launch import warn_if_restarts_share_the_rendezvous_store
from meshplan.plan import Plan, normalize_precision
from meshplan.planner.types import LayoutChoice
from meshplan.recipes import launched_recipe_extras, plan_from_environment, read_recipe, started_by_a_launcher
from meshplan.tp.shard import plan_models, shard_models, sharding_mesh
from meshplan.tp.sync import average_gradients

# Accelerator arguments that a recipe's training settings fill in.
_TRAINING_ARGUMENTS = {"mixed_precision": "mixed_precision", "gradient_accumulation_steps": "gradient_accumulation_steps"}


def accelerator(strategy_or_recipe: Any = None, **accelerator_kwargs: Any) -> Accelerator:
    """An ``accelerate.Accelerator`` that runs the given layout.

    Args:
        strategy_or_recipe: a meshplan strategy, a Plan, the path of a recipe (an Accelerate
            config file) or the name of a shipped one ("zero3", see ``meshplan recipes``).
            None realizes the recipe ``accelerate launch`` passed to this process
            (plain data parallelism when the process was not started by a launcher).
            ``"auto"``: meshplan chooses the layout (below).
        **accelerator_kwargs: passed to ``Accelerator``; ``cpu`` defaults to True when no CUDA
            device is available. A value that contradicts the recipe is a PlanError.

    ``"auto"`` chooses here, once: the layout decides the Accelerator's class and DeepSpeed plugin,
    which Accelerate fixes when the Accelerator is built, before ``prepare`` ever sees the model.
    So the model is named up front: ``meshplan.accelerator("auto", model=model)``, with the
    module, its transformers config or its model directory (a config is sized on the meta device
    and costs nothing, so the Accelerator can come first in a script, as usual). These planning
    keywords are taken out of ``accelerator_kwargs``: ``model``; ``micro_batch_size``, the samples
    per process per forward pass (default 1); ``seq_len`` (default 2048, or the model's
    ``max_position_embeddings`` when lower); ``device_memory``, bytes or "80GB" per process
    (default ``meshplan.planner.memory_per_process``: a CUDA device's total memory, or on CPU the
    host memory divided among the node's processes); ``gradient_checkpointing`` (default: read
    from the module, False for a config). The world comes from the launcher (WORLD_SIZE,
    LOCAL_WORLD_SIZE) and the precision from ``mixed_precision`` or the launched recipe. Every
    process plans from these same figures, so processes that see different device memory (mixed
    hardware) must be given ``device_memory``; once the Accelerator exists the choices are
    compared, and a difference is a PlanError. The main process prints ``meshplan: chose ...``
    with the reason; the choice is kept as ``accelerator.layout_choice``.

    Raises:
        PlanError: the layout cannot run as asked, or under ``"auto"`` no model was named or no
            layout fits (the message names the smallest memory or device count that would).
            Refused before any Accelerator is built, among others: ``cpu=True`` under ZeRO while
            CUDA devices are visible (Accelerate would switch DeepSpeed off; hide the GPUs with
            ``CUDA_VISIBLE_DEVICES=""`` instead), and ``cpu=False`` without a CUDA device under
            ZeRO or in a launched job.

    Warns, as the Lightning strategies do, when torchrun (or ``accelerate launch``) will restart
    workers that share its rendezvous store (meshplan.launch.warn_if_restarts_share_the_rendezvous_store).
    """
    if accelerate_state.is_initialized():
        # Accelerate's state is shared by every Accelerator of a process: one made before counted
        # the processes, and this one would inherit its count.
        check_launched_world(accelerate_state.AcceleratorState().num_processes)
    choice = _choose_layout(accelerator_kwargs) if is_auto(strategy_or_recipe) else None
    plan = choice.plan if choice is not None else resolve_plan(strategy_or_recipe)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    plan.check_world_size(world_size, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    if not plan.uses_deepspeed and plan.option("gradient_clipping") is not None:
        raise PlanError(
            f"option gradient_clipping={plan.option('gradient_clipping')!r} is not applied by Accelerate for "
            f"strategy={plan.strategy!r} (only DeepSpeed clips by itself): drop it from the recipe and call "
            f"accelerator.clip_grad_norm_(model.parameters(), {plan.option('gradient_clipping')!r}) before optimizer.step()."
        )
    warn_if_restarts_share_the_rendezvous_store()
    on_cpu = _runs_on_cpu(plan, accelerator_kwargs)
    kwargs = _training_kwargs(plan, accelerator_kwargs)
    result = _build_accelerator(plan, on_cpu, kwargs)
    check_launched_world(result.num_processes)
    if choice is not None:
        _adopt_choice(result, choice)
    atexit.unregister(_tear_down_process_group)  # once per process, however many accelerators
    atexit.register(_tear_down_process_group)
    return result


# The keywords of meshplan.accelerator("auto", ...) that describe the training to plan for, not the Accelerator.
_PLANNING_ARGUMENTS = ("model", "micro_batch_size", "seq_len", "device_memory", "gradient_checkpointing")


def _choose_layout(accelerator_kwargs: dict[str, Any]) -> LayoutChoice:
    """The planner's choice for ``meshplan.accelerator("auto", model=..., ...)``; takes the planning keywords
    out of ``accelerator_kwargs``."""
    planning = {name: accelerator_kwargs.pop(name) for name in _PLANNING_ARGUMENTS if name in accelerator_kwargs}
    model = planning.pop("model", None)
    if model is None:
        raise PlanError(
            'meshplan.accelerator("auto") chooses the layout from the model, but Accelerate fixes the layout when the '
            "Accelerator is built, before prepare() sees the model: name it, meshplan.accelerator(\"auto\", model=model), "
            "with the module, its transformers config or its model directory."
        )
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    cpu = accelerator_kwargs.get("cpu", not torch.cuda.is_available()) or accelerate_compat.flag_set(accelerate_compat.USE_CPU)
    device = torch.device("cpu") if cpu else torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    precision = accelerator_kwargs.get("mixed_precision") or os.environ.get(accelerate_compat.MIXED_PRECISION) or "no"
    return choose_layout(model, processes_per_node=per_node, nodes=max(1, world_size // per_node), device=device,
                         precision=normalize_precision(precision) or "no", **planning)


def _adopt_choice(result: Accelerator, choice: LayoutChoice) -> None:
    """Checks that every process chose alike, keeps the choice on the Accelerator and prints it on the main process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        chosen: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(chosen, (choice.chosen, choice.tp_size))
        if len(set(chosen)) > 1:
            raise PlanError(
                f'meshplan.accelerator("auto") chose differently on different processes ({chosen}, by rank): they see '
                f"different device memory. Pass the same device_memory=... to every process."
            )
    result.layout_choice = choice
    if result.is_main_process:
        print(announcement(choice), flush=True)


def _runs_on_cpu(plan: Plan, accelerator_kwargs: dict[str, Any]) -> bool:
    """The caller's ``cpu=`` (taken out of ``accelerator_kwargs``), by default whether no CUDA device is seen.

    Refuses, before any Accelerator exists, a choice that would silently lose the layout.
    """
    cuda = torch.cuda.is_available()
    # `accelerate launch --cpu`, or use_cpu: true in a recipe, asks every Accelerator for the CPU.
    cpu_from_launch = accelerate_compat.flag_set(accelerate_compat.USE_CPU)
    if plan.uses_deepspeed and cuda and (accelerator_kwargs.get("cpu") or cpu_from_launch):
        asked = ("cpu=True" if accelerator_kwargs.get("cpu")
                 else "ACCELERATE_USE_CPU (from `accelerate launch --cpu`, or use_cpu: true in the recipe)")
        raise PlanError(
            f"{asked} cannot run ZeRO while CUDA devices are visible: Accelerate switches DeepSpeed off when it is "
            "asked for the CPU, so the ZeRO layout would be dropped (and without it ZeRO trains on the GPUs). "
            "To train ZeRO on the CPU, hide the GPUs: run with CUDA_VISIBLE_DEVICES=\"\" in the environment, and "
            "meshplan picks the CPU (gloo) by itself; otherwise drop it."
        )
    if "cpu" not in accelerator_kwargs:
        return not cuda
    cpu = bool(accelerator_kwargs.pop("cpu"))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if not cpu and not cuda and (plan.uses_deepspeed or launched > 1):
        consequence = ("DeepSpeed would start without the gloo backend and count one process" if plan.uses_deepspeed
                       else f"Accelerate would count 1 of the {launched} launched processes and each would train alone")
        raise PlanError(
            f"cpu=False asks for CUDA devices, but torch sees none (torch.cuda.is_available() is False): "
            f"{consequence}. Drop cpu=False: without a GPU meshplan.accelerator() runs on the CPU (gloo)."
        )
    return cpu


def _build_accelerator(plan: Plan, on_cpu: bool, kwargs: dict[str, Any]) -> Accelerator:
    # meshplan runs every layout itself: an FSDP config that `accelerate launch` passed must not make
    # Accelerate wrap the model in its own FSDP as well.
    with accelerate_compat.launched_fsdp_hidden():
        return _layout_accelerator(plan, on_cpu, kwargs)


def _layout_accelerator(plan: Plan, on_cpu: bool, kwargs: dict[str, Any]) -> Accelerator:
    if plan.uses_fsdp2:
        with accelerate_compat.launched_parallelism_config_hidden():
            return FullyShardedAccelerator(plan, cpu=on_cpu, **kwargs)
    if plan.strategy == "zero":
        return _deepspeed_accelerator(plan, on_cpu, kwargs)
    if plan.strategy == "tp":
        with accelerate_compat.launched_parallelism_config_hidden():
            return TensorParallelAccelerator(plan, cpu=on_cpu, **kwargs)
    if plan.engine_options:
        kwargs["kwargs_handlers"] = [*kwargs.get("kwargs_handlers", []), DistributedDataParallelKwargs(**plan.engine_options)]
    return CheckpointingAccelerator(plan, cpu=on_cpu, **kwargs)


def check_launched_world(num_processes: int, environ: Any = None) -> None:
    """Raises a PlanError when the launcher started more processes than the Accelerator counts.

    ``accelerate launch`` (through torchrun) exports WORLD_SIZE; on a machine without CUDA a plain
    ``Accelerator()`` ignores it and each worker trains alone ("rank 0 of 1"), silently.
    """
    environ = os.environ if environ is None else environ
    launched = int(environ.get("WORLD_SIZE", "1"))
    if launched > 1 and num_processes == 1:
        raise PlanError(
            f"the launcher started {launched} processes (WORLD_SIZE={launched}) but Accelerate counts 1: each would "
            f"train alone. Create the Accelerator with meshplan.accelerator() (before any accelerate.Accelerator() "
            f"in this process); for plain data parallelism Accelerator(cpu=True) counts them too, but it drops a ZeRO "
            f"or TP layout."
        )


def _tear_down_process_group() -> None:
    """Destroys the process group before the interpreter exits, as ``end_training()`` does.

    A script that never calls ``end_training()`` otherwise leaves the process group (gloo's or
    nccl's C++ objects and their threads, which DeepSpeed's communication layer also holds) to
    interpreter shutdown, where Python modules and C++ statics are torn down in no defined
    order; about one ZeRO launch in 15 then aborted on one rank ("terminate called without an
    active exception", SIGABRT, the mark of a C++ thread destroyed unjoined). Destroying the
    group here, while the interpreter is whole, shuts it down in order. Local, no collective.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_plan(strategy_or_recipe: Any) -> Plan:
    """The Plan of a strategy, a Plan, a recipe path or catalogue name, or (None) of the launching recipe."""
    if strategy_or_recipe is None:
        if not started_by_a_launcher():
            return Plan("ddp")  # there is no recipe to look for
        return plan_from_environment(extras=launched_recipe_extras())
    if isinstance(strategy_or_recipe, Plan):
        return strategy_or_recipe
    if isinstance(strategy_or_recipe, (str, Path)):
        return read_recipe(strategy_or_recipe).plan
    plan = getattr(strategy_or_recipe, "plan", None)
    if not isinstance(plan, Plan):
        raise PlanError(f"strategy_or_recipe={strategy_or_recipe!r} is neither a meshplan strategy nor a recipe path "
                        f"or catalogue name.")
    return plan


def _training_kwargs(plan: Plan, kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(kwargs)
    for option, argument in _TRAINING_ARGUMENTS.items():
        wanted = plan.option(option)
        if wanted is None:
            continue
        if argument in kwargs and kwargs[argument] != wanted:
            raise PlanError(f"option {option}={wanted!r} contradicts Accelerator({argument}={kwargs[argument]!r}).")
        kwargs[argument] = wanted
    return kwargs


def _accumulation_steps(kwargs: dict[str, Any]) -> int:
    """The micro-batches per step the Accelerator is given: ``gradient_accumulation_steps`` or a
    ``gradient_accumulation_plugin``'s ``num_steps`` (DeepSpeed's config must say the same, or its
    engine steps at every micro-batch)."""
    plugin = kwargs.get("gradient_accumulation_plugin")
    if plugin is not None:
        return plugin.num_steps
    return kwargs.get("gradient_accumulation_steps", 1)


def _deepspeed_accelerator(plan: Plan, on_cpu: bool, kwargs: dict[str, Any]) -> Accelerator:
    config = deepspeed_config(
        plan,
        micro_batch_size="auto",
        gradient_accumulation_steps=_accumulation_steps(kwargs),
        # DeepSpeed's engine clips at 1.0 when the config names no value: say 0 (off) explicitly.
        gradient_clipping=plan.option("gradient_clipping") or 0,
        precision=kwargs.get("mixed_precision", "no"),
    )
    if on_cpu:
        # Without a named backend Accelerate initializes DeepSpeed but counts one process.
        kwargs["kwargs_handlers"] = [*kwargs.get("kwargs_handlers", []), InitProcessGroupKwargs(backend="gloo")]
    # The launcher lists the recipe's deepspeed_config keys here; Accelerate would then refuse a
    # plugin built from a dict. The config rendered from the Plan already holds them.
    with accelerate_compat.launched_deepspeed_fields_hidden():
        return ZeROAccelerator(plan, deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config), **kwargs)


class ZeROAccelerator(CheckpointingAccelerator):
    """An Accelerator whose DeepSpeed engine clips gradients at the recipe's ``gradient_clipping`` only."""

    def clip_grad_norm_(self, parameters: Any, max_norm: float, norm_type: float = 2) -> torch.Tensor | None:
        """The gradient norm DeepSpeed measured; a PlanError when ``max_norm`` is not the recipe's clipping.

        DeepSpeed clips inside ``accelerator.backward`` (which also steps), with the value fixed
        in its config; Accelerate's own ``clip_grad_norm_`` then clips nothing, so a different
        ``max_norm`` would be ignored without a word.
        """
        configured = self.plan.option("gradient_clipping") or 0
        # An infinite max_norm only measures the norm: the same as no clipping.
        same_clipping = float(max_norm) == float(configured) or (configured == 0 and math.isinf(float(max_norm)))
        if not same_clipping:
            raise PlanError(
                f"accelerator.clip_grad_norm_(..., max_norm={max_norm!r}) cannot be applied under ZeRO: DeepSpeed clips "
                f"inside accelerator.backward at the recipe's gradient_clipping ({configured!r}; 0 is off). Set "
                f"gradient_clipping: {max_norm!r} under deepspeed_config in the recipe (in its deepspeed_config_file, if "
                f"it names one), or ZeRO(gradient_clipping={max_norm!r}), and keep this call or drop it."
            )
        if float(norm_type) != 2.0:
            raise PlanError(f"accelerator.clip_grad_norm_(..., norm_type={norm_type!r}) cannot be applied under ZeRO: "
                            f"DeepSpeed clips by the L2 norm; use norm_type=2.")
        return super().clip_grad_norm_(parameters, max_norm, norm_type)


class TensorParallelAccelerator(CheckpointingAccelerator):
    """An Accelerator whose ``prepare`` shards Hugging Face models with meshplan's TP plan.

    The processes form a (data parallel x tensor parallel) mesh; the data loader is sharded over
    the data-parallel dimension only (every rank of a TP group sees the same batch), and
    ``backward`` averages gradients over the data-parallel dimension when they are synchronized.
    """

    def __init__(self, plan: Plan, **kwargs: Any) -> None:
        super().__init__(plan, **kwargs)
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", self.num_processes))
        self.tp_size = plan.resolved_tp_size(per_node)
        plan.check_world_size(self.num_processes, per_node)
        # Accelerate's data loaders read these dimension names to shard by data-parallel rank.
        accelerate_compat.set_device_mesh(self, init_device_mesh(
            self.device.type, (self.num_processes // self.tp_size, self.tp_size),
            mesh_dim_names=(DATA_PARALLEL_DIMENSION, TENSOR_PARALLEL_DIMENSION),
        ))
        self._tp_modules: list[nn.Module] = []
        self._replaced_parameters: dict[int, tuple[weakref.ref, str]] = {}  # parameters sharding replaced
        self._reduce_over_world = False  # set while check_trigger reduces

    def prepare(self, *args: Any, device_placement: Any = None) -> Any:
        """Shards the models among ``args`` (and re-points their optimizers), then Accelerate's prepare."""
        optimizers = [arg for arg in args if isinstance(arg, torch.optim.Optimizer)]
        for module in args:
            if isinstance(module, nn.Module) and sharding_mesh(module) is None:
                self._shard(module, optimizers)
        for optimizer in optimizers:
            self._refuse_stale(optimizer)
        prepared = super().prepare(*args, device_placement=device_placement)
        for optimizer in accelerate_compat.prepared_optimizers(self):
            # Foreach optimizers mix sharded (DTensor) and replicated (plain) parameters in one kernel
            # call; implicit replication lets torch treat the plain ones as replicated DTensors.
            accelerate_compat.run_step_inside(optimizer, implicit_replication)
        return prepared

    def _shard(self, module: nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
        before = dict(module.named_parameters())
        self._shard_parameters(module)
        after = dict(module.named_parameters())
        replaced = {name: parameter for name, parameter in before.items() if after[name] is not parameter}
        _repoint_optimizers(optimizers, {id(parameter): name for name, parameter in replaced.items()}, after)
        # Weak references: the replaced parameters may be freed, and their ids reused.
        self._replaced_parameters.update({id(parameter): (weakref.ref(parameter), name) for name, parameter in replaced.items()})
        self._tp_modules.append(module)

    def _shard_parameters(self, module: nn.Module) -> None:
        """Shards the models in ``module`` with the TP plan (replacing their parameters with DTensors)."""
        plans = plan_models(module, self.tp_size, self.plan.tp_plan_dict)  # every check before a collective
        mesh = self.torch_device_mesh
        shard_models(module, plans, self.device, mesh[TENSOR_PARALLEL_DIMENSION], mesh[DATA_PARALLEL_DIMENSION])

    def _refuse_stale(self, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                reference, name = self._replaced_parameters.get(id(parameter), (None, ""))
                if reference is not None and reference() is parameter:
                    raise PlanError(
                        f"the optimizer holds {name!r} as it was before tensor-parallel "
                        f"sharding; pass the model and its optimizer to the same prepare() call."
                    )

    def prepare_model(self, model: nn.Module, device_placement: bool | None = None, evaluation_mode: bool = False) -> nn.Module:
        """A sharded model is kept as it is: no DDP wrapper, gradients are averaged in ``backward``."""
        if sharding_mesh(model) is None:
            return super().prepare_model(model, device_placement=device_placement, evaluation_mode=evaluation_mode)
        accelerate_compat.keep_prepared_model(self, model)
        _forward_under_autocast(self, model)
        return model

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """Accelerate's backward, then the data-parallel average once gradients are to be synchronized."""
        super().backward(loss, **kwargs)
        if self.sync_gradients:
            for module in self._tp_modules:
                self._synchronize(module)

    def _synchronize(self, module: nn.Module) -> None:
        """Makes the gradients of ``module`` the data-parallel mean (after the last micro-batch's backward)."""
        average_gradients(module, self.torch_device_mesh[DATA_PARALLEL_DIMENSION])

    def clip_grad_norm_(self, parameters: Any, max_norm: float, norm_type: float = 2) -> torch.Tensor:
        """Clips over sharded and replicated parameters together."""
        with implicit_replication():
            norm = super().clip_grad_norm_(parameters, max_norm, norm_type)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    # The ranks of one TP group hold the same batch: the data-level collectives below see one
    # copy per data-parallel replica, as they would under DDP, not one per process.

    def gather(self, tensor: Any) -> Any:
        """Accelerate's gather, keeping one copy per data-parallel replica (tensor-parallel rank 0's)."""
        gathered = super().gather(tensor)
        if self.tp_size == 1:
            return gathered
        return recursively_apply(self._first_of_each_tp_group, gathered)

    def _first_of_each_tp_group(self, tensor: torch.Tensor) -> torch.Tensor:
        # gather concatenates every process's rows in rank order; rank = dp_rank * tp_size + tp_rank.
        per_rank = tensor.reshape(self.num_processes, tensor.shape[0] // self.num_processes, *tensor.shape[1:])
        return per_rank[:: self.tp_size].reshape(-1, *tensor.shape[1:])

    def reduce(self, tensor: Any, reduction: str = "sum", scale: float = 1.0) -> Any:
        """Accelerate's reduce over every process; a "sum" counts each data-parallel replica once.

        The reduction runs over the whole world, so every rank gets the same value even where the
        ranks of a TP group disagree (a trigger set on one rank); for a sum the world's total is
        then divided by ``tp_size``, since every rank of a TP group holds its replica's value.
        A "mean" needs no correction.
        """
        reduced = super().reduce(tensor, reduction, scale)
        if reduction != "sum" or self.tp_size == 1 or self._reduce_over_world:
            return reduced
        return recursively_apply(self._per_replica, reduced)

    def _per_replica(self, total: torch.Tensor) -> torch.Tensor:
        if total.is_floating_point() or total.is_complex():
            return total / self.tp_size
        return torch.div(total, self.tp_size, rounding_mode="floor")  # exact: a multiple of tp_size

    def check_trigger(self) -> bool:
        """Accelerate's check_trigger: a trigger set on any one process stops every process."""
        self._reduce_over_world = True
        try:
            return super().check_trigger()
        finally:
            self._reduce_over_world = False

    def gather_for_metrics(self, input_data: Any, use_gather_object: bool = False) -> Any:
        """Accelerate's gather_for_metrics; Python objects too are gathered once per data-parallel replica."""
        if self.tp_size == 1 or not (use_gather_object or not _all_tensors(input_data)):
            return super().gather_for_metrics(input_data, use_gather_object)
        # As Accelerate's gather_object (a list from every process, concatenated), keeping TP rank 0's lists.
        gathered: list[Any] = [None] * self.num_processes
        dist.all_gather_object(gathered, input_data)
        data = [item for rank in range(0, self.num_processes, self.tp_size) for item in gathered[rank]]
        remainder = self.gradient_state.remainder
        return data[:remainder] if self.gradient_state.end_of_dataloader and remainder > 0 else data

    def get_state_dict(self, model: nn.Module, unwrap: bool = True) -> dict[str, torch.Tensor]:
        """The model's state dict with whole tensors on the CPU (sharded ones gathered over the TP group). Collective.

        Accelerate's own would hand DTensors to ``save_model`` and ``save_pretrained``, which then
        fail on their storage ("invalid python storage") or would write one shard.
        """
        module = self.unwrap_model(model) if unwrap else model
        if sharding_mesh(module) is None:
            return super().get_state_dict(model, unwrap)
        return consolidated_state_dict(module)


class FullyShardedAccelerator(TensorParallelAccelerator):
    """An Accelerator whose ``prepare`` shards Hugging Face models with FSDP2 (``fully_shard``).

    ZeRO(engine="fsdp2") shards each model block by block over every process (a data-parallel
    dimension of the whole world, tp_size 1); TensorParallel(data_parallel="shard") first applies
    the TP plan over the tensor-parallel dimension, then shards over the data-parallel one, the
    order torchtitan uses. FSDP2 reduce-scatters the gradients in every micro-batch's backward and
    adds them to the sharded ones, as under Lightning and in torchtitan: accumulating whole
    gradients instead would hold 4 bytes per parameter of the model on every rank, which is what
    sharding them avoids. Parameters outside the Hugging Face models stay whole and are averaged as
    under DDP. Everything else (data sharding, gather,
    reduce, get_state_dict, optimizer re-pointing) is TensorParallelAccelerator's.
    """

    def prepare(self, *args: Any, device_placement: Any = None) -> Any:
        """Checks every model FSDP2 would shard (before any collective), then TensorParallelAccelerator's prepare."""
        for module in args:
            if isinstance(module, nn.Module) and sharding_mesh(module) is None:
                check_fsdp2_model(module, self.plan)
        return super().prepare(*args, device_placement=device_placement)

    def _shard_parameters(self, module: nn.Module) -> None:
        """TP first when the layout has it, then FSDP2 over the data-parallel dimension."""
        data_parallel = self.torch_device_mesh[DATA_PARALLEL_DIMENSION]
        if self.plan.strategy == "tp":
            super()._shard_parameters(module)  # also starts every replica from data-parallel rank 0's weights
            fully_shard_models(module, self.plan, data_parallel)
        else:
            fully_shard_whole_models(module, self.plan, self.device, data_parallel)

    def _synchronize(self, module: nn.Module) -> None:
        """FSDP2 reduced what it shards; the parameters it does not hold are averaged like DDP's."""
        average_plain_gradients(module.parameters(), self.torch_device_mesh[DATA_PARALLEL_DIMENSION])

    def clip_grad_norm_(self, parameters: Any, max_norm: float, norm_type: float = 2) -> torch.Tensor:
        """Clips to the whole model's norm over sharded (on either mesh) and whole gradients; returns that norm."""
        self.unscale_gradients()
        return clip_grad_norm(list(parameters), max_norm, norm_type)


def _forward_under_autocast(accelerator: Accelerator, model: nn.Module) -> None:
    """Runs ``model``'s forward under the accelerator's mixed precision, as Accelerate's ``prepare_model``
    does for the models it wraps; without it a sharded model would train in fp32 under a bf16 recipe.

    The weights stay fp32 (as under DDP): the forward computes in bf16 under autocast and returns fp32.
    """
    if not accelerator.native_amp or hasattr(model, "_original_forward"):  # no mixed precision, or done already
        return
    model._original_forward = model.forward  # Accelerate's name: unwrap_model(keep_fp32_wrapper=False) restores it
    autocast = get_mixed_precision_context_manager(accelerator.native_amp, accelerator.autocast_handler)
    model.forward = MethodType(convert_outputs_to_fp32(autocast(model.forward.__func__)), model)


def _all_tensors(data: Any) -> bool:
    """Whether ``data`` is tensors only (nested in lists, tuples, dicts), as Accelerate's gather requires."""
    try:
        recursively_apply(lambda tensor: tensor, data, error_on_other_type=True)
    except TypeError:
        return False
    return True



def _repoint_optimizers(optimizers: list[torch.optim.Optimizer], names_before: dict[int, str],
                        parameters_after: dict[str, nn.Parameter]) -> None:
    """Sharding replaces parameters with DTensor ones; optimizers built before must follow them."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["params"] = [
                parameters_after[names_before[id(parameter)]] if id(parameter) in names_before else parameter
                for parameter in group["params"]
            ]
