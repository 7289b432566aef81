"""The Accelerate internals meshplan relies on, read from accelerate 1.15.0.

Three kinds: what an Accelerator has prepared and registered (its private lists, which
``save_state``/``load_state`` walk), how its data loaders shard by the device mesh's dimension
names, and the environment ``accelerate launch`` hands its workers (the variables it exports and
an Accelerator reads back). A public equivalent is used wherever one exists: ``str_to_bool``
reads flags as Accelerate does, ``AcceleratedOptimizer`` (and its public ``optimizer``) tells the
optimizers it wraps.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import inspect
import io
import os
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Mapping, Sequence

from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import str_to_bool

from meshplan._compat import Internal, require_attributes, require_parameters, require_source

READ_FROM = "1.15.0"


# ---------------------------------------------------------------- what an Accelerator prepared


def prepared_models(accelerator: Accelerator) -> list[Any]:
    """The models ``prepare`` returned, in order, as Accelerate wrapped them (``_models``; accelerate 1.15.0)."""
    return accelerator._models


def keep_prepared_model(accelerator: Accelerator, model: Any) -> None:
    """Counts ``model`` among the prepared models (``_models``) without Accelerate's wrapping, as its own
    ``prepare_model`` does for a model it keeps as it is (accelerate 1.15.0)."""
    if model not in accelerator._models:
        accelerator._models.append(model)


def prepared_optimizers(accelerator: Accelerator) -> list[Any]:
    """The optimizers ``prepare`` returned (``_optimizers``; accelerate 1.15.0)."""
    return accelerator._optimizers


def prepared_schedulers(accelerator: Accelerator) -> list[Any]:
    """The schedulers ``prepare`` returned (``_schedulers``; accelerate 1.15.0)."""
    return accelerator._schedulers


def registered_objects(accelerator: Accelerator) -> list[Any]:
    """The objects given to ``register_for_checkpointing`` (``_custom_objects``; accelerate 1.15.0)."""
    return accelerator._custom_objects


def deepspeed_engine(accelerator: Accelerator) -> Any:
    """The DeepSpeedEngine ``prepare`` built, or None (``deepspeed_engine_wrapped.engine``; accelerate 1.15.0)."""
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)  # set only under DeepSpeed
    return wrapped.engine if wrapped is not None else None


# ---------------------------------------------------------------- the device mesh

# The dimension names Accelerate's data loaders shard by (prepare_data_loader, accelerate 1.15.0):
# processes with the same data-parallel coordinate get the same batches.
DATA_PARALLEL_DIMENSION = "dp_replicate"
TENSOR_PARALLEL_DIMENSION = "tp"


def set_device_mesh(accelerator: Accelerator, mesh: Any) -> None:
    """Makes ``mesh`` the mesh Accelerate's data loaders shard by (``AcceleratorState.device_mesh``, read back
    as ``accelerator.torch_device_mesh``; accelerate 1.15.0). Its dimensions must carry the names above."""
    accelerator.state.device_mesh = mesh


# ---------------------------------------------------------------- a prepared optimizer's step

_STEP_MARK = "_meshplan_step_inside"  # meshplan's own mark: the step is wrapped already


def run_step_inside(optimizer: Any, context: Callable[[], ContextManager[Any]]) -> None:
    """Makes every ``step()`` of a prepared optimizer run inside ``context()``, once however often it is asked.

    The script calls ``step`` on the object ``prepare`` returned, which is the one in
    ``prepared_optimizers``; an attribute of that object takes the place of
    ``AcceleratedOptimizer.step(closure=None)`` (accelerate 1.15.0).
    """
    if getattr(optimizer, _STEP_MARK, False):
        return
    step = optimizer.step

    def step_inside(*args: Any, **kwargs: Any) -> Any:
        with context():
            return step(*args, **kwargs)

    optimizer.step = step_inside
    setattr(optimizer, _STEP_MARK, True)


# ---------------------------------------------------------------- process-wide state (tests)


def reset_process_state() -> None:
    """Forgets the state every Accelerator of this process shares (AcceleratorState, PartialState,
    GradientState), as Accelerate's own tests do, so that the next Accelerator starts afresh
    (``_reset_state``; accelerate 1.15.0). Local: the process group is left as it is."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def release_accelerator(accelerator: Accelerator) -> None:
    """Frees what one Accelerator built, so that the next in the same process starts from nothing
    (the process group stays): for tests and benchmarks that run several layouts in one process.

    A DeepSpeed engine keeps hooks on its model, and ZeRO-3 keeps the model in a process-wide list,
    which would keep the engine and its buffers alive: destroy, remove, forget them; then
    Accelerate's own ``free_memory`` and its shared state (``reset_process_state``).
    """
    import gc

    from meshplan._compat.deepspeed import forget_zero3_module, remove_engine_forward_hooks

    engine = deepspeed_engine(accelerator)
    if engine is not None:
        engine.destroy()
        remove_engine_forward_hooks(engine)
        forget_zero3_module(engine.module)
    accelerator.free_memory()
    reset_process_state()
    gc.collect()


def shared_state() -> dict[str, Any]:
    """A copy of the state every Accelerator of this process shares (``AcceleratorState._shared_state``;
    accelerate 1.15.0): empty until one is built."""
    return dict(AcceleratorState._shared_state)


# ---------------------------------------------------------------- the environment of a launch

# Variables `accelerate launch` exports to its workers and an Accelerator reads (accelerate 1.15.0).
USE_CPU = "ACCELERATE_USE_CPU"  # `accelerate launch --cpu`, or use_cpu: true in the config
USE_DEEPSPEED = "ACCELERATE_USE_DEEPSPEED"  # a DeepSpeed config; also set by every DeepSpeed Accelerator
USE_PARALLELISM_CONFIG = "ACCELERATE_USE_PARALLELISM_CONFIG"  # a parallelism_config section
CONFIG_DS_FIELDS = "ACCELERATE_CONFIG_DS_FIELDS"  # the deepspeed_config keys the config file set
MIXED_PRECISION = "ACCELERATE_MIXED_PRECISION"
DYNAMO_BACKEND = "ACCELERATE_DYNAMO_BACKEND"  # exported by every launch path but DeepSpeed's

# The deepspeed_config keys `accelerate launch` exports, by variable (its prepare_deepspeed_cmd_env).
DEEPSPEED_VARIABLES = {
    "ACCELERATE_DEEPSPEED_ZERO_STAGE": "zero_stage",
    "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "offload_optimizer_device",
    "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "offload_param_device",
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "gradient_accumulation_steps",
    "ACCELERATE_GRADIENT_CLIPPING": "gradient_clipping",
    "ACCELERATE_DEEPSPEED_CONFIG_FILE": "deepspeed_config_file",
}

# The parallelism_config sizes `accelerate launch` exports, by variable (prepare_extend_env_parallelism_config).
PARALLELISM_VARIABLES = {
    f"PARALLELISM_CONFIG_{name}": f"parallelism_config_{name.lower()}"
    for name in ("TP_SIZE", "DP_SHARD_SIZE", "DP_REPLICATE_SIZE", "CP_SIZE", "SP_SIZE")
}

USE_FSDP = "ACCELERATE_USE_FSDP"  # distributed_type: FSDP (the fsdp_config follows in FSDP_* variables)
FSDP_VERSION = "FSDP_VERSION"

# The fsdp_config keys `accelerate launch` exports, by variable (its prepare_multi_gpu_env). It exports
# most of them whatever the config says, at the launcher's defaults.
FSDP_VARIABLES = {
    FSDP_VERSION: "fsdp_version",
    "FSDP_RESHARD_AFTER_FORWARD": "fsdp_reshard_after_forward",
    "FSDP_OFFLOAD_PARAMS": "fsdp_offload_params",
    "FSDP_AUTO_WRAP_POLICY": "fsdp_auto_wrap_policy",
    "FSDP_TRANSFORMER_CLS_TO_WRAP": "fsdp_transformer_layer_cls_to_wrap",
    "FSDP_STATE_DICT_TYPE": "fsdp_state_dict_type",
    "FSDP_CPU_RAM_EFFICIENT_LOADING": "fsdp_cpu_ram_efficient_loading",
    "FSDP_ACTIVATION_CHECKPOINTING": "fsdp_activation_checkpointing",
    "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD": "fsdp_activation_checkpointing_offload",
    "FSDP_IGNORED_MODULES": "fsdp_ignored_modules",
    "FSDP_MIN_NUM_PARAMS": "fsdp_min_num_params",
    # FSDP1 settings, exported at their defaults under fsdp_version 2 too, where Accelerate ignores them.
    "FSDP_SHARDING_STRATEGY": "fsdp_sharding_strategy",
    "FSDP_BACKWARD_PREFETCH": "fsdp_backward_prefetch",
    "FSDP_FORWARD_PREFETCH": "fsdp_forward_prefetch",
    "FSDP_USE_ORIG_PARAMS": "fsdp_use_orig_params",
    "FSDP_SYNC_MODULE_STATES": "fsdp_sync_module_states",
}

# The world-size variables by which an Accelerator on the CPU recognises a launched group (torchrun,
# Intel MPI/PMI, Open MPI, MVAPICH), besides LOCAL_RANK.
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def flag_set(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether the variable ``name`` holds a true value as Accelerate's ``str_to_bool`` reads flags (y, yes,
    t, true, on, 1, any case); unset or unreadable is False."""
    environ = os.environ if environ is None else environ
    try:
        return bool(str_to_bool(environ.get(name, "false")))
    except ValueError:
        return False


def switched_on(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether the variable ``name`` is "true" (any case), the one value for which an Accelerator takes
    ``USE_DEEPSPEED`` and ``USE_PARALLELISM_CONFIG`` as on (accelerate 1.15.0)."""
    environ = os.environ if environ is None else environ
    return environ.get(name, "false").lower() == "true"


def launched_by_accelerate(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``accelerate launch`` started this process: it exports ``DYNAMO_BACKEND`` on every path but
    DeepSpeed's own launcher, which exports ``USE_DEEPSPEED`` (accelerate 1.15.0). A user exporting a setting does not."""
    environ = os.environ if environ is None else environ
    return DYNAMO_BACKEND in environ or USE_DEEPSPEED in environ


@contextlib.contextmanager
def launched_parallelism_config_hidden() -> Iterator[None]:
    """Hides ``USE_PARALLELISM_CONFIG`` while an Accelerator is built, so that it builds no ParallelismConfig
    (nor its own TP) from the launch's environment (read in ``Accelerator.__init__``, accelerate 1.15.0)."""
    with _environment_without(USE_PARALLELISM_CONFIG):
        yield


@contextlib.contextmanager
def launched_fsdp_hidden() -> Iterator[None]:
    """Hides ``USE_FSDP`` while an Accelerator is built, so that it builds no FullyShardedDataParallelPlugin of
    its own from the launch's environment (read in ``Accelerator.__init__`` and ``AcceleratorState``,
    accelerate 1.15.0): meshplan shards the model itself, and Accelerate's plugin would shard it again.
    The FSDP_* settings stay; without the flag nothing in Accelerate reads them."""
    with _environment_without(USE_FSDP):
        yield


@contextlib.contextmanager
def launched_deepspeed_fields_hidden() -> Iterator[None]:
    """Hides ``CONFIG_DS_FIELDS`` while a DeepSpeedPlugin is built from a config dict: the plugin refuses a
    dict when the launch says the config file named DeepSpeed keys (accelerate 1.15.0)."""
    with _environment_without(CONFIG_DS_FIELDS):
        yield


@contextlib.contextmanager
def _environment_without(*names: str) -> Iterator[None]:
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


# ---------------------------------------------------------------- the launching command line

# The console scripts that run `accelerate launch`, and the package of their modules (accelerate 1.15.0).
LAUNCHER_COMMANDS = ("accelerate", "accelerate-launch")
LAUNCHER_PACKAGE = "accelerate.commands"


def is_accelerate_launch(arguments: Sequence[str]) -> bool:
    """Whether a process's command line (argv) is ``accelerate launch`` (or ``python -m accelerate.commands...``)."""
    return any(Path(argument).name in LAUNCHER_COMMANDS or LAUNCHER_PACKAGE in argument for argument in arguments[:3])


def config_file_argument(arguments: Sequence[str]) -> str | None:
    """The config file an ``accelerate launch`` command line names, or None, as Accelerate's own parser reads it
    (the public ``launch_command_parser``): only launcher options count, never the training script's own."""
    from accelerate.commands.launch import launch_command_parser

    options = _launcher_options(arguments)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # argparse prints its usage before it exits
            parsed, _ = launch_command_parser().parse_known_args(options)
    except SystemExit:  # a command line Accelerate itself would have refused: it launched nothing
        return None
    return parsed.config_file or None


def _launcher_options(arguments: Sequence[str]) -> list[str]:
    """What follows ``accelerate launch`` (or ``accelerate-launch``, or ``-m accelerate.commands.launch``) in argv."""
    for index, argument in enumerate(arguments[:4]):
        name = Path(argument).name
        if name == "accelerate" and arguments[index + 1:index + 2] == ["launch"]:
            return list(arguments[index + 2:])
        if name == "accelerate-launch" or argument == f"{LAUNCHER_PACKAGE}.launch":
            return list(arguments[index + 1:])
        if argument == f"{LAUNCHER_PACKAGE}.accelerate_cli" and arguments[index + 1:index + 2] == ["launch"]:
            return list(arguments[index + 2:])
    return []


def default_config_file() -> Path:
    """The config file ``accelerate launch`` reads when it names none (``accelerate.commands.config.default_config_file``)."""
    from accelerate.commands.config import default_config_file as path

    return Path(path)


# ---------------------------------------------------------------- canaries


def _check_prepared_list(name: str, filled_by: str, filling: str) -> Callable[[], None]:
    """A canary: ``Accelerator.<name>`` starts empty, the method ``filled_by`` fills it, and ``save_state`` walks it."""
    def check() -> None:
        require_source(Accelerator.__init__, f"self.{name} = []")
        require_source(getattr(Accelerator, filled_by), f"self.{name}.{filling}")
        require_source(Accelerator.save_state, f"self.{name}")  # what meshplan saves in its place
    return check


def _check_kept_model() -> None:
    require_source(Accelerator.prepare_model, "self._models.append(model)")  # keep_prepared_model checks membership itself
    require_parameters(Accelerator.prepare_model, "model", "device_placement", "evaluation_mode")


def _check_deepspeed_engine() -> None:
    from accelerate.utils.deepspeed import DeepSpeedEngineWrapper

    require_source(Accelerator, "self.deepspeed_engine_wrapped = DeepSpeedEngineWrapper(engine)")
    require_source(DeepSpeedEngineWrapper.__init__, "self.engine = engine")


def _check_device_mesh() -> None:
    from accelerate import data_loader, state

    require_source(state.AcceleratorState.__init__, "self.device_mesh = None")
    require_source(Accelerator, "return self.state.device_mesh")  # torch_device_mesh
    require_parameters(data_loader.prepare_data_loader, "torch_device_mesh")
    require_source(data_loader.prepare_data_loader, f'"{DATA_PARALLEL_DIMENSION}" in torch_device_mesh.mesh_dim_names',
                    f'"{TENSOR_PARALLEL_DIMENSION}" in torch_device_mesh.mesh_dim_names')


def _check_optimizer_step() -> None:
    from accelerate.optimizer import AcceleratedOptimizer

    require_parameters(AcceleratedOptimizer.step, "closure")
    require_source(Accelerator.prepare_optimizer, "optimizer = AcceleratedOptimizer(", "return optimizer")


def _check_reset_state() -> None:
    require_parameters(AcceleratorState._reset_state, "reset_partial_state")
    require_source(AcceleratorState._reset_state, "AcceleratorState._shared_state.clear()", "PartialState._reset_state()")
    require_source(GradientState._reset_state, "GradientState._shared_state.clear()")


def _check_shared_state() -> None:
    require_attributes(AcceleratorState, "_shared_state")
    assert isinstance(AcceleratorState._shared_state, dict), "AcceleratorState._shared_state is no longer a dict"
    require_source(Accelerator.__init__, "AcceleratorState._shared_state != {}")


def _check_use_cpu() -> None:
    from accelerate import state

    require_source(state.AcceleratorState.__init__, f'parse_flag_from_env("{USE_CPU}")')


def _check_use_deepspeed() -> None:
    from accelerate import state
    from accelerate.utils import launch

    require_source(state, f'os.environ.get("{USE_DEEPSPEED}", "false").lower() == "true"')
    require_source(Accelerator.__init__, f'os.environ["{USE_DEEPSPEED}"] = "true"')
    require_source(launch.prepare_deepspeed_cmd_env, f'current_env["{USE_DEEPSPEED}"] = "true"')


def _check_use_parallelism_config() -> None:
    from accelerate import parallelism_config
    from accelerate.utils import launch

    require_source(Accelerator.__init__, f'os.environ.get("{USE_PARALLELISM_CONFIG}", "false").lower() == "true"')
    require_source(launch.prepare_extend_env_parallelism_config, f'current_env["{USE_PARALLELISM_CONFIG}"] = "true"',
                    'prefix = "PARALLELISM_CONFIG_"', *(f'prefix + "{name.removeprefix("PARALLELISM_CONFIG_")}"'
                                                       for name in PARALLELISM_VARIABLES))
    require_source(parallelism_config, *PARALLELISM_VARIABLES)


def _check_use_fsdp() -> None:
    from accelerate import state
    from accelerate.utils import FullyShardedDataParallelPlugin, launch

    require_source(Accelerator.__init__, f'os.environ.get("{USE_FSDP}", "false").lower() == "true"')
    require_source(state.AcceleratorState.__init__, f'os.environ.get("{USE_FSDP}", "false").lower() == "true"')
    require_source(launch.prepare_multi_gpu_env, f'current_env["{USE_FSDP}"] = "true"',
                   *(f'current_env["{name}"]' for name in FSDP_VARIABLES))
    require_source(FullyShardedDataParallelPlugin.__post_init__, 'env_prefix = "FSDP_"', 'env_prefix + "VERSION"')


def _check_config_ds_fields() -> None:
    from accelerate.utils import DeepSpeedPlugin, launch

    require_source(DeepSpeedPlugin, f'os.environ.get("{CONFIG_DS_FIELDS}"')
    require_source(launch.prepare_deepspeed_cmd_env, f'current_env["{CONFIG_DS_FIELDS}"]')


def _check_launched_settings() -> None:
    from accelerate.utils import DeepSpeedPlugin, launch

    require_source(launch.prepare_deepspeed_cmd_env, f'current_env["{MIXED_PRECISION}"]',
                    *(f'current_env["{name}"]' for name in DEEPSPEED_VARIABLES))
    require_source(DeepSpeedPlugin, *DEEPSPEED_VARIABLES)
    require_source(launch.prepare_multi_gpu_env, f'current_env["{MIXED_PRECISION}"]')


def _check_dynamo_backend() -> None:
    from accelerate.utils import launch

    for prepare in (launch.prepare_simple_launcher_cmd_env, launch.prepare_multi_gpu_env):
        require_source(prepare, f'current_env["{DYNAMO_BACKEND}"]')
    source = inspect.getsource(launch.prepare_deepspeed_cmd_env)
    assert DYNAMO_BACKEND not in source, f"prepare_deepspeed_cmd_env now exports {DYNAMO_BACKEND} too"


def _check_world_size_variables() -> None:
    from accelerate import state

    require_source(state.PartialState, *(f'"{name}"' for name in WORLD_SIZE_VARIABLES), 'os.environ.get("LOCAL_RANK", -1)')


def _check_launcher_command_line() -> None:
    scripts = {entry.name: entry.value for entry in importlib.metadata.distribution("accelerate").entry_points
               if entry.group == "console_scripts"}
    for command in LAUNCHER_COMMANDS:
        assert scripts.get(command, "").startswith(LAUNCHER_PACKAGE), f"console script {command!r} is {scripts.get(command)!r}"
    assert scripts.get("accelerate-launch") == f"{LAUNCHER_PACKAGE}.launch:main", scripts.get("accelerate-launch")
    assert scripts.get("accelerate") == f"{LAUNCHER_PACKAGE}.accelerate_cli:main", scripts.get("accelerate")
    # Both spellings of the option name the config file; the training script's own options are its own.
    for option in ("--config_file", "--config-file"):
        command = ["accelerate", "launch", option, "recipe.yaml", "train.py", option, "model.json"]
        assert config_file_argument(command) == "recipe.yaml", f"accelerate launch {option} no longer sets config_file"
    assert config_file_argument(["accelerate", "launch", "train.py", "--config_file", "model.json"]) is None
    from accelerate.commands import config

    require_attributes(config, "default_config_file")


INTERNALS: list[Internal] = [
    Internal("accelerate", "Accelerator._models", "the prepared models save_state/load_state save and load "
             "(checkpoint/accelerate_state.py)", READ_FROM,
             _check_prepared_list("_models", "prepare_model", "append(model)")),
    Internal("accelerate", "Accelerator._optimizers", "the prepared optimizers save_state/load_state save and load, "
             "and whose step TP wraps (checkpoint/accelerate_state.py, accelerate.py)", READ_FROM,
             _check_prepared_list("_optimizers", "prepare_optimizer", "append(optimizer)")),
    Internal("accelerate", "Accelerator._schedulers", "the prepared schedulers save_state/load_state save and load "
             "(checkpoint/accelerate_state.py)", READ_FROM,
             _check_prepared_list("_schedulers", "prepare_scheduler", "append(scheduler)")),
    Internal("accelerate", "Accelerator._custom_objects", "the objects register_for_checkpointing registered, "
             "which save_state/load_state save and load (checkpoint/accelerate_state.py)", READ_FROM,
             _check_prepared_list("_custom_objects", "register_for_checkpointing", "extend(objects)")),
    Internal("accelerate", "Accelerator.prepare_model keeps a model in _models",
             "count a tensor-parallel model as prepared without Accelerate's DDP wrapper (accelerate.py)",
             READ_FROM, _check_kept_model),
    Internal("accelerate", "Accelerator.deepspeed_engine_wrapped.engine",
             "the DeepSpeed engine whose step counters a checkpoint saves (checkpoint/accelerate_state.py)",
             READ_FROM, _check_deepspeed_engine),
    Internal("accelerate", "AcceleratorState.device_mesh (dimension names dp_replicate and tp)",
             "shard the data loaders over the data-parallel dimension only under TP (accelerate.py)",
             READ_FROM, _check_device_mesh),
    Internal("accelerate", "AcceleratedOptimizer.step replaced on the prepared optimizer",
             "run each optimizer step under torch's implicit_replication under TP (accelerate.py)",
             READ_FROM, _check_optimizer_step),
    Internal("accelerate", "AcceleratorState._reset_state(reset_partial_state=True) and GradientState._reset_state",
             "a fresh Accelerator in a process that built one before (tests)", READ_FROM, _check_reset_state),
    Internal("accelerate", "AcceleratorState._shared_state",
             "tell that no Accelerator was built by a refused call (tests)", READ_FROM, _check_shared_state),
    Internal("accelerate", USE_CPU, "refuse ZeRO asked for the CPU while GPUs are visible (accelerate.py)",
             READ_FROM, _check_use_cpu),
    Internal("accelerate", USE_DEEPSPEED,
             "tell a DeepSpeed launch, and a leftover DeepSpeed flag under the HF Trainer (recipes.py, hf_trainer.py)",
             READ_FROM, _check_use_deepspeed),
    Internal("accelerate", f"{USE_PARALLELISM_CONFIG} and PARALLELISM_CONFIG_*",
             "read a launched TP layout, and keep Accelerate from building its own TP (recipes.py, accelerate.py)",
             READ_FROM, _check_use_parallelism_config),
    Internal("accelerate", f"{USE_FSDP} and FSDP_*",
             "read a launched FSDP2 layout, and keep Accelerate from wrapping the model in its own FSDP (recipes.py, "
             "accelerate.py)", READ_FROM, _check_use_fsdp),
    Internal("accelerate", CONFIG_DS_FIELDS, "build a DeepSpeedPlugin from the rendered config under a launch (accelerate.py)",
             READ_FROM, _check_config_ds_fields),
    Internal("accelerate", f"{MIXED_PRECISION} and ACCELERATE_DEEPSPEED_*, ACCELERATE_GRADIENT_*",
             "read a launched ZeRO layout from the environment (recipes.py)", READ_FROM, _check_launched_settings),
    Internal("accelerate", DYNAMO_BACKEND, "tell that accelerate launch started this process (recipes.py)",
             READ_FROM, _check_dynamo_backend),
    Internal("accelerate", "PartialState world-size variables and LOCAL_RANK",
             "tell whether the HF Trainer's Accelerate forms a process group (hf_trainer.py)",
             READ_FROM, _check_world_size_variables),
    Internal("accelerate", "accelerate launch command line (console scripts, --config_file, default_config_file)",
             "find the recipe of the launching accelerate launch (recipes.py)", READ_FROM, _check_launcher_command_line),
]
