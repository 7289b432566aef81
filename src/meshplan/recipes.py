"""Plan <-> Accelerate config YAML: recipes that `accelerate launch --config_file` accepts unchanged.

A recipe is a plain Accelerate config. What Accelerate has keys for (processes, machines, ZeRO
stage and offload, TP size, precision, accumulation, clipping) is written in those keys;
meshplan's remaining options (DDP options, extra ZeRO settings, a TP plan) go in one header
comment, ``# meshplan: {...}``, which Accelerate ignores and meshplan reads back. Configs that
meshplan did not write are read too; anything it cannot honour is a PlanError naming the key.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from meshplan._compat import accelerate as accelerate_compat
from meshplan.errors import PlanError, shown, shown_key
from meshplan.plan import INTEGER_OPTIONS, MIXED_PRECISIONS, ZERO_SECTION_OPTIONS, Plan

HEADER = "# meshplan: "
# The catalogue ships inside the package; the repository's recipes/ points here.
CATALOGUE_DIR = Path(__file__).resolve().parent / "catalogue"

# Accelerate's top-level keys that meshplan reads (the rest of a valid config must keep its
# default or be a launcher setting that does not change the layout).
_LAUNCH_KEYS = ("compute_environment", "num_processes", "num_machines", "machine_rank", "main_process_ip",
                "main_process_port", "rdzv_backend", "same_network", "main_training_function", "gpu_ids",
                "enable_cpu_affinity", "use_cpu", "debug", "downcast_bf16", "dynamo_config", "mpirun_config")
_LAYOUT_TYPES = {"MULTI_GPU": "ddp", "MULTI_CPU": "ddp", "NO": "ddp", "DEEPSPEED": "zero", "FSDP": "fsdp2"}
_OFFLOAD_DEVICES = {"none": False, None: False, "cpu": True}
# deepspeed_config keys that only steer the launcher.
_DEEPSPEED_LAUNCH_KEYS = ("zero3_init_flag", "zero3_save_16bit_model", "deepspeed_multinode_launcher",
                          "deepspeed_hostfile", "deepspeed_inclusion_filter", "deepspeed_exclusion_filter")

# Recipes and DeepSpeed files are untrusted input (downloaded, shared on a cluster). Real ones are
# a few KiB with a few dozen values at depth 3; these limits are far above that and bound the
# cost of a crafted file: its bytes, the YAML nodes parsed, and the values it expands to once
# aliases (a YAML "billion laughs" is 578 bytes) are followed.
MAX_FILE_BYTES = 1 << 20
MAX_VALUES = 10_000
MAX_DEPTH = 32


@dataclass(frozen=True)
class Recipe:
    """A layout plus how many processes and machines the recipe asks for.

    ``num_processes`` is None when the recipe leaves it to ``accelerate launch`` (Accelerate's
    ``num_processes: -1`` or ``null``: the launcher's ``--num_processes`` or the device count).
    """

    plan: Plan
    num_processes: int | None = 2
    num_machines: int = 1
    description: str = ""


def write_recipe(plan: Plan, path: str | os.PathLike, *, num_processes: int = 2, num_machines: int = 1,
                 description: str = "") -> Path:
    """Writes ``plan`` as an Accelerate config file at ``path`` and returns the path."""
    if num_processes < 1 or num_machines < 1 or num_processes % num_machines:
        raise PlanError(f"num_processes={num_processes} must be a positive multiple of num_machines={num_machines}.")
    plan.check_world_size(num_processes, num_processes // num_machines)
    config = _accelerate_config(plan, num_processes, num_machines)
    extras = {name: value for name, value in plan.options if not _has_accelerate_key(plan, name)}
    if plan.tp_plan is not None:
        extras["tp_plan"] = dict(plan.tp_plan)
    if plan.strategy == "tp" and plan.tp_size is None:
        extras["tp_size"] = None
    elif plan.strategy == "tp" and plan.uses_fsdp2 and plan.tp_size == 1:
        extras["tp_size"] = 1  # under FSDP, Accelerate's tp size 1 alone reads as plain FSDP2 (ZeRO on FSDP2)
    lines = [f"# {line}" if line else "#" for line in description.strip().splitlines()]
    if extras:
        lines.append(HEADER + json.dumps(extras, sort_keys=True))
    path = Path(path)
    path.write_text("\n".join(lines) + ("\n" if lines else "") + yaml.safe_dump(config, sort_keys=False))
    return path


def find_recipe(name: str | os.PathLike) -> Path:
    """The recipe file ``name`` means: the path itself when a file is there, else the catalogue's recipe of that name.

    ``zero3``, ``zero3.yaml`` and ``recipes/zero3.yaml`` all name the shipped
    ``CATALOGUE_DIR/zero3.yaml`` (the repository's recipes/ folder links there), so they work
    outside a checkout too; a file of that name here shadows the catalogue, a directory does not
    (an output folder named ``zero3`` is common). When neither exists, ``name`` is returned as
    it is, for the reader to say so.
    """
    path = Path(name)
    # A link counts too (the reader refuses it if it leads nowhere); a directory is never a recipe.
    if os.path.lexists(path) and not path.is_dir():
        return path
    catalogued = _catalogue_file(path)
    return catalogued if catalogued is not None else path


def _catalogue_file(path: Path) -> Path | None:
    """The shipped recipe that ``NAME``, ``NAME.yaml`` or ``recipes/NAME.yaml`` names; None for any other path."""
    parts = path.parts
    if len(parts) == 1 or len(parts) == 2 and parts[0] == "recipes":
        file_name = parts[-1] if parts[-1].endswith(".yaml") else parts[-1] + ".yaml"
        if file_name in catalogue_names():  # only the catalogue's own files: no other name leads out of it
            return CATALOGUE_DIR / file_name
    return None


def catalogue_names() -> list[str]:
    """The file names of the shipped recipes, sorted by name: ``ddp.yaml``, ``ddp-2node.yaml``, ..."""
    return sorted((path.name for path in CATALOGUE_DIR.glob("*.yaml")), key=lambda name: name.removesuffix(".yaml"))


def catalogue_listing() -> str:
    """The shipped recipes' names for a message: ``ddp, ddp-2node, tp, ...``."""
    return ", ".join(name.removesuffix(".yaml") for name in catalogue_names())


def _not_in_catalogue(name: str | os.PathLike) -> str:
    """The end of a "does not exist" message: that ``name`` is no catalogue name either, or, for a
    broken link named like one, that the link shadows the catalogue's recipe."""
    if _catalogue_file(Path(name)) is not None:
        return "is a link that leads nowhere; it shadows the shipped recipe of that name: remove it, or pass another path."
    return (f"is no catalogue name either; the catalogue holds {catalogue_listing()} "
            f"(`meshplan recipes` lists their paths).")


def read_recipe(path: str | os.PathLike) -> Recipe:
    """Reads an Accelerate config file (meshplan's or anyone's) into a Recipe.

    ``path`` is a file, or the name of a shipped recipe (see find_recipe): ``"zero3"``.

    The file is untrusted: its size, nesting and expanded size are bounded, and every value
    meshplan reads is checked by type before it is used or shown.

    Raises:
        PlanError: the file is missing, too large, not UTF-8 or not YAML, or asks for something
            meshplan cannot honour; one line that names the recipe and the key.
    """
    path = find_recipe(path)
    where = f"recipe {_shown_path(path)}"
    text = read_untrusted_text(path, where, missing=f"{where} does not exist, and {_not_in_catalogue(path)}")
    config = _load_yaml(text, where)
    if config is None:  # an empty file: every key at Accelerate's default
        config = {}
    if not isinstance(config, dict):
        raise PlanError(f"{where} is not an Accelerate config (a YAML mapping of keys).")
    extras = _header_extras(text, where)
    try:
        plan = plan_from_accelerate_config(config, extras, base_dir=path.parent)
        num_processes = _process_count(config.get("num_processes", 1))
        num_machines = _machine_count(config.get("num_machines", 1))
    except PlanError as error:
        raise PlanError(f"{where}: {error}") from None
    return Recipe(plan, num_processes, num_machines, _description(text))


def plan_from_accelerate_config(config: Mapping[str, Any], extras: Mapping[str, Any] | None = None,
                                base_dir: Path | None = None) -> Plan:
    """The Plan an Accelerate config describes; ``extras`` are meshplan's header options.

    Every value is checked by type before it is used; a PlanError names the key at fault.
    """
    extras = dict(extras or {})
    for key in config:
        if key not in _LAUNCH_KEYS and key not in ("distributed_type", "mixed_precision", "deepspeed_config",
                                                   "parallelism_config", "fsdp_config", "megatron_lm_config",
                                                   "fp8_config", "tpu_env", "tpu_vm", "commands", "command_file",
                                                   "tpu_name", "tpu_zone", "tpu_use_cluster", "tpu_use_sudo"):
            raise PlanError(f"key {shown(key)} is not an Accelerate config key meshplan knows.")
    _refuse_unsupported_sections(config)
    distributed_type = _distributed_type(config.get("distributed_type", "NO"))
    parallelism = _mapping(config, "parallelism_config")
    deepspeed = _mapping(config, "deepspeed_config")
    if _mapping(config, "dynamo_config").get("dynamo_backend", "NO") not in ("NO", "no"):
        raise PlanError("key dynamo_config.dynamo_backend is not honoured: meshplan does not compile models.")
    tp_size = _tp_size(parallelism, sharded=distributed_type == "FSDP")
    # A TP size, even 1, asks for the TP layout (Accelerate exports it whenever parallelism is on).
    tensor_parallel = any(key in parallelism for key in ("parallelism_config_tp_size", "tp_size")) or "tp_size" in extras
    options = {name: extras.pop(name) for name in list(extras) if name not in ("tp_plan", "tp_size")}
    precision = _mixed_precision(config.get("mixed_precision"))
    if precision not in (None, "no"):
        options["mixed_precision"] = precision
    if deepspeed and distributed_type != "DEEPSPEED":
        raise PlanError(f"keys distributed_type={distributed_type!r} and deepspeed_config contradict: "
                        f"deepspeed_config only applies with distributed_type 'DEEPSPEED'.")
    fsdp = _mapping(config, "fsdp_config")
    if distributed_type == "FSDP":
        # Under FSDP a tp size of 1 (which `accelerate launch` exports whenever parallelism_config is on) is no TP.
        tensor_parallel = tp_size > 1 or "tp_size" in extras or "tp_plan" in extras
        _check_sharded_size(parallelism, tp_size, config.get("num_processes"))
        return _fsdp2_plan(fsdp, tensor_parallel, extras, tp_size, options)
    if fsdp:
        raise PlanError(f"keys distributed_type={distributed_type!r} and fsdp_config contradict: "
                        f"fsdp_config only applies with distributed_type 'FSDP'.")
    if "tp_plan" in extras and not tensor_parallel:
        raise PlanError("header option tp_plan contradicts the recipe's layout: it has no parallelism_config tp size.")
    if tensor_parallel:
        if distributed_type == "DEEPSPEED":
            raise PlanError("keys distributed_type='DEEPSPEED' and parallelism_config_tp_size contradict: "
                            "meshplan runs tensor parallelism with DTensor, not under DeepSpeed.")
        return Plan.build("tp", tp_size=extras.get("tp_size", tp_size), tp_plan=extras.get("tp_plan"), options=options)
    if distributed_type == "DEEPSPEED":
        return _zero_plan(deepspeed, options, base_dir)
    return Plan.build("ddp", options=options)


def started_by_a_launcher(environ: Mapping[str, str] | None = None) -> bool:
    """Whether a launcher (torchrun, ``accelerate launch``, DeepSpeed's) started this process."""
    environ = os.environ if environ is None else environ
    return "LOCAL_RANK" in environ or accelerate_compat.USE_DEEPSPEED in environ


def plan_from_environment(environ: Mapping[str, str] | None = None, extras: Mapping[str, Any] | None = None) -> Plan | None:
    """The Plan that ``accelerate launch`` passed to this process through its environment, or None.

    Accelerate passes its own keys as environment variables; ``extras`` are the recipe's
    meshplan header options, which only the recipe file holds (see launched_recipe_extras).
    """
    environ = os.environ if environ is None else environ
    if not started_by_a_launcher(environ):
        return None
    config: dict[str, Any] = {"distributed_type": "MULTI_GPU"}
    precision = environ.get(accelerate_compat.MIXED_PRECISION)
    if precision:
        config["mixed_precision"] = precision
    if accelerate_compat.switched_on(accelerate_compat.USE_DEEPSPEED, environ):
        config["distributed_type"] = "DEEPSPEED"
        config["deepspeed_config"] = _deepspeed_config_from_environment(environ)
    if accelerate_compat.switched_on(accelerate_compat.USE_FSDP, environ):
        config["distributed_type"] = "FSDP"
        config["fsdp_config"] = _fsdp_config_from_environment(environ)
    if accelerate_compat.switched_on(accelerate_compat.USE_PARALLELISM_CONFIG, environ):
        config["parallelism_config"] = {key: _environment_number(environ, variable)
                                        for variable, key in accelerate_compat.PARALLELISM_VARIABLES.items()
                                        if variable in environ}
        # The sizes are checked against the launched world, as a recipe's against its num_processes.
        world_size = _environment_number(environ, "WORLD_SIZE") if "WORLD_SIZE" in environ else None
        if type(world_size) is int:
            config["num_processes"] = world_size
    try:
        return plan_from_accelerate_config(config, extras)
    except PlanError as error:
        raise PlanError(f"the settings `accelerate launch` passed in the environment: {error}") from None


# Names the recipe of a launch explicitly; read before anything else (see launched_recipe_extras).
RECIPE_VARIABLE = "MESHPLAN_RECIPE"


def launched_recipe_extras(parent_pid: int | None = None, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The meshplan header options of the recipe this process was launched with; {} when there is none.

    Accelerate exports its own keys to the workers but not the config file's path. The recipe is
    found, in order: through $MESHPLAN_RECIPE (survives every launcher: SLURM, pdsh, macOS, nested
    launchers); through the command line of the ``accelerate launch`` that is the parent process
    (Linux /proc; Accelerate's default config file when it names none). A ZeRO recipe's DeepSpeed
    options in a ``deepspeed_config_file`` reach the workers without either (Accelerate exports
    its path).

    Raises:
        PlanError: ``accelerate launch`` started this process but its recipe cannot be found, so
            options in its header would be lost: set MESHPLAN_RECIPE or pass the recipe path.
    """
    environ = os.environ if environ is None else environ
    named = environ.get(RECIPE_VARIABLE)
    if named:
        # Only a bare name ("zero3") means the shipped recipe here: a path ("recipes/zero3.yaml")
        # names the user's own copy, whose header options must not silently give way to the shipped
        # one's when the copy is missing (another node, another working directory).
        path = find_recipe(named) if Path(named).name == named and not named.endswith(".yaml") else Path(named)
        where = f"{RECIPE_VARIABLE}={_shown_path(path)}"
        text = read_untrusted_text(path, where, missing=f"{where} names no file and {_not_in_catalogue(named)} Set it "
                                                        f"to the recipe given to accelerate launch.")
        return _header_extras(text, where)
    found, path = _recipe_of_parent(parent_pid)
    if found:
        if path is None:
            return {}
        where = f"recipe {_shown_path(path)}"
        return _header_extras(read_untrusted_text(path, where, missing=f"{where} does not exist."), where)
    if accelerate_compat.launched_by_accelerate(environ):
        raise PlanError(
            "meshplan.accelerator() cannot find the recipe `accelerate launch` started this process with (Accelerate "
            "does not pass the config file's path to its workers, and the launching command line cannot be read "
            "here), so meshplan options in its '# meshplan:' header would be lost. Launch with "
            f"{RECIPE_VARIABLE}=<recipe path or catalogue name> in the environment, or pass the recipe: "
            "meshplan.accelerator('zero3') or meshplan.accelerator('path/to/recipe.yaml')."
        )
    return {}


def _recipe_of_parent(parent_pid: int | None) -> tuple[bool, Path | None]:
    """(found, recipe path) from the parent ``accelerate launch``; found is False when that cannot be told."""
    parent = Path(f"/proc/{parent_pid or os.getppid()}")
    try:
        # File names need not be UTF-8; fsdecode keeps their bytes as the OS does.
        arguments = [os.fsdecode(argument) for argument in (parent / "cmdline").read_bytes().split(b"\0")]
        cwd = (parent / "cwd").resolve()
    except OSError:
        return False, None
    if not accelerate_compat.is_accelerate_launch(arguments):
        return False, None
    value = accelerate_compat.config_file_argument(arguments)
    if value:
        path = Path(value) if Path(value).is_absolute() else cwd / value
        # Anything there is read (and refused if it is no plain file); nothing there: no recipe.
        return True, path if os.path.lexists(path) else None
    default = accelerate_compat.default_config_file()  # what `accelerate launch` reads without one
    return True, default if default.is_file() else None


def _deepspeed_config_from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """Accelerate's DeepSpeed variables as the typed deepspeed_config section a recipe file holds."""
    numbers = ("zero_stage", "gradient_accumulation_steps", "gradient_clipping")
    return {key: _environment_number(environ, variable) if key in numbers else environ[variable]
            for variable, key in accelerate_compat.DEEPSPEED_VARIABLES.items() if variable in environ}


# fsdp_config keys whose values are booleans (the launcher exports them as "true" or "false").
_FSDP_FLAGS = ("fsdp_reshard_after_forward", "fsdp_offload_params", "fsdp_cpu_ram_efficient_loading",
               "fsdp_activation_checkpointing", "fsdp_activation_checkpointing_offload", "fsdp_forward_prefetch",
               "fsdp_use_orig_params", "fsdp_sync_module_states")


def _fsdp_config_from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """Accelerate's FSDP_* variables as the typed fsdp_config section a recipe file holds."""
    section: dict[str, Any] = {}
    for variable, key in accelerate_compat.FSDP_VARIABLES.items():
        if variable not in environ:
            continue
        text = environ[variable]
        if key in _FSDP_FLAGS and text.lower() in ("true", "false"):
            section[key] = text.lower() == "true"
        elif key in ("fsdp_version", "fsdp_min_num_params"):
            section[key] = _environment_number(environ, variable)
        else:
            section[key] = text
    return section


def _environment_number(environ: Mapping[str, str], variable: str) -> Any:
    """An environment variable as the int or float a recipe file would hold; other text (such as
    "none" or "auto") is kept as it is, for the key's own check to take or refuse."""
    text = environ[variable]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _accelerate_config(plan: Plan, num_processes: int, num_machines: int) -> dict[str, Any]:
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        # MULTI_GPU (and FSDP) make `accelerate launch` start one worker per process through torchrun,
        # on GPUs and CPUs alike; meshplan.accelerator() picks the device and backend in the worker.
        "distributed_type": "FSDP" if plan.uses_fsdp2 else "DEEPSPEED" if plan.strategy == "zero" else "MULTI_GPU",
        "num_processes": num_processes,
        "num_machines": num_machines,
        "machine_rank": 0,
        "mixed_precision": plan.option("mixed_precision", "no"),
        "rdzv_backend": "static",
        "same_network": True,
        "main_training_function": "main",
        "use_cpu": False,
    }
    if plan.uses_fsdp2:
        config["fsdp_config"] = _fsdp_section(plan)
    elif plan.strategy == "zero":
        config["deepspeed_config"] = _deepspeed_section(plan)
        if num_machines > 1:
            # One launcher per machine (torchrun), like every other layout; DeepSpeed's default
            # multi-node launcher would instead ssh into a hostfile's machines with pdsh.
            config["deepspeed_config"]["deepspeed_multinode_launcher"] = "standard"
    if plan.strategy == "tp" and plan.tp_size is not None:
        config["parallelism_config"] = {"parallelism_config_tp_size": plan.tp_size}
        if plan.uses_fsdp2:
            # Accelerate's ParallelismConfig wants the sizes to multiply up to the world size.
            config["parallelism_config"] = {"parallelism_config_dp_shard_size": num_processes // plan.tp_size,
                                            "parallelism_config_tp_size": plan.tp_size}
    return config


def _fsdp_section(plan: Plan) -> dict[str, Any]:
    """Accelerate's own fsdp_config keys for an FSDP2 layout; every setting meshplan does not apply is off."""
    section: dict[str, Any] = {
        "fsdp_version": 2,
        "fsdp_reshard_after_forward": plan.reshard_after_forward,
        # The transformer blocks (the model's _no_split_modules), as meshplan.fsdp finds them.
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    }
    if plan.option("fsdp_layer_classes") is not None:
        section["fsdp_transformer_layer_cls_to_wrap"] = plan.option("fsdp_layer_classes")
    section.update({
        "fsdp_state_dict_type": "SHARDED_STATE_DICT",
        "fsdp_offload_params": False,
        # The launcher's default is true: ranks other than 0 would load weights on the meta device.
        "fsdp_cpu_ram_efficient_loading": False,
        "fsdp_activation_checkpointing": False,
    })
    return section


# fsdp_config keys meshplan honours only at one value, and why; the message names the key.
_FSDP_FIXED = {
    "fsdp_offload_params": (False, "meshplan's FSDP2 keeps parameters on the device; ZeRO(stage=3, "
                                   "engine='deepspeed', offload_parameters=True) offloads them"),
    "fsdp_cpu_ram_efficient_loading": (False, "with it, from_pretrained leaves the weights of every rank but 0 on "
                                              "the meta device, which meshplan does not fill in"),
    "fsdp_activation_checkpointing": (False, "meshplan does not checkpoint activations for you; call "
                                             "model.gradient_checkpointing_enable() in your script"),
    "fsdp_activation_checkpointing_offload": (False, "meshplan does not checkpoint activations for you"),
}
# fsdp_config keys that change nothing meshplan does: checkpoints are meshplan's own, size-based
# wrapping is not chosen, and the FSDP1 settings Accelerate ignores under fsdp_version 2.
_FSDP_IGNORED = ("fsdp_state_dict_type", "fsdp_min_num_params", "fsdp_sharding_strategy", "fsdp_backward_prefetch",
                 "fsdp_forward_prefetch", "fsdp_use_orig_params", "fsdp_sync_module_states")
_STATE_DICT_TYPES = ("SHARDED_STATE_DICT", "FULL_STATE_DICT")


def _fsdp2_plan(section: Mapping[str, Any], tensor_parallel: bool, extras: Mapping[str, Any], tp_size: int,
                options: dict[str, Any]) -> Plan:
    """The FSDP2 Plan of an fsdp_config section: ZeRO on FSDP2, or TP x FSDP2 with a tp size."""
    version = section.get("fsdp_version", 1)
    if version == "2":
        raise PlanError("key fsdp_config.fsdp_version='2' is a string: versions are integers in a recipe, as "
                        "`accelerate config` writes them; write fsdp_version: 2, without quotes.")
    if version != 2 or isinstance(version, bool):
        raise PlanError(
            f"key fsdp_config.fsdp_version={shown(version)}: meshplan runs FSDP2 only (fsdp_version: 2), not FSDP1, "
            f"which is Accelerate's default when the key is missing. Convert the config with "
            f"`accelerate to-fsdp2 --config_file CONFIG --output_file NEW`, then check it keeps the settings you meant."
        )
    for key, value in section.items():
        _check_fsdp_key(key, value)
    reshard = section.get("fsdp_reshard_after_forward", True)
    if not isinstance(reshard, bool):
        raise PlanError(f"key fsdp_config.fsdp_reshard_after_forward={shown(reshard)} must be true or false under "
                        f"fsdp_version 2.")
    classes = section.get("fsdp_transformer_layer_cls_to_wrap")
    if classes is not None:
        options = {**options, "fsdp_layer_classes": classes}
    if tensor_parallel:
        if not reshard:
            raise PlanError("key fsdp_config.fsdp_reshard_after_forward=false is not honoured with a tp size: "
                            "meshplan's TP x FSDP2 reshards after every forward; write true.")
        return Plan.build("tp", tp_size=extras.get("tp_size", tp_size), tp_plan=extras.get("tp_plan"),
                          data_parallel="shard", options=options)
    if "tp_plan" in extras:
        raise PlanError("header option tp_plan contradicts the recipe's layout: it has no parallelism_config tp size.")
    # Resharding after the forward is ZeRO-3; keeping the gathered parameters until the backward, ZeRO-2.
    return Plan.build("zero", zero_stage=3 if reshard else 2, engine="fsdp2", options=options)


def _check_fsdp_key(key: Any, value: Any) -> None:
    """Refuses an fsdp_config key meshplan does not know, or a value of it meshplan cannot honour."""
    if not isinstance(key, str):
        raise PlanError(f"key fsdp_config.{shown(key)} is not one meshplan honours.")
    if key in _FSDP_FIXED:
        wanted, reason = _FSDP_FIXED[key]
        if value is not wanted and value is not None:
            raise PlanError(f"key fsdp_config.{key}={shown(value)} is not honoured: {reason}; write "
                            f"{json.dumps(wanted)} or remove it.")
    elif key == "fsdp_auto_wrap_policy":
        if value not in (None, "TRANSFORMER_BASED_WRAP"):
            raise PlanError(f"key fsdp_config.fsdp_auto_wrap_policy={shown(value)} is not honoured: meshplan shards "
                            f"the model's transformer blocks (TRANSFORMER_BASED_WRAP); write that or remove it.")
    elif key == "fsdp_transformer_layer_cls_to_wrap":
        if not isinstance(value, str):
            raise PlanError(f"key fsdp_config.fsdp_transformer_layer_cls_to_wrap={shown(value)} must be class names "
                            f"separated by commas.")
    elif key == "fsdp_state_dict_type":
        if value not in (None, *_STATE_DICT_TYPES):
            raise PlanError(f"key fsdp_config.fsdp_state_dict_type={shown(value)} is not honoured; valid values are "
                            f"{', '.join(_STATE_DICT_TYPES)} (meshplan's checkpoints are layout-independent either way).")
    elif key == "fsdp_ignored_modules":
        if value:
            raise PlanError(f"key fsdp_config.fsdp_ignored_modules={shown(value)} is not honoured: meshplan shards "
                            f"every parameter of the model; remove it.")
    elif key not in ("fsdp_version", "fsdp_reshard_after_forward", *_FSDP_IGNORED):
        raise PlanError(f"key fsdp_config.{shown_key(key)} is not one meshplan honours.")


def _check_sharded_size(parallelism: Mapping[str, Any], tp_size: int, num_processes: Any) -> None:
    """Under FSDP, parallelism_config's dp_shard_size times tp_size must be the recipe's process count."""
    shard = parallelism.get("parallelism_config_dp_shard_size", parallelism.get("dp_shard_size"))
    if shard is None or type(num_processes) is not int or num_processes < 1:
        return
    if shard * tp_size != num_processes:
        raise PlanError(f"keys parallelism_config_dp_shard_size={shard} and parallelism_config_tp_size={tp_size} "
                        f"contradict num_processes={num_processes}: their product is the world size; meshplan "
                        f"shards over the processes left over by tp_size ({num_processes // max(tp_size, 1)}).")


def _deepspeed_section(plan: Plan) -> dict[str, Any]:
    section: dict[str, Any] = {
        "zero_stage": plan.zero_stage,
        "offload_optimizer_device": "cpu" if plan.offload_optimizer else "none",
        "offload_param_device": "cpu" if plan.offload_parameters else "none",
        "zero3_init_flag": False,
    }
    for name in ("gradient_accumulation_steps", "gradient_clipping"):
        if plan.option(name) is not None:
            section[name] = plan.option(name)
    return section


def _has_accelerate_key(plan: Plan, option: str) -> bool:
    """Whether an Accelerate key carries ``option`` in a recipe of ``plan``."""
    if option == "mixed_precision":
        # "no" is also Accelerate's default, so an explicit "no" is kept in the header.
        return plan.option(option) != "no"
    if option == "fsdp_layer_classes":
        return True  # fsdp_transformer_layer_cls_to_wrap
    return plan.uses_deepspeed and option in ("gradient_accumulation_steps", "gradient_clipping")


def _zero_plan(section: Mapping[str, Any], options: dict[str, Any], base_dir: Path | None) -> Plan:
    section = dict(section)
    for key in section:
        if key not in ("zero_stage", "offload_optimizer_device", "offload_param_device", "gradient_accumulation_steps",
                       "gradient_clipping", "deepspeed_config_file", *_DEEPSPEED_LAUNCH_KEYS):
            raise PlanError(f"key deepspeed_config.{shown_key(key)} is not one meshplan honours.")
    config_file = section.pop("deepspeed_config_file", None)
    if config_file is not None:
        file_plan = plan_from_deepspeed_json(_resolve(config_file, base_dir))
        leftover = sorted(set(section) - set(_DEEPSPEED_LAUNCH_KEYS))
        if leftover:
            raise PlanError(f"keys deepspeed_config.{leftover[0]} and deepspeed_config_file contradict: "
                            f"with a DeepSpeed config file, set {leftover[0]} in that file.")
        file_options = dict(file_plan.options)
        for name in set(file_options) & set(options):
            if file_options[name] != options[name]:
                raise PlanError(f"key {name}={shown(options[name])} contradicts {shown(file_options[name])} in "
                                f"deepspeed_config_file; set it in one place.")
        return Plan.build("zero", zero_stage=file_plan.zero_stage, offload_optimizer=file_plan.offload_optimizer,
                          offload_parameters=file_plan.offload_parameters, options={**file_options, **options})
    for name in ("gradient_accumulation_steps", "gradient_clipping"):
        if name in section and section[name] not in (None, "none", "auto"):
            options[name] = _number(section[name], f"deepspeed_config.{name}",
                                    integer=name == "gradient_accumulation_steps")
    return Plan.build(
        "zero", zero_stage=_integer(section.get("zero_stage", 2), "deepspeed_config.zero_stage"),
        offload_optimizer=_offload(section.get("offload_optimizer_device"),
                                   "deepspeed_config.offload_optimizer_device"),
        offload_parameters=_offload(section.get("offload_param_device"), "deepspeed_config.offload_param_device"),
        options=options,
    )


def plan_from_deepspeed_json(path: Path) -> Plan:
    """The ZeRO Plan of a DeepSpeed JSON config file; refuses sections meshplan cannot honour.

    The Hugging Face templates are read without their ``optimizer`` and ``scheduler`` sections
    (the user's code builds those; they are refused with the TrainingArguments to use instead):
    "auto" means the front end's own value (DeepSpeed's default for bucket sizes), and the keys
    meshplan sets itself are accepted at the value it sets. Every key meshplan does not know is
    named in one PlanError. The file is untrusted like a recipe: bounded in size, nesting
    and number of values, with every value meshplan reads checked by type.
    """
    where = f"DeepSpeed config {_shown_path(path)}"
    text = read_untrusted_text(path, where, missing=f"key deepspeed_config.deepspeed_config_file={_shown_path(path)} "
                                                    f"names no file.")
    config = _load_json(text, where)
    if not isinstance(config, dict) or not isinstance(config.get("zero_optimization", {}), dict):
        raise PlanError(f"{where} must be a JSON object with a zero_optimization object.")
    _refuse_unknown_deepspeed_keys(config, where)
    try:
        return _zero_plan_of_deepspeed(config)
    except PlanError as error:
        raise PlanError(f"{where}: {error}") from None


# What meshplan reads in a DeepSpeed JSON file: the keys of the Hugging Face templates.
_DEEPSPEED_KEYS = (
    "zero_optimization", "bf16", "fp16", "gradient_accumulation_steps", "gradient_clipping",
    # Set by the front end ("auto": the DataLoader's or TrainingArguments' batch size) or by meshplan.
    "train_batch_size", "train_micro_batch_size_per_gpu",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    # DeepSpeed's own logging, which changes nothing in training.
    "steps_per_print", "wall_clock_breakdown",
)
# Sections the user's code owns: the optimizer and schedule it builds are the ones that run.
_CODE_OWNED_SECTIONS = ("optimizer", "scheduler")
_OFFLOAD_KEYS = ("device", "pin_memory")
# zero_optimization keys meshplan accepts only at the value its own config has, and why.
_FIXED_ZERO_KEYS = {
    "stage3_gather_16bit_weights_on_model_save": (
        True, "meshplan always sets it, because without it the HF Trainer's save_model writes no model.safetensors "
              "under ZeRO-3 and Accelerate's get_state_dict and save_model cannot gather the weights"),
    "allgather_partitions": (True, "meshplan keeps DeepSpeed's default, gathering the partitions after each step"),
    "reduce_scatter": (True, "meshplan keeps DeepSpeed's default, reducing gradients with reduce-scatter"),
}
# Top-level keys meshplan accepts only at the value its own config has, and why.
_FIXED_TOP_LEVEL_KEYS = {
    "zero_allow_untested_optimizer": (
        True, "meshplan runs whichever torch optimizer your code builds, so it always sets it"),
    "zero_force_ds_cpu_optimizer": (
        False, "meshplan steps offloaded optimizer state with the optimizer your code builds, not DeepSpeedCPUAdam"),
}
# fp16 keys meshplan accepts only at DeepSpeed's defaults (the HF templates' values): it writes no other.
_FP16_DEFAULTS = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                  "min_loss_scale": 1, "auto_cast": False, "consecutive_hysteresis": False}
# Every zero_optimization key meshplan reads.
_ZERO_KEYS_READ = ("stage", "offload_optimizer", "offload_param", *ZERO_SECTION_OPTIONS, *_FIXED_ZERO_KEYS)
# At most this many unknown keys are named in one message (the file is untrusted; real ones have a few).
_MAX_KEYS_SHOWN = 10


def _refuse_unknown_deepspeed_keys(config: dict[str, Any], where: str) -> None:
    """One PlanError naming every key meshplan does not read, and the sections it leaves to your code."""
    unknown = _unknown_deepspeed_keys(config)
    owned = [key for key in _CODE_OWNED_SECTIONS if key in config]
    problems = []
    if unknown:
        problems.append(
            f"{_keys(unknown)} in {where} {_verb(unknown, 'is not one', 'are not ones')} meshplan honours; remove "
            f"{_verb(unknown, 'it', 'them')}. meshplan reads zero_optimization keys {', '.join(_ZERO_KEYS_READ)} "
            f"(offload sections: {', '.join(_OFFLOAD_KEYS)}) and top-level keys {', '.join(_DEEPSPEED_KEYS[1:])}."
        )
    if owned:
        problems.append(
            f"{'Also, ' if unknown else ''}{_keys(owned)} in {where} {_verb(owned, 'is', 'are')} not honoured: "
            f"meshplan trains with the optimizer and learning-rate schedule your code builds; remove "
            f"{_verb(owned, 'it', 'them')}. With the HF Trainer those come from TrainingArguments (optim, "
            f"learning_rate, adam_beta1, adam_beta2, adam_epsilon, weight_decay, lr_scheduler_type, warmup_steps), "
            f"where DeepSpeed's \"auto\" values come from too; DeepSpeed's WarmupLR is "
            f"lr_scheduler_type='constant_with_warmup' and WarmupDecayLR is 'linear'."
        )
    if problems:
        raise PlanError(" ".join(problems))


def _unknown_deepspeed_keys(config: dict[str, Any]) -> list[str]:
    """The dotted names of the keys in a DeepSpeed config that meshplan does not read, in file order."""
    unknown = [shown_key(key) for key in config if key not in (*_DEEPSPEED_KEYS, *_CODE_OWNED_SECTIONS)]
    zero = config.get("zero_optimization") or {}
    unknown += [f"zero_optimization.{shown_key(key)}" for key in zero if key not in _ZERO_KEYS_READ]
    for section in ("offload_optimizer", "offload_param"):
        unknown += _unknown_in(zero.get(section), _OFFLOAD_KEYS, f"zero_optimization.{section}")
    unknown += _unknown_in(config.get("fp16"), ("enabled", *_FP16_DEFAULTS), "fp16")
    unknown += _unknown_in(config.get("bf16"), ("enabled",), "bf16")
    return unknown


def _keys(names: list[str]) -> str:
    """"key a" or "keys a, b and c", naming at most _MAX_KEYS_SHOWN of them."""
    if len(names) == 1:
        return f"key {names[0]}"
    shown_names = names[:_MAX_KEYS_SHOWN]
    more = f" and {len(names) - len(shown_names)} more" if len(names) > len(shown_names) else ""
    return f"keys {', '.join(shown_names[:-1])} and {shown_names[-1]}{more}"


def _verb(names: list[str], one: str, several: str) -> str:
    return one if len(names) == 1 else several


def _unknown_in(section: Any, known: tuple[str, ...], name: str) -> list[str]:
    """The dotted names of the keys of a JSON object ``section`` that are not ``known`` (none when it is no object)."""
    if not isinstance(section, dict):
        return []  # its own check says what it must be
    return [f"{name}.{shown_key(key)}" for key in section if key not in known]


def _zero_plan_of_deepspeed(config: dict[str, Any]) -> Plan:
    """The ZeRO Plan of a parsed DeepSpeed config whose keys are all known (checked for size, not yet for types)."""
    # "auto" (the HF templates' placeholder) means: not set here.
    zero = {key: value for key, value in config.pop("zero_optimization", {}).items() if value != "auto"}
    options: dict[str, Any] = {}
    for key, value in config.items():
        if key in ("gradient_accumulation_steps", "gradient_clipping") and value != "auto":
            options[key] = _integral_to_int(key, value)
        elif key in ("bf16", "fp16"):
            if _precision_enabled(key, value):
                options["mixed_precision"] = key
        elif key in _FIXED_TOP_LEVEL_KEYS:
            _refuse_another_value(key, value, *_FIXED_TOP_LEVEL_KEYS[key])
        elif key in ("train_batch_size", "train_micro_batch_size_per_gpu") and value not in ("auto", None):
            raise PlanError(f"key {key}={shown(value)} is not honoured: the batch size is your DataLoader's (with "
                            f"the HF Trainer, per_device_train_batch_size and gradient_accumulation_steps); write "
                            f"\"auto\".")
    offload_optimizer_section = _object(zero.pop("offload_optimizer", None), "zero_optimization.offload_optimizer")
    offload_param_section = _object(zero.pop("offload_param", None), "zero_optimization.offload_param")
    offload_optimizer = _offload(offload_optimizer_section.get("device"), "zero_optimization.offload_optimizer.device")
    offload_parameters = _offload(offload_param_section.get("device"), "zero_optimization.offload_param.device")
    pin_memory = False
    for name, section, offloaded in (("offload_optimizer", offload_optimizer_section, offload_optimizer),
                                     ("offload_param", offload_param_section, offload_parameters)):
        value = section.get("pin_memory") or False  # null or absent: DeepSpeed's default, false
        if not isinstance(value, bool):
            raise PlanError(f"key zero_optimization.{name}.pin_memory={shown(value)} must be true or false.")
        pin_memory = pin_memory or value and offloaded  # with device "none" there is nothing to pin
    stage = zero.pop("stage", 0)
    for key, (wanted, reason) in _FIXED_ZERO_KEYS.items():
        _refuse_another_value(f"zero_optimization.{key}", zero.pop(key, wanted), wanted, reason)
    for key, value in zero.items():
        options[key] = _integral_to_int(key, value)  # Plan checks each name and type (JSON keys are strings)
    if pin_memory:
        options["pin_memory"] = True
    return Plan.build("zero", zero_stage=stage, offload_optimizer=offload_optimizer,
                      offload_parameters=offload_parameters, options=options)


def _refuse_another_value(key: str, value: Any, wanted: bool, reason: str) -> None:
    """Refuses a key that meshplan accepts only at the value it sets itself, saying why."""
    if value is not wanted:
        raise PlanError(f"key {key}={shown(value)} is not honoured: {reason}; write {json.dumps(wanted)} or remove it.")


def _integral_to_int(option: str, value: Any) -> Any:
    """An integral float (JSON's 1e9) as the int an integer option takes; other values as they are, for the Plan."""
    if option in INTEGER_OPTIONS and type(value) is float and value.is_integer():
        return int(value)
    return value


def _precision_enabled(key: str, section: Any) -> bool:
    """Whether a bf16 or fp16 section turns that precision on; "auto" leaves it to the front end."""
    if not isinstance(section, dict):
        raise PlanError(f"key {key}={shown(section)} must be an object such as {{\"enabled\": true}}.")
    enabled = section.get("enabled")
    if not (enabled is None or isinstance(enabled, bool) or enabled == "auto"):
        raise PlanError(f"key {key}.enabled={shown(enabled)} must be true, false or \"auto\".")
    if key == "fp16":
        _check_fp16_defaults(section)
    return enabled is True


def _check_fp16_defaults(section: dict[str, Any]) -> None:
    """Refuses an fp16 loss-scaling setting other than DeepSpeed's default, which is all meshplan writes."""
    for name, default in _FP16_DEFAULTS.items():
        value = section.get(name, default)
        if value != default or isinstance(value, bool) is not isinstance(default, bool):
            raise PlanError(f"key fp16.{name}={shown(value)} is not honoured: meshplan keeps DeepSpeed's default, "
                            f"{json.dumps(default)}; write that or remove it.")


def _refuse_unsupported_sections(config: Mapping[str, Any]) -> None:
    for key in ("megatron_lm_config", "fp8_config"):
        if _mapping(config, key):
            raise PlanError(f"key {key!r} asks for a layout meshplan does not run; use DDP, ZeRO (DeepSpeed or FSDP2) "
                            f"or TP.")


def _distributed_type(value: Any) -> str:
    if isinstance(value, bool):
        # YAML 1.1 reads unquoted NO, no, off (and YES, on) as booleans; Accelerate's writer quotes 'NO'.
        raise PlanError(f"key distributed_type is the YAML boolean {str(value).lower()} (an unquoted NO, no or off "
                        f"reads as false): quote it, distributed_type: 'NO'.")
    if not isinstance(value, str) or value not in _LAYOUT_TYPES:
        raise PlanError(
            f"key distributed_type={shown(value)} is not a layout meshplan runs; valid values are "
            f"{', '.join(_LAYOUT_TYPES)} (with parallelism_config for tensor parallelism)."
        )
    return value


def _mixed_precision(value: Any) -> str | None:
    if isinstance(value, bool):
        raise PlanError(f"key mixed_precision is the YAML boolean {str(value).lower()} (an unquoted no or off reads "
                        f"as false): quote it, mixed_precision: 'no'.")
    if value is not None and (not isinstance(value, str) or value not in MIXED_PRECISIONS):
        raise PlanError(f"key mixed_precision={shown(value)} is not honoured; valid values are "
                        f"{', '.join(MIXED_PRECISIONS)}.")
    return value


def _process_count(value: Any) -> int | None:
    """num_processes; None where Accelerate leaves it to the launcher (-1, its default, or null)."""
    if value is None or type(value) is int and value == -1:
        return None
    if type(value) is not int or value < 1:
        raise PlanError(f"key num_processes={shown(value)} must be a positive integer (or -1: set by "
                        f"`accelerate launch --num_processes`).")
    return value


def _machine_count(value: Any) -> int:
    """num_machines; null is Accelerate's default, 1."""
    if value is None:
        return 1
    if type(value) is not int or value < 1:
        raise PlanError(f"key num_machines={shown(value)} must be a positive integer.")
    return value


def _tp_size(section: Mapping[str, Any], sharded: bool = False) -> int:
    """The tp size of a parallelism_config section; with ``sharded`` (distributed_type FSDP) it may
    name a dp_shard_size, the processes FSDP2 shards over."""
    for key, value in section.items():
        if not isinstance(key, str):
            raise PlanError(f"key parallelism_config.{shown(key)} is not one meshplan honours.")
        short = key.removeprefix("parallelism_config_")
        if short == "tp_size":
            continue
        if short == "dp_shard_size" and sharded:
            if _integer(value, f"parallelism_config.{key}") < 1:
                raise PlanError(f"key parallelism_config.{key}={value!r} must be a positive integer.")
        elif short in ("dp_replicate_size", "dp_shard_size", "cp_size", "sp_size"):
            if _integer(value, f"parallelism_config.{key}") > 1:
                raise PlanError(f"key parallelism_config.{key}={value!r} is not honoured: meshplan's data-parallel "
                                f"dimension is the processes left over by tp_size.")
        elif short not in ("cp_backend", "sp_backend"):
            raise PlanError(f"key parallelism_config.{shown_key(key)} is not one meshplan honours.")
    value = section.get("parallelism_config_tp_size", section.get("tp_size", 1))
    return _integer(value, "parallelism_config.parallelism_config_tp_size")


def _offload(device: Any, key: str) -> bool:
    if not (device is None or isinstance(device, str)) or device not in _OFFLOAD_DEVICES:
        raise PlanError(f"key {key}={shown(device)} is not honoured; valid devices are 'none' and 'cpu'.")
    return _OFFLOAD_DEVICES[device]


def _integer(value: Any, key: str) -> int:
    if type(value) is not int:  # not a bool, a float or a string: what Accelerate itself writes
        raise PlanError(f"key {key}={shown(value)} must be an integer.")
    return value


def _number(value: Any, key: str, integer: bool = False) -> int | float:
    if integer:
        return _integer(value, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PlanError(f"key {key}={shown(value)} must be a number.")
    return value


def _mapping(config: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key) or {}
    if not isinstance(value, Mapping):
        raise PlanError(f"key {key} must be a mapping of keys, not {type(value).__name__}.")
    return dict(value)


def _object(value: Any, key: str) -> dict[str, Any]:
    """A DeepSpeed section that must be a JSON object; null or absent is an empty one."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PlanError(f"key {key}={shown(value)} must be an object.")
    return value


def _resolve(path: Any, base_dir: Path | None) -> Path:
    if not isinstance(path, str):
        raise PlanError(f"key deepspeed_config.deepspeed_config_file={shown(path)} must be a file name.")
    candidate = Path(path)
    # os.path.exists is False for any name it cannot stat (too long, a NUL in it); the reader says why.
    if not candidate.is_absolute() and base_dir is not None and not os.path.exists(candidate):
        candidate = base_dir / candidate
    return candidate


def _shown_path(path: Path) -> str:
    return shown(str(path))


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = " ".join(str(getattr(error, "problem", None) or error).split())
    return where + (problem if len(problem) <= 120 else problem[:117] + "...")


def _header_extras(text: str, where: str) -> dict[str, Any]:
    """The '# meshplan: {...}' header's options, checked for size; the Plan checks their names and types."""
    for line in text.splitlines():
        if line.startswith(HEADER):
            header = f"{where}: the '{HEADER.strip()}' line"
            extras = _load_json(line[len(HEADER):], header)
            if not isinstance(extras, dict):
                raise PlanError(f"{header} must hold a JSON object.")
            return extras
    return {}


def _description(text: str) -> str:
    lines = []
    for line in text.splitlines():
        if not line.startswith("#") or line.startswith(HEADER):
            break
        lines.append(line.lstrip("#").strip())
    return "\n".join(lines).strip()


# --- Reading untrusted files: bounded before anything is converted, shown or trusted. ---

# Longest number accepted (in characters): far above any real setting, far below the cost of
# converting a huge integer (Python refuses those past 4,300 digits with a ValueError).
_MAX_NUMBER_LENGTH = 100


class _Refused(Exception):
    """A limit passed while parsing; turned into a PlanError that names the file."""


def read_untrusted_text(path: Path, where: str, missing: str) -> str:
    """The UTF-8 text of a recipe-like file that anyone may have written; a PlanError otherwise.

    Only a regular file is read (a FIFO or device is refused without blocking: it is opened
    non-blocking and checked before any read), and at most MAX_FILE_BYTES of it.

    Args:
        path: the file.
        where: how messages name it, e.g. "recipe 'r.yaml'".
        missing: the whole message when there is no such file.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise PlanError(missing) from None
    except (OSError, ValueError) as error:  # ValueError: a NUL in the name
        raise PlanError(f"{where} cannot be opened: {_reason(error)}.") from None
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise PlanError(f"{where} is not a regular file (a directory, pipe or device); give a file.")
        if status.st_size > MAX_FILE_BYTES:
            raise PlanError(f"{where} is {status.st_size} bytes; the limit is {MAX_FILE_BYTES} bytes.")
        data = _read_at_most(descriptor, MAX_FILE_BYTES + 1)  # one byte more tells a file that grew
    except OSError as error:
        raise PlanError(f"{where} cannot be read: {_reason(error)}.") from None
    finally:
        os.close(descriptor)
    if len(data) > MAX_FILE_BYTES:
        raise PlanError(f"{where} is more than {MAX_FILE_BYTES} bytes; the limit is {MAX_FILE_BYTES} bytes.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PlanError(f"{where} is not UTF-8 text: byte {error.start} is {data[error.start]:#04x}.") from None


def _read_at_most(descriptor: int, limit: int) -> bytes:
    chunks, size = [], 0
    while size < limit:
        chunk = os.read(descriptor, limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _reason(error: Exception) -> str:
    return getattr(error, "strerror", None) or " ".join(str(error).split())[:120]


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader that stops composing past MAX_VALUES nodes or MAX_DEPTH levels.

    The pure-Python composer is stopped early, so a crafted file costs at most that many nodes of
    parsing; aliases are counted once here and at every use by _check_size afterwards.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._nodes = 0
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._nodes += 1
        self._depth += 1
        try:
            if self._nodes > MAX_VALUES:
                raise _Refused(f"holds more than {MAX_VALUES} YAML values; a recipe holds a few dozen.")
            if self._depth > MAX_DEPTH:
                raise _Refused(f"nests deeper than {MAX_DEPTH} levels.")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def flatten_mapping(self, node: Any) -> None:
        # A merge key ("<<: [*a, *a, ...]") copies every pair of every mapping it names: with
        # 10,000 nodes that is 10^7 pairs, seconds of work from a small file. Accelerate never
        # writes one, so it is refused rather than bounded.
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise _Refused(f"uses a YAML merge key ('<<') at line {key_node.start_mark.line + 1}, which meshplan "
                               f"does not read; write the keys out.")
        super().flatten_mapping(node)

    def construct_yaml_int(self, node: Any) -> int:
        _check_number_length(self.construct_scalar(node))
        return super().construct_yaml_int(node)


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)


def _load_yaml(text: str, where: str) -> Any:
    """The YAML document in ``text``, checked by _check_size; a one-line PlanError otherwise."""
    loader = _BoundedLoader(text)
    try:
        value = loader.get_single_data()
    except _Refused as error:
        raise PlanError(f"{where} {error}") from None
    except yaml.YAMLError as error:
        raise PlanError(f"{where} is not valid YAML: {_yaml_problem(error)}.") from None
    except RecursionError:
        raise PlanError(f"{where} nests deeper than {MAX_DEPTH} levels.") from None
    except (ValueError, OverflowError) as error:  # a scalar YAML resolves but cannot convert, e.g. a date
        raise PlanError(f"{where} holds a value YAML cannot convert: {_reason(error)}.") from None
    finally:
        loader.dispose()
    _check_size(value, where)
    return value


def _load_json(text: str, where: str) -> Any:
    """The JSON value in ``text``, without NaN, infinities or huge numbers, checked by _check_size."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_int=_json_int, parse_float=_json_float)
    except _Refused as error:
        raise PlanError(f"{where} {error}") from None
    except RecursionError:
        raise PlanError(f"{where} nests deeper than {MAX_DEPTH} levels.") from None
    except ValueError as error:  # json.JSONDecodeError: its message holds a position, never the text
        raise PlanError(f"{where} is not valid JSON: {_reason(error)}") from None
    _check_size(value, where)
    return value


def _refuse_constant(name: str) -> Any:
    raise _Refused(f"holds {name}, which is no number meshplan accepts (JSON has no NaN or Infinity).")


def _json_int(text: str) -> int:
    _check_number_length(text)
    return int(text)


def _json_float(text: str) -> float:
    _check_number_length(text)
    number = float(text)
    if not math.isfinite(number):
        raise _Refused(f"holds the number {shown(text)}, too large for a float.")
    return number


def _check_number_length(text: str) -> None:
    if len(text) > _MAX_NUMBER_LENGTH:
        raise _Refused(f"holds a number {len(text)} characters long; the limit is {_MAX_NUMBER_LENGTH}.")


def _check_size(value: Any, where: str) -> None:
    """Refuses a value that nests deeper than MAX_DEPTH or holds more than MAX_VALUES values.

    Every use of a shared (aliased) container counts again, as converting or printing it would
    expand it; the walk stops as soon as a limit is passed, so its cost is bounded too.
    """
    pending = [(value, 1)]
    seen = 0
    while pending:
        item, depth = pending.pop()
        seen += 1
        if depth > MAX_DEPTH:
            raise PlanError(f"{where} nests deeper than {MAX_DEPTH} levels.")
        if isinstance(item, dict):
            size = 2 * len(item)
        elif isinstance(item, (list, tuple, set, frozenset)):
            size = len(item)
        else:
            continue
        # Everything pending is counted once it is visited: refuse now rather than walk to the limit.
        if seen + len(pending) + size > MAX_VALUES:
            raise PlanError(f"{where} holds more than {MAX_VALUES} values (each use of a YAML alias counts); "
                            f"a recipe holds a few dozen.")
        children = [part for pair in item.items() for part in pair] if isinstance(item, dict) else item
        pending.extend((child, depth + 1) for child in children)


def catalogue() -> dict[str, Recipe]:
    """The recipes shipped in CATALOGUE_DIR (the repository's recipes/), by file name."""
    return {name: read_recipe(CATALOGUE_DIR / name) for name in catalogue_names()}
