"""A checkpoint of a model with peft adapters -> an adapter directory, or a whole model with the adapter merged in.

Such a checkpoint holds only what trained (the adapters, and whole copies of ``modules_to_save``
such as a classifier head) and, in its manifest's ``adapters`` entry, each adapter's peft config
and the key of each tensor in peft's adapter file (computed by peft at save time). The manifest
travels with the checkpoint and is not trusted: every value read here is checked first, and a
value that does not check out is a CheckpointError naming the entry.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from meshplan.checkpoint.sharded import CheckpointReader
from meshplan.checkpoint.tensor_files import TensorFileWriter
from meshplan.errors import CheckpointError, shown, shown_key, shown_path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# LoRA initialisations that leave the base weights as they are: any other (pissa, olora, loftq,
# eva, corda, ...) rewrites the base at initialisation, so merging onto the original base would be wrong.
_MERGEABLE_INITS = (True, False, "gaussian")
# The settings of plain LoRA, which --merge takes as they are (checked where they size a layer);
# any other LoraConfig field must have peft's default value.
_PLAIN_LORA_SETTINGS = frozenset({
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "use_rslora",
    "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
    "use_dora", "lora_bias", "ensure_weight_tying",
})
_SHOWN = 5


def adapter_of(reader: CheckpointReader, module: str, pretrained: dict[str, Any]) -> dict[str, Any] | None:
    """The checked ``peft_models`` entry of the adapter trained on the Hugging Face model ``pretrained`` of ``module``,
    or None when ``module`` was saved without adapters.

    Raises:
        CheckpointError: the module has adapters but not on that model (its weights are then not all stored), or it
            has several, or the entry's config or weights do not check out.
    """
    entry = reader.manifest["adapters"].get(module)
    if entry is None:
        return None
    where = f"checkpoint {shown_path(reader.path)}"
    found = [model for model in entry["peft_models"] if pretrained["prefix"].startswith(model["prefix"])]
    if not found:
        raise CheckpointError(f"{where}: {shown(module)} was saved with peft adapters, which store only the tensors that "
                              f"train, but none of them is on its Hugging Face model {shown(pretrained['prefix'])}: that "
                              f"model's weights are not all in the checkpoint, and it cannot be exported.")
    if len(found) > 1:
        names = ", ".join(shown(model["adapter"]) for model in found[:_SHOWN]) + (", ..." if len(found) > _SHOWN else "")
        raise CheckpointError(f"{where}: {shown(module)} holds {len(found)} adapters ({names}) on one model; meshplan "
                              f"exports a model with one adapter. Load the checkpoint into the peft model and save each "
                              f"adapter with peft's save_pretrained.")
    _check_adapter(reader, module, found[0])
    return found[0]


def _check_adapter(reader: CheckpointReader, module: str, adapter: dict[str, Any]) -> None:
    """The config's types that peft reads and the weights' names, beyond what read_manifest checked."""
    from peft import PeftType, TaskType

    where = f"checkpoint {shown_path(reader.path)}: manifest entry adapters[{shown(module)}]"
    config = adapter["config"]
    if config["peft_type"] not in {kind.value for kind in PeftType}:
        raise CheckpointError(f"{where}: peft_type {shown(config['peft_type'])} is no peft method this peft knows.")
    task = config.get("task_type")
    if task is not None and (not isinstance(task, str) or task not in {kind.value for kind in TaskType}):
        raise CheckpointError(f"{where}: task_type {shown(config['task_type'])} is none of peft's task types.")
    if config.get("base_model_name_or_path") is not None and not isinstance(config["base_model_name_or_path"], str):
        raise CheckpointError(f"{where}: base_model_name_or_path is {shown(config['base_model_name_or_path'])}, not a path.")
    if not adapter["weights"]:
        raise CheckpointError(f"{where} lists no adapter weights.")
    inside = f"{module}/{adapter['prefix']}"
    for file_key, key in adapter["weights"].items():
        # "__metadata__" is the safetensors header's own entry: a tensor of that name would break the file.
        if not file_key or file_key == "__metadata__":
            raise CheckpointError(f"{where}: {shown_key(file_key)} cannot name a tensor in an adapter file.")
        if not key.startswith(inside):
            raise CheckpointError(f"{where}: weights[{shown_key(file_key)}] names {shown_key(key)}, not a tensor of the "
                                  f"model {shown(module)} (its keys start with {shown(inside)}).")


def write_adapter(reader: CheckpointReader, adapter: dict[str, Any], base: str | os.PathLike | None, folder: Path) -> None:
    """adapter_config.json and adapter_model.safetensors into ``folder``, one tensor in memory at a time.

    ``PeftModel.from_pretrained(base_model, folder)`` loads it; ``base`` (when given) is written as
    the config's ``base_model_name_or_path``, which AutoPeftModel classes load the base from.
    """
    # auto_mapping names the class AutoPeftModel imports: nothing a checkpoint should choose.
    config = {key: value for key, value in adapter["config"].items() if key != "auto_mapping"}
    if base is not None:
        config["base_model_name_or_path"] = str(base)
    weights = sorted(adapter["weights"].items())
    writer = TensorFileWriter(folder / ADAPTER_WEIGHTS, [(name, reader.shape(key), reader.dtype(key)) for name, key in weights])
    for name, key in weights:
        writer.write(name, reader.tensor(key))
    writer.close()
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))


def write_merged(reader: CheckpointReader, adapter: dict[str, Any], pretrained: dict[str, Any], base: str | os.PathLike | None,
                 folder: Path, max_shard_size: int) -> None:
    """The base model with the adapter merged into its weights, as a ``from_pretrained`` directory in ``folder``.

    The base is read from ``base`` (or the adapter config's ``base_model_name_or_path`` when that is a
    local directory) as the class the manifest names, a transformers PreTrainedModel only, with the
    base's own config and the trained model's labels, from safetensors files only and without remote
    code; peft loads the adapter onto it and merges it. The base's tokenizer, if it has one, is copied.
    """
    _check_mergeable(reader, adapter)
    model_class = _pretrained_class(reader, pretrained)
    base_dir = _base_dir(adapter, base)
    with tempfile.TemporaryDirectory(prefix="meshplan-adapter-") as staged, _quiet_transformers():
        write_adapter(reader, adapter, base_dir, Path(staged))
        merged = _load_and_merge(model_class, pretrained, base_dir, Path(staged), reader, adapter)
        merged.save_pretrained(str(folder), safe_serialization=True, max_shard_size=max_shard_size)
    if (base_dir / "tokenizer_config.json").is_file():  # the base's tokenizer, so the folder is a whole model
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True, trust_remote_code=False).save_pretrained(str(folder))


def _check_mergeable(reader: CheckpointReader, adapter: dict[str, Any]) -> None:
    """Only plain LoRA onto an unchanged base merges: refused otherwise, naming the setting.

    Merging builds the adapter's layers in this process before their weights are read, so the
    settings that size them are bounded by the weights the checkpoint holds: a rank no larger than
    the rows of its largest trained tensor. Every setting beyond plain LoRA (and its rank, alpha,
    targets, dropout, bias, rsLoRA, DoRA and head copies) must be peft's default: other variants
    initialise from data, import modules or rewrite the base.
    """
    from peft import LoraConfig

    where = f"checkpoint {shown_path(reader.path)}: the adapter {shown(adapter['adapter'])}"
    config = adapter["config"]
    if config["peft_type"] != "LORA":
        raise CheckpointError(f"{where} is {shown(config['peft_type'])}, and --merge merges LoRA adapters only; export "
                              f"the adapter (without --merge) and merge it with peft.")
    init = config.get("init_lora_weights", True)
    if not any(init is value or init == value and isinstance(value, str) for value in _MERGEABLE_INITS):
        raise CheckpointError(f"{where} was initialised with init_lora_weights={shown(init)}, which changes the base "
                              f"weights as well; merging it onto the original base would give another model.")
    defaults = json.loads(json.dumps(LoraConfig().to_dict(), default=str))
    for setting, value in config.items():
        if setting not in _PLAIN_LORA_SETTINGS and setting in defaults and value != defaults[setting]:
            raise CheckpointError(f"{where} sets {setting}={shown(value)}; --merge merges plain LoRA only: export the "
                                  f"adapter (without --merge) and merge it with peft.")
    _check_plain_settings(where, config)
    rows = max((reader.shape(key)[0] for key in adapter["weights"].values() if reader.shape(key)), default=0)
    pattern = config.get("rank_pattern") or {}
    ranks = [config.get("r"), *pattern.values()] if isinstance(pattern, dict) else [None]
    if not all(type(rank) is int and 1 <= rank <= rows for rank in ranks):
        raise CheckpointError(f"{where} has the ranks r={shown(config.get('r'))}, rank_pattern="
                              f"{shown(config.get('rank_pattern'))}: each must be a whole number from 1 to the rows of "
                              f"its largest trained tensor ({rows}).")


def _check_plain_settings(where: str, config: dict[str, Any]) -> None:
    """The plain-LoRA settings peft reads when it builds the adapter, checked by type before it sees them; the
    names it matches as regular expressions must compile."""
    def refuse(setting: str) -> CheckpointError:
        return CheckpointError(f"{where} has {setting}={shown(config.get(setting))}, not a value peft's LoraConfig takes.")

    for setting in ("target_modules", "exclude_modules", "modules_to_save"):
        value = config.get(setting)
        names = [value] if isinstance(value, str) else value
        if value is not None and not (isinstance(names, list) and all(isinstance(name, str) for name in names)):
            raise refuse(setting)
    patterns = [config.get("target_modules")] if isinstance(config.get("target_modules"), str) else []
    for setting in ("rank_pattern", "alpha_pattern"):
        value = config.get(setting) or {}
        if not (isinstance(value, dict) and all(type(number) in (int, float) for number in value.values())):
            raise refuse(setting)
        patterns += list(value)
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error:
            raise refuse("target_modules" if pattern == config.get("target_modules") else "rank_pattern") from None
    if not (type(config.get("lora_alpha", 8)) in (int, float) and type(config.get("lora_dropout", 0.0)) in (int, float)):
        raise refuse("lora_alpha")
    for setting in ("fan_in_fan_out", "use_rslora", "use_dora", "lora_bias", "inference_mode"):
        if not isinstance(config.get(setting, False), bool):
            raise refuse(setting)


def _pretrained_class(reader: CheckpointReader, pretrained: dict[str, Any]) -> type:
    """The transformers class the manifest names: looked up in transformers by name, and only a PreTrainedModel."""
    import transformers

    name = pretrained["class"]
    found = getattr(transformers, name, None) if name.isidentifier() and not name.startswith("_") else None
    if not (isinstance(found, type) and issubclass(found, transformers.PreTrainedModel)
            and isinstance(found.config_class, type) and issubclass(found.config_class, transformers.PretrainedConfig)):
        raise CheckpointError(f"checkpoint {shown_path(reader.path)}: the model class {shown(name)} is no transformers "
                              f"PreTrainedModel; --merge builds only those.")
    return found


def _base_dir(adapter: dict[str, Any], base: str | os.PathLike | None) -> Path:
    """The local directory to read the base model from: ``base``, else the adapter config's base when that is one."""
    if base is not None:
        if not Path(base).is_dir():
            raise CheckpointError(f"--base {shown(str(base))} is not a directory; give the local model directory the "
                                  f"adapter was trained on.")
        return Path(base)
    recorded = adapter["config"].get("base_model_name_or_path")
    if isinstance(recorded, str) and recorded and Path(recorded).is_dir():
        return Path(recorded)
    raise CheckpointError(f"the adapter was trained on {shown(recorded)}, which is not a local directory here; --merge "
                          f"needs the base model: pass --base DIR (base=DIR), the model directory it was trained on.")


def _load_and_merge(model_class: type, pretrained: dict[str, Any], base_dir: Path, adapter_dir: Path,
                    reader: CheckpointReader, adapter: dict[str, Any]) -> Any:
    """The base model with the adapter in ``adapter_dir`` loaded and merged; a CheckpointError if they do not fit."""
    from peft import PeftModel

    try:
        config = _merged_config(model_class, pretrained, base_dir, reader, adapter)
        model = model_class.from_pretrained(str(base_dir), config=config, use_safetensors=True, trust_remote_code=False,
                                            local_files_only=True)
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
        _check_all_loaded(reader, adapter, peft_model)
        return peft_model.merge_and_unload()
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError, re.error) as error:
        if isinstance(error, CheckpointError):
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"the base model in {shown(str(base_dir))} does not take this checkpoint's adapter as a "
                              f"{model_class.__name__}: {shown(first)}. Pass --base with the model it was trained on.") from None


def _check_all_loaded(reader: CheckpointReader, adapter: dict[str, Any], peft_model: Any) -> None:
    """A CheckpointError unless the checkpoint gave every tensor of the adapter peft built (peft only warns
    about a missing one, and would merge a layer without it, or keep a head copy's random weights)."""
    from meshplan._compat.peft import adapter_state_dict

    expected = set(adapter_state_dict(peft_model, dict(peft_model.state_dict()), "default"))
    missing = sorted(expected - set(adapter["weights"]))
    if missing:
        raise CheckpointError(f"checkpoint {shown_path(reader.path)}: the adapter lacks {len(missing)} of its tensors "
                              f"({', '.join(shown_key(key) for key in missing[:_SHOWN])}); nothing was merged.")


@contextlib.contextmanager
def _quiet_transformers() -> Any:
    """transformers' progress bars and reports off: a "Loading weights" or "Writing model shards" bar, or the report
    of the head the base lacks (the adapter brings it), on stderr would come before export's one-line answer."""
    from transformers.utils import logging

    verbosity, shows_bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if shows_bars:
            logging.enable_progress_bar()


def _merged_config(model_class: type, pretrained: dict[str, Any], base_dir: Path, reader: CheckpointReader,
                   adapter: dict[str, Any]) -> Any:
    """The base's own config with the trained model's labels: the architecture comes from the base directory the user
    gave, never from the manifest (whose sizes could make the model as large as it pleases).

    The number of labels is bounded by the data behind it: no more than the rows of the largest trained tensor
    (a classifier head trains whole, so its copy has a row per label).
    """
    trained = pretrained["config"]
    labels: dict[str, Any] = {}
    id2label = trained.get("id2label")
    if id2label is not None:
        if not (isinstance(id2label, dict) and all(isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 10
                                                   and isinstance(name, str) for key, name in id2label.items())):
            raise CheckpointError(f"checkpoint {shown_path(reader.path)}: the model's id2label is {shown(id2label)}, not "
                                  f"label numbers and names.")
        rows = max((reader.shape(key)[0] for key in adapter["weights"].values() if reader.shape(key)), default=0)
        if len(id2label) > rows:
            raise CheckpointError(f"checkpoint {shown_path(reader.path)}: the model's config names {len(id2label)} labels, "
                                  f"more than any trained tensor has rows ({rows}).")
        labels["id2label"] = {int(key): name for key, name in id2label.items()}
        labels["label2id"] = {name: number for number, name in labels["id2label"].items()}
    if trained.get("problem_type") in ("regression", "single_label_classification", "multi_label_classification"):
        labels["problem_type"] = trained["problem_type"]
    return model_class.config_class.from_pretrained(str(base_dir), local_files_only=True, **labels)
