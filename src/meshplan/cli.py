"""The ``meshplan`` command."""

from __future__ import annotations

import argparse
import os
import contextlib
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from meshplan.errors import shown
from meshplan.finetune.defaults import LEARNING_RATE, LORA_ALPHA, LORA_LEARNING_RATE, LORA_R, LORA_TARGETS
from meshplan.finetune.output import LOG_NAME

if TYPE_CHECKING:
    from meshplan.finetune.job import FinetuneJob


def _list_strategies(args: argparse.Namespace) -> int:
    from meshplan.lightning import REGISTERED_STRATEGIES

    width = max(len(name) for name in REGISTERED_STRATEGIES)
    for name, (_, _, description) in REGISTERED_STRATEGIES.items():
        print(f"{name:<{width}}  {description}")
    return 0


def _list_recipes(args: argparse.Namespace) -> int:
    from meshplan.recipes import CATALOGUE_DIR, catalogue

    if args.path is not None:
        return _print_recipe_path(args.path)
    recipes = catalogue()
    width = max(len(name) for name in recipes) - len(".yaml")
    for file_name, recipe in recipes.items():
        name = file_name.removesuffix(".yaml")
        purpose = recipe.description.splitlines()[0].split(":", 1)[-1].strip() if recipe.description else ""
        print(f"{name:<{width}}  {purpose}\n{'':<{width}}  {CATALOGUE_DIR / file_name}")
    # What a newcomer hits first on a laptop: Accelerate ignores the launcher's processes on CPU.
    print("\nEvery name works where a recipe file does: meshplan.from_recipe(\"zero3\"), "
          "meshplan.accelerator(\"zero3\"), meshplan finetune --recipe zero3.\n"
          "Launch with `accelerate launch --config_file \"$(meshplan recipes --path NAME)\" train.py`, where train.py "
          "creates meshplan.accelerator();\na plain Accelerator() on a machine without GPUs trains each process alone "
          "(\"rank 0 of 1\"), and Accelerator(cpu=True) fixes that for ddp recipes only: it drops ZeRO and TP.")
    return 0


def _recipe_file(name: str | os.PathLike) -> str:
    """The recipe file a name means, absolute when it exists, so that every worker reads that same file
    (whatever folders the run creates, its --output included, named like a recipe)."""
    from meshplan.recipes import find_recipe

    path = find_recipe(name)
    return os.path.abspath(path) if os.path.lexists(path) else str(path)


def _finetune_recipe(name: str | None) -> str:
    """--recipe as the job holds it: "auto" as it is (meshplan chooses the layout), else the recipe file it names (default zero2)."""
    from meshplan.auto import AUTO
    from meshplan.finetune.job import DEFAULT_RECIPE

    return AUTO if name == AUTO else _recipe_file(name or DEFAULT_RECIPE)


def _print_recipe_path(name: str) -> int:
    """Prints the absolute path of the recipe ``name`` means (a file here, else a catalogue name); 2 when none."""
    from meshplan.recipes import catalogue_listing

    path = _recipe_file(name)
    if not os.path.lexists(path):
        return _refuse("meshplan recipes", f"--path {shown(name)}: there is no such file, and it is no catalogue name; "
                                           f"the catalogue holds {catalogue_listing()}.")
    if os.path.isdir(path):  # a folder named like no recipe: accelerate launch would fail on it later, less clearly
        return _refuse("meshplan recipes", f"--path {shown(name)}: {shown(path)} is a directory, not a recipe file, "
                                           f"and it is no catalogue name; the catalogue holds {catalogue_listing()}.")
    print(path)
    return 0


def _finetune(args: argparse.Namespace) -> int:
    import json

    from meshplan.checkpoint import CheckpointError
    from meshplan.errors import PlanError
    from meshplan.finetune.errors import FinetuneError
    from meshplan.finetune.output import JOB_FILE, check_output

    try:
        # First: whether the run may write there at all, before any data is loaded.
        output = check_output(args.output, overwrite=args.overwrite)
    except FinetuneError as error:
        return _refuse("meshplan finetune", error)

    import datasets

    from meshplan.auto import announcement
    from meshplan.finetune.job import FinetuneJob, check_job, default_devices, default_model, with_chosen_layout

    datasets.disable_progress_bars()  # the checks below load the data; errors must stay one paragraph
    try:
        job = FinetuneJob(
            model=args.model or default_model(), data=args.data or "reviews", recipe=_finetune_recipe(args.recipe),
            framework=args.framework, devices=args.devices if args.devices is not None else default_devices(),
            max_steps=args.max_steps, output=str(output),
            checkpoint_every=_checkpoint_every(args), max_restarts=args.max_restarts,
            learning_rate=LORA_LEARNING_RATE if args.lora else LEARNING_RATE, **_lora_options(args),
        )
        job = with_chosen_layout(job)  # --recipe auto: chosen here, once; every worker runs the job's layout
        check_job(job)
        job_path = Path(job.output) / JOB_FILE
        Path(job.output).mkdir(parents=True, exist_ok=True)
        job.to_json(job_path)
    except (PlanError, FinetuneError, CheckpointError) as error:
        return _refuse("meshplan finetune", error)
    except OSError as error:
        return _refuse("meshplan finetune", f"--output {shown(args.output)} cannot be written: {_os_reason(error)}.")
    threads = max(1, (os.cpu_count() or 1) // job.devices)
    lora = f", LoRA r={job.lora_r} alpha={job.lora_alpha} on {job.lora_targets}" if job.lora else ""
    print(f"meshplan finetune: {Path(job.model).name} on {job.data} with {Path(job.recipe).name}, "
          f"{job.framework}, {job.devices} processes, {job.max_steps} steps{lora}", flush=True)
    if job.layout is not None:
        print(announcement(job.layout), flush=True)
    code, log = _run_finetune_workers(job, job_path, threads, args.verbose)
    if code == 130:
        print("meshplan finetune: interrupted; every worker was stopped.", file=sys.stderr)
        return code
    if code != 0:
        if log is None:
            print(f"meshplan finetune: a worker failed (exit code {code}); see its output above.", file=sys.stderr)
        else:
            print(f"meshplan finetune: a worker failed (exit code {code}); from the log ({log}):\n"
                  f"{_failure_excerpt(log)}", file=sys.stderr)
        return code
    if job.lora:
        code = _merge_adapter(job, log)
        if code:
            return code
    metrics = json.loads((Path(job.output) / "metrics.json").read_text())
    print(f"held-out accuracy: before {metrics['eval_accuracy_before']:.3f}, after {metrics['eval_accuracy_after']:.3f}; "
          f"{metrics['train_steps']} steps in {metrics['train_seconds']:.0f} s, {metrics['samples_per_second']:.1f} "
          f"samples/s; model saved in {job.output}")
    if metrics.get("lora"):
        lora = metrics["lora"]
        print(f"LoRA adapter ({lora['trainable_parameters']:,} trained parameters, {lora['adapter_bytes'] / 2**20:.2f} MiB) "
              f"saved in {lora['adapter']}; the model in {job.output} has it merged")
    return 0


def _merge_adapter(job: FinetuneJob, log: Path | None) -> int:
    """After a LoRA run: the base with the adapter merged, into OUTPUT (in this process: the workers are done).

    What the libraries print meanwhile (DeepSpeed's start-up line, transformers' report of the
    new head the adapter's copy replaces) goes to the log, as the workers' output does; 1 if the merge fails.
    """
    from meshplan.finetune.save import ADAPTER_DIR, merge_adapter

    print(f"meshplan finetune: merging the adapter into the model in {job.output}", flush=True)
    try:
        with _output_to(log):
            merge_adapter(job)
    except (OSError, ValueError, RuntimeError) as error:
        print(f"meshplan finetune: merging the adapter failed ({type(error).__name__}: {error}); the adapter is in "
              f"{Path(job.output) / ADAPTER_DIR}.", file=sys.stderr)
        return 1
    return 0


@contextlib.contextmanager
def _output_to(log: Path | None) -> Iterator[None]:
    """This process's stdout and stderr (file descriptors 1 and 2, so C libraries' output too) appended to ``log``
    meanwhile; unchanged when ``log`` is None (--verbose)."""
    if log is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(log, "a") as file:
            os.dup2(file.fileno(), 1)
            os.dup2(file.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        os.close(saved[0])
        os.close(saved[1])


def _run_finetune_workers(job: FinetuneJob, job_path: Path, threads: int, verbose: bool) -> tuple[int, Path | None]:
    """Runs the workers under one progress bar; their own output goes to a log file unless ``verbose``."""
    from meshplan.finetune.progress import PROGRESS_FD, ProgressDisplay
    from meshplan.launch import run_workers

    command = [sys.executable, "-m", "meshplan.finetune.worker", str(job_path)]
    quiet = {"TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    log = None if verbose else Path(job.output) / LOG_NAME
    with ProgressDisplay(job.max_steps) as display, (open(log, "a") if log else contextlib.nullcontext()) as output:
        if log is not None:
            display.say(f"meshplan finetune: the workers' own output goes to {log} (--verbose shows it here)")
        code = run_workers(command, job.devices, threads=threads, env={**quiet, PROGRESS_FD: str(display.descriptor)},
                           max_restarts=job.max_restarts, output=output, pass_fds=(display.descriptor,), say=display.say)
    return code, log


def _failure_excerpt(log: Path, lines: int = 40) -> str:
    """What the last attempt logged about its failure, indented: its first traceback, else its last lines.

    The traceback is the first one of the attempt (the rank that failed first; the others usually
    follow with connection errors), through its exception line, without the "[worker N] " and
    "[rankN]: " prefixes of the launcher and of torch.
    """
    from meshplan.launch import ATTEMPT_MARK

    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    start = text.rfind(ATTEMPT_MARK)
    attempt = text[start:].splitlines()[1:] if start >= 0 else text.splitlines()
    first = next((index for index, line in enumerate(attempt) if _TRACEBACK.match(line)), None)
    if first is None:
        excerpt = attempt[-lines:]
    else:
        prefix = _TRACEBACK.match(attempt[first]).group(1)
        block = [line.removeprefix(prefix) for line in attempt[first:] if line.startswith(prefix)]
        # The exception line is the first one after the header that is not indented.
        end = next((index for index, line in enumerate(block[1:], 1) if line and not line[0].isspace()), len(block) - 1)
        block = block[:end + 1]
        excerpt = block if len(block) <= lines else [*block[:5], "    ...", *block[-(lines - 6):]]
    return "\n".join("    " + line for line in excerpt)


# A traceback's first line, after the launcher's "[worker N] " and the "[rankN]: " torch's excepthook
# adds once a process group exists; the lines with the same prefix are that worker's traceback.
_TRACEBACK = re.compile(r"((?:\[worker \d+\] )?(?:\[rank\d+\]: )?)Traceback \(most recent call last\)")


def _export(args: argparse.Namespace) -> int:
    from meshplan.checkpoint import CheckpointError, export
    from meshplan.errors import PlanError

    try:
        out = export(args.checkpoint, args.out_dir, model=args.model, max_shard_size=args.max_shard_size, merge=args.merge,
                     base=args.base)
    except (CheckpointError, PlanError) as error:
        return _refuse("meshplan export", error)
    except OSError as error:  # export removed what it had written
        return _refuse("meshplan export", f"{_os_reason(error)}; nothing was written to {shown(args.out_dir)}.")
    except KeyboardInterrupt:
        print("meshplan export: interrupted; nothing was written.", file=sys.stderr)
        return 130
    if (out / "adapter_config.json").is_file():
        print(f"meshplan export: wrote the adapter to {out} (load it with PeftModel.from_pretrained(base_model, "
              f"{str(out)!r}); --merge writes a whole model)")
    else:
        print(f"meshplan export: wrote {out} (load it with from_pretrained)")
    return 0


def _slurm(args: argparse.Namespace) -> int:
    from meshplan.errors import PlanError
    from meshplan.slurm import SlurmJob, sbatch_script

    try:
        print(sbatch_script(SlurmJob(
            recipe=args.recipe, command=tuple(args.training_command), nodes=args.nodes, gpus_per_node=args.gpus_per_node,
            cpu_processes_per_node=args.cpu_processes_per_node, partition=args.partition, time=args.time,
            lightning=args.lightning, port=args.port, cpus_per_process=args.cpus_per_process,
        )), end="")
    except PlanError as error:
        return _refuse("meshplan slurm", error)
    return 0


def _training_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """``meshplan slurm ... -- train.py ARGS``: (the arguments before the first --, the training command after it).

    Split before argparse sees them, which would take the script's own options for meshplan's.
    """
    if argv[:1] == ["slurm"] and "--" in argv:
        split = argv.index("--")
        return argv[:split], argv[split + 1:]
    return argv, []


def _refuse(command: str, error: Exception | str) -> int:
    """Prints ``error`` as one line on stderr (any line breaks in it joined) and returns exit code 2."""
    message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    print(f"{command}: {message}", file=sys.stderr)
    return 2


def _os_reason(error: OSError) -> str:
    """An OSError in a few words: what failed and on which file (names cut short)."""
    reason = error.strerror or type(error).__name__
    return f"{reason} ({shown(str(error.filename))})" if error.filename is not None else reason


def _lora_options(args: argparse.Namespace) -> dict[str, object]:
    """The job's LoRA fields from --lora and its options (defaults for those not given); an option without --lora is an error."""
    from meshplan.finetune.errors import FinetuneError

    options = {"lora_r": (args.lora_r, LORA_R), "lora_alpha": (args.lora_alpha, LORA_ALPHA),
               "lora_targets": (args.lora_targets, LORA_TARGETS)}
    given = [name for name, (value, _) in options.items() if value is not None]
    if given and not args.lora:
        flag = "--" + given[0].replace("_", "-")
        raise FinetuneError(f"{flag} sets up LoRA adapters and needs --lora; without it every weight trains.")
    return {"lora": args.lora, **{name: default if value is None else value for name, (value, default) in options.items()}}


def _checkpoint_every(args: argparse.Namespace) -> int:
    """--checkpoint-every as given; with --max-restarts and no --checkpoint-every, every 10 steps."""
    if args.checkpoint_every is not None:
        return args.checkpoint_every
    return DEFAULT_CHECKPOINT_EVERY if args.max_restarts else 0


DEFAULT_CHECKPOINT_EVERY = 10


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``meshplan`` command and its subcommands."""
    parser = argparse.ArgumentParser(prog="meshplan", description="One parallel layout for Lightning, Accelerate and the HF Trainer.")
    commands = parser.add_subparsers(dest="command", required=True)
    strategies = commands.add_parser("strategies", help="list the strategy names registered with Lightning")
    strategies.set_defaults(run=_list_strategies)
    recipes = commands.add_parser(
        "recipes", help="list the recipes (Accelerate config files) meshplan ships, with their paths",
        description="List the shipped recipes: each name, what it is for, and its file. A name works wherever a recipe "
                    "file does (meshplan.from_recipe, meshplan.accelerator, finetune --recipe, and as a bare name in "
                    "$MESHPLAN_RECIPE); accelerate launch needs the path, which --path prints.")
    recipes.add_argument("--path", metavar="NAME", help="print only the absolute path of recipe NAME, for "
                         "`accelerate launch --config_file \"$(meshplan recipes --path zero3)\"` (a file of that "
                         "name here comes first)")
    recipes.set_defaults(run=_list_recipes)
    finetune = commands.add_parser("finetune", help="fine-tune a pretrained transformer under a recipe")
    finetune.add_argument("--recipe", help="a catalogue name (meshplan recipes), a recipe file, or auto: meshplan chooses "
                          "the layout from the model, --devices and the memory per process; default zero2")
    finetune.add_argument("--model", help="local Hugging Face model directory; default the packaged all-MiniLM-L6-v2")
    finetune.add_argument("--data", help="CSV/JSON file, saved data set or data set name; default the packaged reviews")
    finetune.add_argument("--framework", default="lightning", help="lightning, accelerate or trainer (default lightning)")
    finetune.add_argument("--devices", type=int, help="worker processes; default every GPU, or 2 without one")
    finetune.add_argument("--max-steps", type=int, default=100, help="optimizer steps (default 100)")
    finetune.add_argument("--output", default="meshplan-output", help="output directory: new, empty, or an earlier "
                          "run's output to go on from (default ./meshplan-output)")
    finetune.add_argument("--overwrite", action="store_true", help="write into a non-empty directory; meshplan still "
                          "deletes nothing it did not create")
    finetune.add_argument("--checkpoint-every", type=int, help="save a checkpoint every N steps in OUTPUT/checkpoints "
                          f"and resume from the latest one found there (default: never; {DEFAULT_CHECKPOINT_EVERY} with --max-restarts)")
    finetune.add_argument("--max-restarts", type=int, default=0, help="like torchrun's: when a worker dies, restart "
                          "every worker up to N times, resuming from the latest checkpoint (default 0)")
    finetune.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of every weight, with "
                          f"learning rate {LORA_LEARNING_RATE:g} instead of {LEARNING_RATE:g}; writes the adapter to "
                          "OUTPUT/adapter and the merged model to OUTPUT")
    finetune.add_argument("--lora-r", type=int, help=f"LoRA rank (default {LORA_R})")
    finetune.add_argument("--lora-alpha", type=int, help=f"LoRA alpha: the adapters' output is scaled by alpha/r "
                          f"(default {LORA_ALPHA})")
    finetune.add_argument("--lora-targets", help="the layers that get adapters: q, k, v, o, gate, "
                          f"up, down or the layers' own names, comma-separated (default {LORA_TARGETS})")
    finetune.add_argument("--verbose", action="store_true", help=f"show the workers' own output (the engines' "
                          f"messages) on the console instead of in OUTPUT/{LOG_NAME}")
    finetune.set_defaults(run=_finetune)
    export = commands.add_parser("export", help="turn a meshplan checkpoint into a Hugging Face model directory (or a "
                                 "peft adapter directory)")
    export.add_argument("checkpoint", help="a checkpoint directory written by any meshplan strategy (Lightning or Accelerate) "
                        "that holds a transformers PreTrainedModel")
    export.add_argument("out_dir", help="the model directory to create (must not exist, or be an empty directory; "
                        "missing parents are created)")
    export.add_argument("--model", help="the model's prefix, when the checkpoint holds several Hugging Face models")
    export.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 500MB (default 5GB)")
    export.add_argument("--merge", action="store_true", help="for a checkpoint of LoRA adapters (which holds only the "
                        "adapters): write the base model with the adapter merged in, instead of a peft adapter directory")
    export.add_argument("--base", metavar="DIR", help="the local model directory the adapters were trained on: --merge "
                        "reads the base from it (default: the adapter config's base_model_name_or_path, when that is a "
                        "local directory); without --merge it is recorded in adapter_config.json")
    export.set_defaults(run=_export)
    slurm = commands.add_parser(
        "slurm", help="print an sbatch script that runs a recipe on N nodes of a Slurm cluster",
        usage="meshplan slurm RECIPE --nodes N (--gpus-per-node G | --cpu-processes-per-node K) [options] -- train.py ARGS",
        description="Print an sbatch script (submit it with sbatch) that runs train.py ARGS under the recipe on N nodes. "
                    "By default each node runs `accelerate launch` with the recipe (one Slurm task per node, c10d "
                    "rendezvous at the first node; the script creates meshplan.accelerator()). With --lightning, srun "
                    "starts one task per process and Lightning's SLURMEnvironment takes the ranks from Slurm; the "
                    "Trainer must then say num_nodes=N and devices=G (or K).")
    slurm.add_argument("recipe", help="a catalogue name (meshplan recipes) or a recipe file")
    slurm.add_argument("--nodes", type=int, default=1, help="machines (default 1)")
    processes = slurm.add_mutually_exclusive_group(required=True)
    processes.add_argument("--gpus-per-node", type=int, metavar="G", help="GPU nodes: G GPUs per node, one process each")
    processes.add_argument("--cpu-processes-per-node", type=int, metavar="K", help="CPU-only nodes: K processes per "
                           "node and no GPU request (gloo)")
    slurm.add_argument("--partition", help="the Slurm partition (default: the cluster's default partition)")
    slurm.add_argument("--time", help="the job's time limit, e.g. 90 (minutes), 4:00:00 or 1-00:00:00")
    slurm.add_argument("--lightning", action="store_true", help="run train.py with srun, one task per process, for "
                       "a Lightning Trainer (default: accelerate launch, one task per node)")
    slurm.add_argument("--port", type=int, help="rank 0's port (default: 15000 + the job id modulo 10000, as Lightning does)")
    slurm.add_argument("--cpus-per-process", type=int, metavar="C", help="CPUs per training process (default 4 on "
                       "GPU nodes, 1 on CPU-only nodes)")
    slurm.set_defaults(run=_slurm, training_command=[])
    from meshplan.planner.command import add_plan_command

    add_plan_command(commands, _refuse)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``meshplan`` console script; returns the exit code (2 for bad input)."""
    argv, training_command = _training_command(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and argv[:1] == ["slurm"]:  # most likely the training command, without the -- before it
        return _refuse("meshplan slurm", f"unrecognized arguments: {' '.join(unknown)}. Put the training command after "
                                         f"--: meshplan slurm RECIPE --nodes N --gpus-per-node G -- train.py ARGS")
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if training_command:
        args.training_command = training_command
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
