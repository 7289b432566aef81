"""Plan <-> Accelerate config YAML: recipes that `accelerate launch --config_file` accepts unchanged.

A recipe is a plain Accelerate config. What Accelerate has keys for (processes, machines, ZeRO
stage and offload, TP size, precision, accumulation, clipping) is written in those keys;
meshplan's remaining options (DDP options, extra ZeRO settings, a TP plan) go in one header
comment, ``# meshplan: {...}``, which Accelerate ignores and meshplan reads back. Configs that
meshplan did not write are read too; anything it cannot honour is a PlanError naming the key.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from meshplan.errors import PlanError
from meshplan.plan import Plan

HEADER = "# meshplan: "
# The catalogue ships inside the package; the repository's recipes/ points here.
CATALOGUE_DIR = Path(__file__).resolve().parent / "catalogue"

# Accelerate's top-level keys that meshplan reads (the rest of a valid config must keep its
# default or be a launcher setting that does not change the layout).
_LAUNCH_KEYS = ("compute_environment", "num_processes", "num_machines", "machine_rank", "main_process_ip",
                "main_process_port", "rdzv_backend", "same_network", "main_training_function", "gpu_ids",
                "enable_cpu_affinity", "use_cpu", "debug", "downcast_bf16", "dynamo_config", "mpirun_config")
_LAYOUT_TYPES = {"MULTI_GPU": "ddp", "MULTI_CPU": "ddp", "NO": "ddp", "DEEPSPEED": "zero"}
_OFFLOAD_DEVICES = {"none": False, None: False, "cpu": True}
# deepspeed_config keys that only steer the launcher.
_DEEPSPEED_LAUNCH_KEYS = ("zero3_init_flag", "zero3_save_16bit_model", "deepspeed_multinode_launcher",
                          "deepspeed_hostfile", "deepspeed_inclusion_filter", "deepspeed_exclusion_filter")


@dataclass(frozen=True)
class Recipe:
    """A layout plus how many processes and machines the recipe asks for."""

    plan: Plan
    num_processes: int = 2
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
    lines = [f"# {line}" if line else "#" for line in description.strip().splitlines()]
    if extras:
        lines.append(HEADER + json.dumps(extras, sort_keys=True))
    path = Path(path)
    path.write_text("\n".join(lines) + ("\n" if lines else "") + yaml.safe_dump(config, sort_keys=False))
    return path


def read_recipe(path: str | os.PathLike) -> Recipe:
    """Reads an Accelerate config file (meshplan's or anyone's) into a Recipe.

    Raises:
        PlanError: the file is missing or not YAML, or asks for something meshplan cannot honour.
    """
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"recipe {str(path)!r} does not exist; `meshplan recipes` lists the catalogue.")
    text = path.read_text()
    try:
        config = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise PlanError(f"recipe {str(path)!r} is not valid YAML: {_yaml_problem(error)}.") from None
    if not isinstance(config, dict):
        raise PlanError(f"recipe {str(path)!r} is not an Accelerate config (a YAML mapping of keys).")
    extras = _header_extras(text, path)
    plan = plan_from_accelerate_config(config, extras, base_dir=path.parent)
    num_processes = _integer(config.get("num_processes", 1), "num_processes")
    num_machines = _integer(config.get("num_machines", 1), "num_machines")
    return Recipe(plan, num_processes if num_processes > 0 else 1, max(num_machines, 1), _description(text))


def plan_from_accelerate_config(config: Mapping[str, Any], extras: Mapping[str, Any] | None = None,
                                base_dir: Path | None = None) -> Plan:
    """The Plan an Accelerate config describes; ``extras`` are meshplan's header options."""
    extras = dict(extras or {})
    distributed_type = str(config.get("distributed_type", "NO"))
    parallelism = _mapping(config, "parallelism_config")
    deepspeed = _mapping(config, "deepspeed_config")
    if _mapping(config, "dynamo_config").get("dynamo_backend", "NO") not in ("NO", "no"):
        raise PlanError("recipe key dynamo_config.dynamo_backend is not honoured: meshplan does not compile models.")
    tp_size = _tp_size(parallelism)
    # A TP size, even 1, asks for the TP layout (Accelerate exports it whenever parallelism is on).
    tensor_parallel = any(key in parallelism for key in ("parallelism_config_tp_size", "tp_size")) or "tp_size" in extras
    _refuse_unsupported_sections(config)
    for key in config:
        if key not in _LAUNCH_KEYS and key not in ("distributed_type", "mixed_precision", "deepspeed_config",
                                                   "parallelism_config", "fsdp_config", "megatron_lm_config",
                                                   "fp8_config", "tpu_env", "tpu_vm", "commands", "command_file",
                                                   "tpu_name", "tpu_zone", "tpu_use_cluster", "tpu_use_sudo"):
            raise PlanError(f"recipe key {key!r} is not an Accelerate config key meshplan knows.")
    options = {name: extras.pop(name) for name in list(extras) if name not in ("tp_plan", "tp_size")}
    precision = config.get("mixed_precision")
    if precision not in (None, "no"):
        options["mixed_precision"] = precision
    if distributed_type not in _LAYOUT_TYPES:
        raise PlanError(
            f"recipe key distributed_type={distributed_type!r} is not a layout meshplan runs; valid values are "
            f"{', '.join(_LAYOUT_TYPES)} (with parallelism_config for tensor parallelism)."
        )
    if deepspeed and distributed_type != "DEEPSPEED":
        raise PlanError(f"recipe keys distributed_type={distributed_type!r} and deepspeed_config contradict: "
                        f"deepspeed_config only applies with distributed_type 'DEEPSPEED'.")
    if "tp_plan" in extras and not tensor_parallel:
        raise PlanError("recipe header option tp_plan contradicts the recipe's layout: it has no parallelism_config "
                        "tp size.")
    if tensor_parallel:
        if distributed_type == "DEEPSPEED":
            raise PlanError("recipe keys distributed_type='DEEPSPEED' and parallelism_config_tp_size contradict: "
                            "meshplan runs tensor parallelism with DTensor, not under DeepSpeed.")
        return Plan.build("tp", tp_size=extras.get("tp_size", tp_size), tp_plan=extras.get("tp_plan"), options=options)
    if distributed_type == "DEEPSPEED":
        return _zero_plan(deepspeed, options, base_dir)
    return Plan.build("ddp", options=options)


def started_by_a_launcher(environ: Mapping[str, str] | None = None) -> bool:
    """Whether a launcher (torchrun, ``accelerate launch``, DeepSpeed's) started this process."""
    environ = os.environ if environ is None else environ
    return "LOCAL_RANK" in environ or "ACCELERATE_USE_DEEPSPEED" in environ


def plan_from_environment(environ: Mapping[str, str] | None = None, extras: Mapping[str, Any] | None = None) -> Plan | None:
    """The Plan that ``accelerate launch`` passed to this process through its environment, or None.

    Accelerate passes its own keys as environment variables; ``extras`` are the recipe's
    meshplan header options, which only the recipe file holds (see launched_recipe_extras).
    """
    environ = os.environ if environ is None else environ
    if not started_by_a_launcher(environ):
        return None
    config: dict[str, Any] = {"distributed_type": "MULTI_GPU"}
    precision = environ.get("ACCELERATE_MIXED_PRECISION")
    if precision:
        config["mixed_precision"] = precision
    if environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        config["distributed_type"] = "DEEPSPEED"
        config["deepspeed_config"] = _deepspeed_config_from_environment(environ)
    if environ.get("ACCELERATE_USE_PARALLELISM_CONFIG", "false").lower() == "true":
        config["parallelism_config"] = {
            f"parallelism_config_{name.lower()}": environ[f"PARALLELISM_CONFIG_{name}"]
            for name in ("TP_SIZE", "DP_SHARD_SIZE", "CP_SIZE", "SP_SIZE")
            if f"PARALLELISM_CONFIG_{name}" in environ
        }
    return plan_from_accelerate_config(config, extras)


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
        path = Path(named)
        if not path.is_file():
            raise PlanError(f"{RECIPE_VARIABLE}={named!r} names no file; set it to the recipe given to accelerate launch.")
        return _header_extras(path.read_text(), path)
    found, path = _recipe_of_parent(parent_pid)
    if found:
        return _header_extras(path.read_text(), path) if path is not None else {}
    # `accelerate launch` exports these (ACCELERATE_DYNAMO_BACKEND on every path but DeepSpeed's
    # own launcher, which exports ACCELERATE_USE_DEEPSPEED); a user exporting a setting does not.
    if "ACCELERATE_DYNAMO_BACKEND" in environ or "ACCELERATE_USE_DEEPSPEED" in environ:
        raise PlanError(
            "meshplan.accelerator() cannot find the recipe `accelerate launch` started this process with (Accelerate "
            "does not pass the config file's path to its workers, and the launching command line cannot be read "
            "here), so meshplan options in its '# meshplan:' header would be lost. Launch with "
            f"{RECIPE_VARIABLE}=<recipe path> in the environment, or pass the recipe: "
            "meshplan.accelerator('recipes/zero3.yaml')."
        )
    return {}


def _recipe_of_parent(parent_pid: int | None) -> tuple[bool, Path | None]:
    """(found, recipe path) from the parent ``accelerate launch``; found is False when that cannot be told."""
    parent = Path(f"/proc/{parent_pid or os.getppid()}")
    try:
        arguments = (parent / "cmdline").read_bytes().decode().split("\0")
        cwd = (parent / "cwd").resolve()
    except OSError:
        return False, None
    launcher_names = ("accelerate", "accelerate-launch")
    if not any(Path(argument).name in launcher_names or "accelerate.commands" in argument for argument in arguments[:3]):
        return False, None
    for index, argument in enumerate(arguments):
        value = None
        if argument == "--config_file" and index + 1 < len(arguments):
            value = arguments[index + 1]
        elif argument.startswith("--config_file="):
            value = argument.split("=", 1)[1]
        if value:
            path = Path(value) if Path(value).is_absolute() else cwd / value
            return True, path if path.is_file() else None
    from accelerate.commands.config import default_config_file  # what `accelerate launch` reads without one

    return True, Path(default_config_file) if Path(default_config_file).is_file() else None


def _deepspeed_config_from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    names = {
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "zero_stage",
        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "offload_optimizer_device",
        "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "offload_param_device",
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "gradient_accumulation_steps",
        "ACCELERATE_GRADIENT_CLIPPING": "gradient_clipping",
        "ACCELERATE_DEEPSPEED_CONFIG_FILE": "deepspeed_config_file",
    }
    return {key: environ[variable] for variable, key in names.items() if variable in environ}


def _accelerate_config(plan: Plan, num_processes: int, num_machines: int) -> dict[str, Any]:
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        # MULTI_GPU makes `accelerate launch` start one worker per process through torchrun, on
        # GPUs and CPUs alike; meshplan.accelerator() picks the device and backend in the worker.
        "distributed_type": "DEEPSPEED" if plan.strategy == "zero" else "MULTI_GPU",
        "num_processes": num_processes,
        "num_machines": num_machines,
        "machine_rank": 0,
        "mixed_precision": plan.option("mixed_precision", "no"),
        "rdzv_backend": "static",
        "same_network": True,
        "main_training_function": "main",
        "use_cpu": False,
    }
    if plan.strategy == "zero":
        config["deepspeed_config"] = _deepspeed_section(plan)
        if num_machines > 1:
            # One launcher per machine (torchrun), like every other layout; DeepSpeed's default
            # multi-node launcher would instead ssh into a hostfile's machines with pdsh.
            config["deepspeed_config"]["deepspeed_multinode_launcher"] = "standard"
    if plan.strategy == "tp" and plan.tp_size is not None:
        config["parallelism_config"] = {"parallelism_config_tp_size": plan.tp_size}
    return config


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
    return plan.strategy == "zero" and option in ("gradient_accumulation_steps", "gradient_clipping")


def _zero_plan(section: Mapping[str, Any], options: dict[str, Any], base_dir: Path | None) -> Plan:
    section = dict(section)
    if section.get("deepspeed_config_file"):
        file_plan = plan_from_deepspeed_json(_resolve(section.pop("deepspeed_config_file"), base_dir))
        leftover = sorted(set(section) - set(_DEEPSPEED_LAUNCH_KEYS))
        if leftover:
            raise PlanError(f"recipe keys deepspeed_config.{leftover[0]} and deepspeed_config_file contradict: "
                            f"with a DeepSpeed config file, set {leftover[0]} in that file.")
        file_options = dict(file_plan.options)
        for name in set(file_options) & set(options):
            if file_options[name] != options[name]:
                raise PlanError(f"recipe key {name}={options[name]!r} contradicts {file_options[name]!r} in "
                                f"deepspeed_config_file; set it in one place.")
        return Plan.build("zero", zero_stage=file_plan.zero_stage, offload_optimizer=file_plan.offload_optimizer,
                          offload_parameters=file_plan.offload_parameters, options={**file_options, **options})
    for key in section:
        if key not in ("zero_stage", "offload_optimizer_device", "offload_param_device", "gradient_accumulation_steps",
                       "gradient_clipping", *_DEEPSPEED_LAUNCH_KEYS):
            raise PlanError(f"recipe key deepspeed_config.{key} is not one meshplan honours.")
    for name in ("gradient_accumulation_steps", "gradient_clipping"):
        if name in section and section[name] not in (None, "none", "auto"):
            options[name] = _number(section[name], f"deepspeed_config.{name}")
    return Plan.build(
        "zero", zero_stage=_integer(section.get("zero_stage", 2), "deepspeed_config.zero_stage"),
        offload_optimizer=_offload(section.get("offload_optimizer_device"), "offload_optimizer_device"),
        offload_parameters=_offload(section.get("offload_param_device"), "offload_param_device"),
        options=options,
    )


def plan_from_deepspeed_json(path: Path) -> Plan:
    """The ZeRO Plan of a DeepSpeed JSON config file; refuses sections meshplan cannot honour."""
    if not path.is_file():
        raise PlanError(f"recipe key deepspeed_config.deepspeed_config_file={str(path)!r} names no file.")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise PlanError(f"DeepSpeed config {str(path)!r} is not valid JSON: {error}") from None
    if not isinstance(config, dict) or not isinstance(config.get("zero_optimization", {}), dict):
        raise PlanError(f"DeepSpeed config {str(path)!r} must be a JSON object with a zero_optimization object.")
    # "auto" (the HF templates' placeholder) means: not set here.
    zero = {key: value for key, value in config.pop("zero_optimization", {}).items() if value != "auto"}
    options: dict[str, Any] = {}
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise PlanError(f"DeepSpeed config key {key!r} in {str(path)!r} is not honoured: meshplan steps the "
                            f"optimizer and scheduler your code builds. Remove {key!r}.")
    for key, value in config.items():
        if key in ("gradient_accumulation_steps", "gradient_clipping") and value != "auto":
            options[key] = value
        elif key in ("bf16", "fp16") and isinstance(value, dict) and value.get("enabled") is True:
            options["mixed_precision"] = key
        elif key not in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                         "gradient_clipping", "bf16", "fp16", "zero_allow_untested_optimizer",
                         "zero_force_ds_cpu_optimizer", "steps_per_print", "wall_clock_breakdown"):
            raise PlanError(f"DeepSpeed config key {key!r} in {str(path)!r} is not one meshplan honours.")
    offload_optimizer_section = zero.pop("offload_optimizer", None) or {}
    offload_param_section = zero.pop("offload_param", None) or {}
    offload_optimizer = _offload(offload_optimizer_section.get("device"), "offload_optimizer.device")
    pin_memory = offload_optimizer_section.get("pin_memory") or offload_param_section.get("pin_memory")
    stage = zero.pop("stage", 0)
    for key, value in zero.items():
        options[key] = value
    if pin_memory:
        options["pin_memory"] = True
    return Plan.build("zero", zero_stage=stage, offload_optimizer=offload_optimizer,
                      offload_parameters=_offload(offload_param_section.get("device"), "offload_param.device"),
                      options=options)


def _refuse_unsupported_sections(config: Mapping[str, Any]) -> None:
    for key in ("fsdp_config", "megatron_lm_config", "fp8_config"):
        if _mapping(config, key):
            raise PlanError(f"recipe key {key!r} asks for a layout meshplan does not run; use DDP, ZeRO or TP.")


def _tp_size(section: Mapping[str, Any]) -> int:
    for key, value in section.items():
        short = key.removeprefix("parallelism_config_")
        if short == "tp_size":
            continue
        if short in ("dp_replicate_size", "dp_shard_size", "cp_size", "sp_size") and int(value) > 1:
            raise PlanError(f"recipe key parallelism_config.{key}={value!r} is not honoured: meshplan's data-parallel "
                            f"dimension is the processes left over by tp_size.")
        if short not in ("dp_replicate_size", "dp_shard_size", "cp_size", "sp_size", "cp_backend", "sp_backend"):
            raise PlanError(f"recipe key parallelism_config.{key} is not one meshplan honours.")
    value = section.get("parallelism_config_tp_size", section.get("tp_size", 1))
    return _integer(value, "parallelism_config.parallelism_config_tp_size")


def _offload(device: Any, key: str) -> bool:
    if device not in _OFFLOAD_DEVICES:
        raise PlanError(f"recipe key {key}={device!r} is not honoured; valid devices are 'none' and 'cpu'.")
    return _OFFLOAD_DEVICES[device]


def _integer(value: Any, key: str) -> int:
    if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
        raise PlanError(f"recipe key {key}={value!r} must be an integer.")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise PlanError(f"recipe key {key}={value!r} must be an integer.") from None


def _mapping(config: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key) or {}
    if not isinstance(value, Mapping):
        raise PlanError(f"recipe key {key} must be a mapping of keys, not {type(value).__name__}.")
    return dict(value)


def _number(value: Any, key: str) -> int | float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise PlanError(f"recipe key {key}={value!r} must be a number.") from None
    return int(number) if number.is_integer() and "gradient_accumulation" in key else number


def _resolve(path: str, base_dir: Path | None) -> Path:
    candidate = Path(path)
    if not candidate.is_absolute() and base_dir is not None and not candidate.exists():
        candidate = base_dir / candidate
    return candidate


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(getattr(error, "problem", None) or error).split())


def _header_extras(text: str, path: Path) -> dict[str, Any]:
    for line in text.splitlines():
        if line.startswith(HEADER):
            try:
                extras = json.loads(line[len(HEADER):])
            except json.JSONDecodeError as error:
                raise PlanError(f"recipe {str(path)!r}: the '{HEADER.strip()}' line is not valid JSON: {error}") from None
            if not isinstance(extras, dict):
                raise PlanError(f"recipe {str(path)!r}: the '{HEADER.strip()}' line must hold a JSON object.")
            return extras
    return {}


def _description(text: str) -> str:
    lines = []
    for line in text.splitlines():
        if not line.startswith("#") or line.startswith(HEADER):
            break
        lines.append(line.lstrip("#").strip())
    return "\n".join(lines).strip()


def catalogue() -> dict[str, Recipe]:
    """The recipes shipped in recipes/, by file name."""
    return {path.name: read_recipe(path) for path in sorted(CATALOGUE_DIR.glob("*.yaml"))}
