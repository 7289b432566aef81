"""meshplan.launch.run_workers keeps each worker's lines apart in a shared log, and `meshplan finetune`'s
failure excerpt shows one worker's traceback whole, however the workers' writes interleave."""

from __future__ import annotations

import sys
from pathlib import Path

from meshplan.cli import _failure_excerpt
from meshplan.launch import ATTEMPT_MARK, run_workers

# Each worker fails at the same moment, 30 frames deep, in functions named after its rank: unprefixed,
# their line-by-line tracebacks interleave in one file.
FAILING_WORKER = """
import os, time
rank = os.environ["RANK"]
print(f"worker says hello from rank {rank}", flush=True)
source = f"def rank_{rank}_frame_0():\\n    raise ValueError('rank {rank} failed')\\n"
for depth in range(1, 30):  # distinct functions: Python would fold a recursion's repeated frames
    source += f"def rank_{rank}_frame_{depth}():\\n    rank_{rank}_frame_{depth - 1}()\\n"
exec(source)
open(os.path.join(os.environ["BARRIER"], rank), "w").close()
while len(os.listdir(os.environ["BARRIER"])) < 2:  # both ranks fail at the same moment
    time.sleep(0.001)
globals()[f"rank_{rank}_frame_29"]()
"""


def _run_failing_workers(log: Path) -> int:
    barrier = log.with_suffix(".barrier")
    barrier.mkdir()
    with open(log, "a") as output:
        return run_workers([sys.executable, "-c", FAILING_WORKER], 2, env={"BARRIER": str(barrier)}, output=output,
                           say=lambda text: None)


def test_every_line_a_worker_writes_to_the_log_names_its_rank(tmp_path: Path) -> None:
    log = tmp_path / "workers.log"
    assert _run_failing_workers(log) == 1
    lines = log.read_text().split(ATTEMPT_MARK, 1)[1].splitlines()[1:]
    assert lines and all(line.startswith(("[worker 0] ", "[worker 1] ")) for line in lines), lines
    for rank in (0, 1):
        assert f"[worker {rank}] worker says hello from rank {rank}" in lines
    # The first to fail wrote its whole traceback; the launcher then stopped the other, perhaps mid-way.
    assert any(line in lines for line in ("[worker 0] ValueError: rank 0 failed", "[worker 1] ValueError: rank 1 failed"))


def test_the_failure_excerpt_is_one_workers_traceback_through_its_exception(tmp_path: Path) -> None:
    log = tmp_path / "workers.log"
    _run_failing_workers(log)
    excerpt = _failure_excerpt(log, lines=200).splitlines()
    assert excerpt[0] == "    Traceback (most recent call last):"
    failed = "0" if "ValueError: rank 0 failed" in excerpt[-1] else "1"
    other = "1" if failed == "0" else "0"
    assert excerpt[-1] == f"    ValueError: rank {failed} failed"
    assert sum(f"in rank_{failed}_frame_" in line for line in excerpt) == 30  # every frame, none lost
    assert not any(f"rank_{other}_" in line or "[worker" in line for line in excerpt)
