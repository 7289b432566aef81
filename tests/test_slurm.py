"""Slurm: the sbatch scripts `meshplan slurm` prints, and real jobs on a single-host Slurm cluster.

Fast: the rendered scripts (their #SBATCH lines, the launch line word by word, the options as the
installed accelerate's own parser reads them, `bash -n`) and the command's refusals.
Slow: a real cluster (tests/helpers/slurm_cluster.py: munged, slurmctld and slurmd as root,
started once for the module) runs the two scripts `meshplan slurm` prints, submitted with
`sbatch --wait`: `accelerate launch` per node, and (--lightning) `srun` of a Lightning script with
two tasks per node, which Lightning detects as Slurm. Each run matches the single-process reference.
Without the packages or root, the slow tests are skipped and say why.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from helpers import parity, slurm_cluster
from helpers.parity import load_reference
from meshplan.cli import main
from meshplan.launch import free_port
from meshplan.recipes import CATALOGUE_DIR
from meshplan.slurm import SlurmJob, sbatch_script

ROOT = Path(__file__).resolve().parents[1]
LIGHTNING_SCRIPT = ROOT / "tests" / "scripts" / "slurm_lightning_train.py"
ACCELERATE_SCRIPT = ROOT / "tests" / "scripts" / "accelerate_train.py"
JOB_TIMEOUT = 300  # seconds for one job; a hang fails, and its job is cancelled
# Words a shell would split or expand, for the training command: they must reach the script as they are.
AWKWARD = ("it's", "$HOME", "two words", "*")


def _lines(script: str, prefix: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith(prefix)]


def _srun_words(script: str) -> list[str]:
    (line,) = _lines(script, "srun ")
    return shlex.split(line)


def _assert_bash_accepts(script: str, tmp_path: Path) -> None:
    path = tmp_path / "job.sh"
    path.write_text(script)
    checked = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


# ---------------------------------------------------------------- rendering


def test_accelerate_script_runs_one_launcher_per_node_with_the_node_id_as_machine_rank(tmp_path: Path) -> None:
    script = sbatch_script(SlurmJob("zero3", ("train.py", "--lr", "1e-4", *AWKWARD), nodes=2, gpus_per_node=8,
                                    partition="gpu", time="1:00:00"))
    assert _lines(script, "#SBATCH") == [
        "#SBATCH --job-name=meshplan-zero3", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gres=gpu:8", "#SBATCH --cpus-per-task=32", "#SBATCH --partition=gpu", "#SBATCH --time=1:00:00",
    ]
    assert script.startswith("#!/bin/bash\n")
    assert f"export MESHPLAN_RECIPE={CATALOGUE_DIR / 'zero3.yaml'}\n" in script
    assert 'MAIN_PROCESS_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\n' in script
    assert "MAIN_PROCESS_PORT=$((15000 + SLURM_JOB_ID % 10000))\n" in script  # Lightning's rule: one port per job
    srun = _srun_words(script)[:-1]
    # srun says the task's CPUs again (22.05 no longer inherits them) and stops every node when one fails.
    assert srun == ["srun", "--cpus-per-task=32", "--kill-on-bad-exit=1", "bash", "-c"]
    # The per-task command is one single-quoted word: $SLURM_NODEID is expanded by each task, on its node.
    assert shlex.split(_srun_words(script)[-1]) == [
        "exec", "accelerate", "launch", "--config_file", str(CATALOGUE_DIR / "zero3.yaml"),
        "--num_machines", "$SLURM_NNODES", "--num_processes", "$((SLURM_NNODES * 8))",
        "--machine_rank", "$SLURM_NODEID", "--main_process_ip", "$MAIN_PROCESS_IP",
        "--main_process_port", "$MAIN_PROCESS_PORT", "--rdzv_backend", "c10d", "--rdzv_conf", "is_host=$((SLURM_NODEID == 0))",
        "--deepspeed_multinode_launcher", "standard", "train.py", "--lr", "1e-4", *AWKWARD,
    ]
    _assert_bash_accepts(script, tmp_path)


@pytest.mark.parametrize(("node", "hosts"), [("0", "1"), ("1", "0")])
def test_only_the_first_nodes_agent_hosts_the_rendezvous_store(node: str, hosts: str) -> None:
    # accelerate launch hands --rdzv_conf to torchrun: is_host=1 on node 0 alone, whatever the node names are.
    script = sbatch_script(SlurmJob("zero3", ("train.py",), nodes=2, gpus_per_node=8))
    per_task = _srun_words(script)[-1].replace("exec accelerate launch", "printf '%s\\n' accelerate launch", 1)
    shown = subprocess.run(["bash", "-c", per_task], capture_output=True, text=True, check=True,
                           env={**os.environ, "SLURM_NODEID": node, "SLURM_NNODES": "2"})
    words = shown.stdout.splitlines()
    assert words[words.index("--rdzv_conf") + 1] == f"is_host={hosts}"


def test_accelerate_options_are_the_installed_accelerate_launch_options() -> None:
    from accelerate.commands.launch import launch_command_parser

    script = sbatch_script(SlurmJob("tp-dp", ("train.py", "--epochs", "3"), nodes=2, cpu_processes_per_node=4, port=29511))
    words = shlex.split(_srun_words(script)[-1])
    assert words[:3] == ["exec", "accelerate", "launch"]
    # What each task's shell makes of the variables on node 1 of 2.
    values = {"$SLURM_NNODES": "2", "$((SLURM_NNODES * 4))": "8", "$SLURM_NODEID": "1", "$MAIN_PROCESS_IP": "node-a",
              "$MAIN_PROCESS_PORT": "29511"}
    args = launch_command_parser().parse_args([values.get(word, word) for word in words[3:]])
    assert (args.num_machines, args.num_processes, args.machine_rank) == (2, 8, 1)
    assert (args.main_process_ip, args.main_process_port, args.rdzv_backend) == ("node-a", 29511, "c10d")
    assert args.rdzv_conf == "is_host=$((SLURM_NODEID == 0))"  # each task's shell expands it (tested above)
    assert args.config_file == str(CATALOGUE_DIR / "tp-dp.yaml")
    assert (args.training_script, args.training_script_args) == ("train.py", ["--epochs", "3"])
    assert args.deepspeed_multinode_launcher is None  # no DeepSpeed in a TP recipe
    assert "MAIN_PROCESS_PORT=29511\n" in script


@pytest.mark.parametrize("recipe", ["fsdp2", "tp-fsdp"])
def test_fsdp2_recipes_launch_without_deepspeed_options(recipe: str) -> None:
    from accelerate.commands.launch import launch_command_parser

    script = sbatch_script(SlurmJob(recipe, ("train.py",), nodes=2, gpus_per_node=4))
    words = shlex.split(_srun_words(script)[-1])
    assert "--deepspeed_multinode_launcher" not in words  # FSDP2 starts through torchrun on every node
    values = {"$SLURM_NNODES": "2", "$((SLURM_NNODES * 4))": "8", "$SLURM_NODEID": "0", "$MAIN_PROCESS_PORT": "29511"}
    args = launch_command_parser().parse_args([values.get(word, word) for word in words[3:]])
    assert args.config_file == str(CATALOGUE_DIR / f"{recipe}.yaml") and args.training_script == "train.py"


def test_cpu_only_nodes_ask_for_no_gpus_and_one_cpu_per_process(tmp_path: Path) -> None:
    script = sbatch_script(SlurmJob("ddp", ("train.py",), nodes=3, cpu_processes_per_node=2))
    assert _lines(script, "#SBATCH") == [
        "#SBATCH --job-name=meshplan-ddp", "#SBATCH --nodes=3", "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=2",
    ]
    assert "export OMP_NUM_THREADS=1\n" in script
    assert '"$((SLURM_NNODES * 2))"' in script
    _assert_bash_accepts(script, tmp_path)


def test_lightning_script_runs_one_task_per_device_and_names_the_trainer_arguments(tmp_path: Path) -> None:
    script = sbatch_script(SlurmJob("zero2", ("train.py", "--max-steps", "10", *AWKWARD), nodes=4, gpus_per_node=8,
                                    lightning=True, cpus_per_process=6))
    assert _lines(script, "#SBATCH") == [
        "#SBATCH --job-name=meshplan-zero2", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gres=gpu:8", "#SBATCH --cpus-per-task=6",
    ]
    assert _srun_words(script) == ["srun", "--cpus-per-task=6", "--kill-on-bad-exit=1", "python", "train.py",
                                   "--max-steps", "10", *AWKWARD]
    assert "num_nodes=4, devices=8 and accelerator='gpu'" in script
    assert 'meshplan.from_recipe(os.environ["MESHPLAN_RECIPE"])' in script
    assert f"export MESHPLAN_RECIPE={CATALOGUE_DIR / 'zero2.yaml'}\n" in script
    assert "accelerate" not in script.lower().replace("meshplan.accelerator", "")
    assert "MASTER_PORT" not in script  # Lightning derives it from the job id
    _assert_bash_accepts(script, tmp_path)


def test_command_prints_the_script_and_leaves_the_training_options_to_the_script(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["slurm", "zero3", "--nodes", "2", "--gpus-per-node", "8", "--", "train.py", "--nodes", "3", "--", "x"]) == 0
    printed = capsys.readouterr().out
    assert printed == sbatch_script(SlurmJob("zero3", ("train.py", "--nodes", "3", "--", "x"), nodes=2, gpus_per_node=8))


@pytest.mark.parametrize(("arguments", "message"), [
    (["zero3", "--gpus-per-node", "0", "--", "t.py"], "--gpus-per-node 0 must be a positive integer (for nodes without "
                                                       "GPUs, use --cpu-processes-per-node)."),
    (["zero3", "--nodes", "0", "--gpus-per-node", "2", "--", "t.py"], "--nodes 0 must be a positive integer."),
    (["zero3", "--gpus-per-node", "2"], "name the training script after --"),
    (["zero3", "--gpus-per-node", "2", "train.py", "--lr", "1"], "unrecognized arguments: train.py --lr 1. Put the "
                                                                 "training command after --"),
    (["zero4", "--gpus-per-node", "2", "--", "t.py"], "recipe 'zero4' does not exist"),
    # tp-dp's tp_size=2 does not divide 3 processes.
    (["tp-dp", "--cpu-processes-per-node", "3", "--", "t.py"], "tp_size=2 does not divide the world size 3"),
    # tp_size=2 on nodes of 1 process would put each tensor-parallel group on two nodes.
    (["tp-dp", "--nodes", "2", "--cpu-processes-per-node", "1", "--", "t.py"], "tp_size=2 does not divide the 1 processes"),
    (["zero3", "--gpus-per-node", "2", "--time", "1 hour", "--", "t.py"], "--time '1 hour' is no Slurm time limit"),
    (["zero3", "--gpus-per-node", "2", "--partition", "gpu\n#SBATCH --exclusive", "--", "t.py"], "is no partition name"),
    (["zero3", "--gpus-per-node", "2", "--port", "70000", "--", "t.py"], "--port 70000 is no TCP port"),
], ids=["no-gpus", "no-nodes", "no-script", "script-without-separator", "no-recipe", "tp-does-not-fit", "tp-spans-nodes", "time", "partition", "port"])
def test_bad_input_exits_with_code_2_and_one_line(arguments: list[str], message: str,
                                                  capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["slurm", *arguments]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("meshplan slurm: ") and message in captured.err, captured.err
    assert len(captured.err.strip().splitlines()) == 1


@pytest.mark.parametrize("processes", [[], ["--gpus-per-node", "2", "--cpu-processes-per-node", "2"]], ids=["none", "both"])
def test_gpus_and_cpu_processes_are_one_choice(processes: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["slurm", "zero3", *processes, "--", "train.py"])
    assert exit_info.value.code == 2
    assert "--gpus-per-node" in capsys.readouterr().err


# ---------------------------------------------------------------- a real cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[slurm_cluster.SlurmCluster]:
    """One single-host cluster for every slow test of this module."""
    reason = slurm_cluster.unavailable()
    if reason:
        pytest.skip(reason)
    with slurm_cluster.started() as started:
        yield started


def _job_environment(cluster: slurm_cluster.SlurmCluster) -> dict[str, str]:
    """This environment for a job: this interpreter's python and accelerate first on PATH, one thread per process."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return cluster.environment(PATH=path, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _run(cluster: slurm_cluster.SlurmCluster, command: list[str], log: Path, env: dict[str, str]) -> str:
    """Runs a Slurm client command (srun, sbatch --wait) to the end; its output and the job's log (``log``).

    Fails with their last lines and the daemons' logs when it exits non-zero or runs past JOB_TIMEOUT."""
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        cluster.command("scancel", f"--partition={slurm_cluster.PARTITION}")
        pytest.fail(f"{command[0]} ran past {JOB_TIMEOUT} s:\n{_tail(log)}\n{cluster.logs()}")
    output = done.stdout + done.stderr + (log.read_text(errors="replace") if log.exists() else "")
    assert done.returncode == 0, f"{command[0]} exited with {done.returncode}:\n{output[-6000:]}\n{cluster.logs()}"
    return output


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-6000:] if path.exists() else ""


def _assert_lightning_ranks(folder: Path, reference_paths: dict[str, str], strategy: str) -> None:
    """Both ranks ran under Lightning's SLURMEnvironment with Slurm's ranks, and match the reference."""
    records = [json.loads((folder / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    reference_losses, _ = load_reference(reference_paths, "llama")
    for rank, record in enumerate(records):
        assert record["cluster_environment"] == "SLURMEnvironment"
        assert record["strategy"] == strategy
        assert record["slurm"] == {"procid": rank, "localid": rank, "nodeid": 0, "ntasks": 2}
        assert (record["global_rank"], record["local_rank"], record["node_rank"], record["world_size"]) == (rank, rank, 0, 2)
        assert record["steps"] == parity.STEPS
        assert max(abs(a - b) for a, b in zip(record["losses"], reference_losses)) < parity.LOSS_TOLERANCE
        assert record["weight_error"] < parity.WEIGHT_TOLERANCE


@pytest.mark.slow
def test_accelerate_script_from_meshplan_slurm_trains_under_sbatch_and_matches_one_process(
        cluster: slurm_cluster.SlurmCluster, reference_paths: dict[str, str], deepspeed_ops: None, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # A folder name with a quote, a space and a dollar: the path must reach the script as it is.
    output = tmp_path / "it's $HOME" / "result.json"
    output.parent.mkdir()
    # No --port: the script's own rule, one port per job (Lightning's), is what runs.
    assert main(["slurm", "zero3", "--nodes", "1", "--cpu-processes-per-node", "2", "--",
                 str(ACCELERATE_SCRIPT), str(output), reference_paths["llama"]]) == 0
    script = tmp_path / "job.sh"
    script.write_text(capsys.readouterr().out)
    log = tmp_path / "job.out"
    # LOGLEVEL=INFO: torchrun's agent prints its launch configuration.
    printed = _run(cluster, ["sbatch", "--wait", f"--output={log}", f"--chdir={tmp_path}", str(script)], log,
                   {**_job_environment(cluster), "LOGLEVEL": "INFO"})
    job_id = re.search(r"Submitted batch job (\d+)", printed).group(1)
    result = json.loads(output.read_text())
    reference_losses, _ = load_reference(reference_paths, "llama")
    assert result["num_processes"] == 2
    assert result["distributed_type"] == "DistributedType.DEEPSPEED"
    assert max(abs(a - b) for a, b in zip(result["losses"], reference_losses)) < parity.LOSS_TOLERANCE
    assert result["weight_error"] < parity.WEIGHT_TOLERANCE
    assert len(result["losses"]) == parity.STEPS
    # torchrun's agent met the others by c10d at the first node's address and the job's port, under
    # the job's own id (not accelerate's single-machine fallback: localhost:29400, id "none").
    launch = dict(re.findall(r"^\S+ \S+ \d+ \S+\]\s+(rdzv_backend|rdzv_endpoint|run_id)\s+: (\S+)$", printed, re.M))
    port = 15000 + int(job_id) % 10000
    assert launch == {"rdzv_backend": "c10d", "rdzv_endpoint": f"{slurm_cluster.node_name()}:{port}", "run_id": job_id}, \
        printed[-3000:]


@pytest.mark.slow
def test_lightning_script_from_meshplan_slurm_runs_one_srun_task_per_process_detected_as_slurm(
        cluster: slurm_cluster.SlurmCluster, reference_paths: dict[str, str], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # The script's `srun python` starts the 2 tasks of `--ntasks-per-node=2`; the worker builds its
    # strategy, meshplan.DDP, from the $MESHPLAN_RECIPE the script exports, and never mentions Slurm.
    # (DDP: ZeRO is the Accelerate test's, and DeepSpeed's engine costs a minute of imports here.)
    assert main(["slurm", "ddp", "--nodes", "1", "--cpu-processes-per-node", "2", "--lightning", "--port",
                 str(free_port()), "--", str(LIGHTNING_SCRIPT), str(tmp_path), reference_paths["llama"],
                 "--devices", "2"]) == 0
    script = tmp_path / "job.sh"
    script.write_text(capsys.readouterr().out)
    log = tmp_path / "job.out"
    _run(cluster, ["sbatch", "--wait", f"--output={log}", f"--chdir={tmp_path}", str(script)], log,
         _job_environment(cluster))
    _assert_lightning_ranks(tmp_path, reference_paths, "DDP")
