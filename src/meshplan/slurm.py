"""``meshplan slurm``: an sbatch script that runs a recipe on N nodes of a Slurm cluster.

Two shapes, the two ways a multi-node job is launched under Slurm:

- Accelerate (the default): one Slurm task per node; each runs ``accelerate launch`` with the
  recipe, which starts that node's processes. The nodes meet at a c10d rendezvous hosted by the
  first node of the allocation; ``--machine_rank`` is the task's ``$SLURM_NODEID``.
- Lightning (``lightning=True``): one Slurm task per device, started by ``srun``; Lightning's
  SLURMEnvironment reads the ranks from Slurm and the Trainer must say ``num_nodes`` and
  ``devices`` to match (it refuses a job whose task count differs).

Rendering is pure text: nothing here needs Slurm. The recipe is read and the layout checked
against the world (nodes x processes per node) first, so a bad recipe or a layout that does not
fit is a PlanError before a script exists.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from meshplan.errors import PlanError, shown
from meshplan.recipes import find_recipe, read_recipe

# CPUs per process when none is asked for: a GPU process also feeds its device (data loading);
# a CPU process computes, one core each, so the job fits wherever the processes do.
DEFAULT_CPUS_PER_GPU_PROCESS = 4
DEFAULT_CPUS_PER_CPU_PROCESS = 1
# Slurm's time formats: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
# days-hours:minutes, days-hours:minutes:seconds; and no limit.
_TIME = re.compile(r"(\d+-)?\d+(:\d+){0,2}|UNLIMITED|INFINITE|unlimited|infinite")
# Partition names (a comma-separated list is allowed): nothing that would end the #SBATCH line.
_PARTITION = re.compile(r"[\w.+-]+(,[\w.+-]+)*")
# The first node of the allocation: it hosts the rendezvous (Accelerate) or rank 0 (Lightning).
_FIRST_NODE = 'MAIN_PROCESS_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
# One port per job, the rule Lightning's SLURMEnvironment uses: two jobs whose first node is the
# same do not meet at one port.
_JOB_PORT = "$((15000 + SLURM_JOB_ID % 10000))"


@dataclass(frozen=True)
class SlurmJob:
    """What ``meshplan slurm`` was asked for; ``sbatch_script`` renders it.

    Exactly one of ``gpus_per_node`` (GPU nodes: one process per GPU) and
    ``cpu_processes_per_node`` (CPU-only nodes: that many processes, no GPU request) is set.
    """

    recipe: str  # a recipe file or catalogue name, as meshplan.read_recipe takes it
    command: tuple[str, ...]  # the training script and its arguments
    nodes: int = 1
    gpus_per_node: int | None = None
    cpu_processes_per_node: int | None = None
    partition: str | None = None
    time: str | None = None
    lightning: bool = False
    port: int | None = None  # the rendezvous port; None: derived from the job id
    cpus_per_process: int | None = None  # None: DEFAULT_CPUS_PER_GPU_PROCESS or DEFAULT_CPUS_PER_CPU_PROCESS

    @property
    def processes_per_node(self) -> int:
        """Training processes on each node: one per GPU, or the CPU processes asked for."""
        return self.gpus_per_node or self.cpu_processes_per_node or 0

    @property
    def cpus_per_process_or_default(self) -> int:
        """CPUs Slurm gives each training process."""
        if self.cpus_per_process is not None:
            return self.cpus_per_process
        return DEFAULT_CPUS_PER_GPU_PROCESS if self.gpus_per_node else DEFAULT_CPUS_PER_CPU_PROCESS


def sbatch_script(job: SlurmJob) -> str:
    """The sbatch script that runs ``job``: Accelerate's shape, or Lightning's with ``job.lightning``.

    Raises:
        PlanError: a value that Slurm or the launcher would refuse later (named, with what is
            valid), a recipe that cannot be read, or a layout that does not fit
            ``nodes x processes_per_node`` processes.
    """
    _check(job)
    recipe = read_recipe(job.recipe)
    world = job.nodes * job.processes_per_node
    recipe.plan.check_world_size(world, job.processes_per_node)
    # Absolute: every node reads it (the recipe must lie on a filesystem they all see).
    recipe_path = os.path.abspath(find_recipe(job.recipe))
    body = _lightning_body(job) if job.lightning else _accelerate_body(job, recipe_path, recipe.plan.uses_deepspeed)
    lines = [
        "#!/bin/bash",
        *_header(job, recipe.description, world),
        *_directives(job),
        "set -eu",
        "",
        "# meshplan reads the recipe's options from here on every node (meshplan.accelerator(), meshplan.from_recipe).",
        f"export MESHPLAN_RECIPE={shlex.quote(recipe_path)}",
        "# Each process computes with the CPUs Slurm gave it.",
        f"export OMP_NUM_THREADS={job.cpus_per_process_or_default}",
        *body,
    ]
    return "\n".join(lines) + "\n"


def _check(job: SlurmJob) -> None:
    """Refuses values that would fail later, in Slurm or in the launcher, with less clear messages."""
    _positive("--nodes", job.nodes)
    if (job.gpus_per_node is None) == (job.cpu_processes_per_node is None):
        raise PlanError("give exactly one of --gpus-per-node G (GPU nodes: one process per GPU) and "
                        "--cpu-processes-per-node K (CPU-only nodes: K processes, no GPU requested).")
    if job.gpus_per_node is not None:
        _positive("--gpus-per-node", job.gpus_per_node, " (for nodes without GPUs, use --cpu-processes-per-node)")
    else:
        _positive("--cpu-processes-per-node", job.cpu_processes_per_node)
    if job.cpus_per_process is not None:
        _positive("--cpus-per-process", job.cpus_per_process)
    if job.port is not None and not 1 <= job.port <= 65535:
        raise PlanError(f"--port {job.port} is no TCP port; give one from 1 to 65535, or none (derived from the job id).")
    if job.partition is not None and not _PARTITION.fullmatch(job.partition):
        raise PlanError(f"--partition {shown(job.partition)} is no partition name: letters, digits, '_', '.', '+' "
                        f"and '-', or several such names separated by commas.")
    if job.time is not None and not _TIME.fullmatch(job.time):
        raise PlanError(f"--time {shown(job.time)} is no Slurm time limit; write minutes, MM:SS, HH:MM:SS, "
                        f"D-HH, D-HH:MM or D-HH:MM:SS (e.g. 90, 1:30:00 or 2-00:00:00).")
    if not job.command or not job.command[0]:
        raise PlanError("name the training script after --: meshplan slurm RECIPE --nodes N --gpus-per-node G "
                        "-- train.py ARGS.")


def _positive(option: str, value: int | None, hint: str = "") -> None:
    if type(value) is not int or value < 1:
        raise PlanError(f"{option} {shown(value)} must be a positive integer{hint}.")


def _header(job: SlurmJob, description: str, world: int) -> list[str]:
    """Comments that say what the script runs, and what it needs from the training script."""
    unit = "GPU(s)" if job.gpus_per_node else "CPU process(es)"
    front_end = "Lightning, one Slurm task per process" if job.lightning else "accelerate launch, one Slurm task per node"
    lines = [
        f"# meshplan slurm: recipe {Path(job.recipe).name} on {job.nodes} node(s) x {job.processes_per_node} {unit} "
        f"= {world} processes, under {front_end}.",
    ]
    purpose = description.splitlines()[0] if description else ""
    if purpose:
        lines.append(f"# {purpose}")
    lines.append("# Submit it with sbatch from the environment that has meshplan installed (sbatch passes that "
                 "environment to the job);")
    lines.append("# the recipe, the training script and any checkpoint folder must lie on a filesystem every node sees.")
    if job.lightning:
        accelerator = "gpu" if job.gpus_per_node else "cpu"
        lines += [
            f"# The script's Trainer must be built with num_nodes={job.nodes}, devices={job.processes_per_node} and "
            f"accelerator={accelerator!r}",
            "# (Lightning refuses a job whose tasks per node are not devices, or whose nodes are not num_nodes), and its strategy with",
            "# meshplan.from_recipe(os.environ[\"MESHPLAN_RECIPE\"]) or the same layout in code. Lightning's SLURMEnvironment",
            "# takes each rank from srun (SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID) and rank 0's address from the node list.",
        ]
    else:
        lines.append("# The script creates meshplan.accelerator(): it reads the layout accelerate launch passes.")
    return lines


def _directives(job: SlurmJob) -> list[str]:
    """The #SBATCH lines: nodes, tasks per node, GPUs and CPUs, and the optional partition and time."""
    tasks_per_node = job.processes_per_node if job.lightning else 1
    cpus_per_task = job.cpus_per_process_or_default * (1 if job.lightning else job.processes_per_node)
    lines = [
        f"#SBATCH --job-name=meshplan-{_job_name(job.recipe)}",
        f"#SBATCH --nodes={job.nodes}",
        f"#SBATCH --ntasks-per-node={tasks_per_node}",
    ]
    if job.gpus_per_node:  # --gres, not --gpus-per-node: the latter needs select/cons_tres
        lines.append(f"#SBATCH --gres=gpu:{job.gpus_per_node}")
    lines.append(f"#SBATCH --cpus-per-task={cpus_per_task}")
    if job.partition:
        lines.append(f"#SBATCH --partition={job.partition}")
    if job.time:
        lines.append(f"#SBATCH --time={job.time}")
    return lines


def _job_name(recipe: str) -> str:
    """The recipe's name, as a job name: its file name without .yaml, odd characters replaced."""
    name = Path(recipe).name.removesuffix(".yaml").removesuffix(".yml")
    return re.sub(r"[^\w.+-]", "_", name) or "recipe"


def _srun(job: SlurmJob) -> str:
    """srun with the CPUs of a task said again: since Slurm 22.05, srun no longer inherits
    sbatch's --cpus-per-task, and a launcher bound to one CPU would run every process there."""
    cpus_per_task = job.cpus_per_process_or_default * (1 if job.lightning else job.processes_per_node)
    return f"srun --cpus-per-task={cpus_per_task} --kill-on-bad-exit=1"


def _accelerate_body(job: SlurmJob, recipe_path: str, deepspeed: bool) -> list[str]:
    """The first node's address and a port, then one ``accelerate launch`` per node through srun."""
    per_node = job.processes_per_node
    launch = [
        "accelerate", "launch", "--config_file", shlex.quote(recipe_path),
        "--num_machines", '"$SLURM_NNODES"',
        "--num_processes", f'"$((SLURM_NNODES * {per_node}))"',
        "--machine_rank", '"$SLURM_NODEID"',
        "--main_process_ip", '"$MAIN_PROCESS_IP"',
        "--main_process_port", '"$MAIN_PROCESS_PORT"',
        "--rdzv_backend", "c10d",
        # The first node's agent hosts the c10d store: torch would otherwise decide by comparing the
        # endpoint's name with the machine's, which fails where a NodeName is not the hostname.
        "--rdzv_conf", '"is_host=$((SLURM_NODEID == 0))"',
    ]
    if deepspeed:  # else DeepSpeed's own multi-node launcher would ssh (pdsh) from the first node into the others
        launch += ["--deepspeed_multinode_launcher", "standard"]
    launch += [shlex.quote(word) for word in job.command]
    # Expanded by each task on its own node: the single quotes keep $SLURM_NODEID from this shell.
    per_task = "exec " + " ".join(launch)
    return [
        "",
        "# Rank 0's machine, the first node of the allocation, hosts the c10d rendezvous.",
        _FIRST_NODE,
        f"MAIN_PROCESS_PORT={job.port if job.port is not None else _JOB_PORT}",
        "export MAIN_PROCESS_IP MAIN_PROCESS_PORT",
        "# torchrun's c10d rendezvous meets at this endpoint, read from PET_* variables: accelerate launch does",
        "# not pass one (on one node c10d would fall back to localhost:29400, shared by every job there).",
        'export PET_RDZV_ENDPOINT="$MAIN_PROCESS_IP:$MAIN_PROCESS_PORT" PET_RDZV_ID="$SLURM_JOB_ID"',
        "",
        f"# One task per node, each starting {per_node} processes; $SLURM_NODEID is that node's machine rank.",
        f"{_srun(job)} bash -c {shlex.quote(per_task)}",
    ]


def _lightning_body(job: SlurmJob) -> list[str]:
    """srun of the training script itself: one task per process, Lightning takes the ranks from Slurm."""
    lines = [""]
    if job.port is not None:
        lines += ["# Rank 0's port (without it, Lightning derives one from the job id).", f"export MASTER_PORT={job.port}"]
    lines += [
        f"# {job.processes_per_node} task(s) per node, one per process: python here is the environment's, as sbatch passed it.",
        f"{_srun(job)} python {' '.join(shlex.quote(word) for word in job.command)}",
    ]
    return lines

