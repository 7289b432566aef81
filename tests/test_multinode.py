"""Tier 3: every front end runs as two nodes and matches one process.

Each front end is launched once as two "nodes" on this machine: two launcher agents on
127.0.0.1, started as separate subprocesses, each starting 2 workers (4 processes in all).
Inside those processes one worker (tests/scripts/multinode_train.py) trains the parity model
under ddp, zero2, zero3 and tp-dp (TP over the 2 processes of a node, data parallel across the
2 nodes) one layout after the other, reusing the process group. Every step's global loss must
match the single-process reference within parity.LOSS_TOLERANCE and the final weights within
parity.WEIGHT_TOLERANCE. Then the placement each worker recorded must show a real two-node job:
two node ranks, two local ranks on each, each node's workers children of its own agent, and
every TP group inside one node.

- Lightning (``Trainer(num_nodes=2, devices=2)``): torchrun with c10d rendezvous, which assigns
  the node ranks itself, in the order the agents join (``--node_rank`` is ignored).
- An Accelerate script: ``accelerate launch --num_machines 2 --machine_rank 0/1`` of the
  ``ddp-2node`` recipe (static rendezvous); its first layout is that recipe, the rest are
  passed to meshplan.accelerator() as strategies.
- The HF Trainer: torchrun with static rendezvous (``--master_addr/--master_port --node_rank``).
  It has no TP: tp-dp is a PlanError there, checked without a launch.

A layout that would split a TP group across nodes is refused before any process group exists
(tests/test_layout_errors.py, tests/test_plan.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import meshplan
from helpers import multinode_workers, parity, trainer_train
from meshplan.launch import free_port
from meshplan.recipes import CATALOGUE_DIR

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "multinode_train.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")
ACCELERATE = Path(sys.executable).with_name("accelerate")
NODES, PER_NODE = 2, 2
LAUNCH_TIMEOUT = 360  # seconds for both agents of one launch: about 90 s each here, on 2 loaded cores


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The single-process references, saved as (losses, weights): the parity loop, and the loop
    with the HF Trainer's settings (trainer_train.train's)."""
    folder = tmp_path_factory.mktemp("multinode-references")
    paths = {"parity": str(folder / "parity.pt"), "trainer": str(folder / "trainer.pt")}
    torch.save(parity.reference_run("llama"), paths["parity"])
    torch.save(trainer_train.plain_loop_reference(), paths["trainer"])
    return paths


def _run_two_nodes(commands: list[list[str]], folder: Path) -> tuple[dict, list[int]]:
    """Starts one agent per command (node 0's first), waits for both, and returns rank 0's
    OUT.json (``folder / "result.json"``) and the agents' process ids.

    The first agent to fail, or the timeout, stops both (a lone agent would wait for its peer
    in the rendezvous); the assertion message then shows each agent's output.
    """
    logs = [folder / f"node{rank}.log" for rank in range(len(commands))]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                   "CUDA_VISIBLE_DEVICES": ""}  # 2 processes per node: CPU and gloo, even where a GPU is lent
    agents: list[subprocess.Popen] = []
    try:
        for command, log in zip(commands, logs):
            with log.open("w") as output:
                agents.append(subprocess.Popen(command, cwd=folder, env=environment, stdout=output, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while any(agent.poll() is None for agent in agents) and time.monotonic() < deadline:
            if any(agent.poll() not in (None, 0) for agent in agents):
                break
            time.sleep(0.5)
    finally:  # a failure, the timeout, pytest-timeout or Ctrl-C: no agent and no worker outlives the test
        codes = [agent.poll() for agent in agents]
        _stop(agents)
    if codes != [0] * len(commands):
        outputs = "\n".join(f"--- node {rank} (exit code {code}):\n{log.read_text()[-3000:]}"
                            for rank, (code, log) in enumerate(zip(codes, logs)))
        pytest.fail(f"the two-node launch failed or ran past {LAUNCH_TIMEOUT} s:\n{outputs}")
    return json.loads((folder / "result.json").read_text()), [agent.pid for agent in agents]


def _stop(agents: list[subprocess.Popen]) -> None:
    """SIGTERM first: an agent then stops its workers. torchrun starts them in sessions of their own,
    without a parent-death signal, so they would outlive a SIGKILLed agent."""
    for agent in agents:
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
    for agent in agents:
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()


def _worker(front_end: str, folder: Path, reference: str) -> list[str]:
    return [str(SCRIPT), front_end, str(folder / "result.json"), reference]


def _assert_matches_reference(results: dict, layouts: tuple[str, ...], reference_path: str) -> None:
    reference_losses, _ = torch.load(reference_path, weights_only=True)
    assert sorted(results) == sorted(layouts)
    for layout in layouts:
        result = results[layout]
        print(layout, "losses", result["losses"], "weight error", result["weight_error"], "seconds", result["seconds"])  # with -s
        assert len(result["losses"]) == parity.STEPS, layout
        errors = [abs(a - b) for a, b in zip(result["losses"], reference_losses)]
        assert max(errors) < parity.LOSS_TOLERANCE, (layout, result["losses"], reference_losses)
        assert result["weight_error"] < parity.WEIGHT_TOLERANCE, (layout, result["weight_error"])


def _assert_two_nodes(placement: list[dict], agent_pids: list[int], *, static: bool) -> dict[int, int]:
    """The job spanned two nodes of two processes, each node's workers started by its own agent.

    Returns each agent's node rank. With static rendezvous agent i is node i (its ``--node_rank``
    or ``--machine_rank``); with c10d the rendezvous numbers the agents in the order they join.
    """
    assert [record["rank"] for record in placement] == list(range(NODES * PER_NODE))
    assert all(record["launched_rank"] == record["rank"] for record in placement)
    assert {record["local_world_size"] for record in placement} == {PER_NODE}
    print("placement", [{key: value for key, value in record.items() if key != "views"} for record in placement])  # with -s
    for node in range(NODES):
        on_node = [record for record in placement if record["group_rank"] == node]
        assert sorted(record["local_rank"] for record in on_node) == list(range(PER_NODE)), placement
        assert len({record["agent_pid"] for record in on_node}) == 1, placement  # one agent per node
    # Ranks are numbered node by node: the premise of keeping TP groups (consecutive ranks) in one node.
    assert all(record["rank"] == record["group_rank"] * PER_NODE + record["local_rank"] for record in placement)
    node_of_agent = {record["agent_pid"]: record["group_rank"] for record in placement}
    assert sorted(node_of_agent) == sorted(agent_pids), (node_of_agent, agent_pids)  # the two agents we started
    if static:
        assert [node_of_agent[pid] for pid in agent_pids] == list(range(NODES))
    return node_of_agent


def _assert_tp_groups_inside_nodes(placement: list[dict], layout: str = "tp-dp") -> None:
    node = {record["rank"]: record["group_rank"] for record in placement}
    groups = {tuple(record["views"][layout]["tp_group"]) for record in placement}
    assert sorted(groups) == [(0, 1), (2, 3)], groups  # TP 2 inside each node, data parallel 2 across them
    for record in placement:
        group = record["views"][layout]["tp_group"]
        assert record["rank"] in group and len({node[rank] for rank in group}) == 1, record


@pytest.mark.slow
def test_lightning_trainer_on_two_nodes_matches_one_process(references: dict[str, str], tmp_path: Path,
                                                            deepspeed_ops: None) -> None:
    # c10d rendezvous: both agents name the same endpoint (the first to bind it hosts the store);
    # --node_rank is not given, the rendezvous assigns it. --local-addr: the address node 0's agent
    # gives the workers as MASTER_ADDR (by default this host's name, which need not resolve).
    port = free_port()
    command = [str(TORCHRUN), "--nnodes", str(NODES), "--nproc_per_node", str(PER_NODE), "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"meshplan-{port}", "--local-addr", "127.0.0.1",
               *_worker("lightning", tmp_path, references["parity"])]
    output, agents = _run_two_nodes([command, command], tmp_path)
    _assert_matches_reference(output["results"], tuple(multinode_workers.LAYOUTS), references["parity"])
    placement = output["placement"]
    _assert_two_nodes(placement, agents, static=False)
    _assert_tp_groups_inside_nodes(placement)
    for record in placement:  # Lightning itself saw two nodes, and this process on the launcher's node
        for layout, view in record["views"].items():
            assert (view["lightning_nodes"], view["lightning_node_rank"]) == (NODES, record["group_rank"]), (layout, record)


@pytest.mark.slow
def test_accelerate_script_on_two_nodes_matches_one_process(references: dict[str, str], tmp_path: Path,
                                                            deepspeed_ops: None) -> None:
    # Static rendezvous, as the ddp-2node recipe says (rdzv_backend: static); --num_processes is the total.
    port = str(free_port())
    commands = [[str(ACCELERATE), "launch", "--config_file", str(CATALOGUE_DIR / "ddp-2node.yaml"),
                 "--num_processes", str(NODES * PER_NODE), "--machine_rank", str(node), "--main_process_ip", "127.0.0.1",
                 "--main_process_port", port, *_worker("accelerate", tmp_path, references["parity"])]
                for node in range(NODES)]
    output, agents = _run_two_nodes(commands, tmp_path)
    results = output["results"]
    _assert_matches_reference(results, tuple(multinode_workers.LAYOUTS), references["parity"])
    expected = {"ddp": ("MULTI_CPU", 0), "zero2": ("DEEPSPEED", 2), "zero3": ("DEEPSPEED", 3), "tp-dp": ("MULTI_CPU", 0)}
    for layout, (distributed_type, stage) in expected.items():
        assert results[layout]["num_processes"] == NODES * PER_NODE  # every CPU worker of both machines counted
        assert (results[layout]["distributed_type"], results[layout]["zero_stage"]) == (f"DistributedType.{distributed_type}", stage)
    _assert_two_nodes(output["placement"], agents, static=True)
    _assert_tp_groups_inside_nodes(output["placement"])


@pytest.mark.slow
def test_hf_trainer_on_two_nodes_matches_one_process(references: dict[str, str], tmp_path: Path,
                                                     deepspeed_ops: None) -> None:
    # Static rendezvous: node 0's address and a port, and each agent's --node_rank.
    port = str(free_port())
    commands = [[str(TORCHRUN), "--nnodes", str(NODES), "--node_rank", str(node), "--nproc_per_node", str(PER_NODE),
                 "--master_addr", "127.0.0.1", "--master_port", port, *_worker("trainer", tmp_path, references["trainer"])]
                for node in range(NODES)]
    output, agents = _run_two_nodes(commands, tmp_path)
    results = output["results"]
    _assert_matches_reference(results, multinode_workers.TRAINER_LAYOUTS, references["trainer"])
    for layout, result in results.items():
        assert result["num_processes"] == NODES * PER_NODE
        assert result["deepspeed"] == layout.startswith("zero")
    _assert_two_nodes(output["placement"], agents, static=True)


def test_hf_trainer_refuses_tp_dp() -> None:
    # The Trainer runs TP only on models loaded with a transformers DistributedConfig, not on CPU processes.
    with pytest.raises(meshplan.PlanError, match="TensorParallel cannot be expressed through TrainingArguments"):
        multinode_workers.LAYOUTS["tp-dp"]().training_arguments()
