"""The spawn harness: results by rank, and failures and hangs that end in seconds."""

from __future__ import annotations

import time

import huggingface_hub.constants

import pytest

from helpers.environment_probe import environment_as_imported, was_imported_before_the_call
from helpers.layouts import fail_on_rank_one, rank_and_world, sleep_forever
from meshplan.testing import WorkerError, WorkerTimeout, spawn

pytestmark = pytest.mark.slow  # every test starts worker processes


def test_results_come_back_in_rank_order() -> None:
    assert spawn(rank_and_world, 3, timeout=120) == [(0, 3), (1, 3), (2, 3)]


def test_a_failing_rank_stops_every_worker_with_its_traceback() -> None:
    started = time.monotonic()
    with pytest.raises(WorkerError, match="rank 1 raised") as error:
        spawn(fail_on_rank_one, 2, timeout=120)
    assert "rank one broke" in str(error.value)
    assert time.monotonic() - started < 50  # rank 0 sleeps 60 s: it was killed, not waited for


def test_a_hang_is_killed_at_the_timeout() -> None:
    started = time.monotonic()
    with pytest.raises(WorkerTimeout, match=r"ranks \[0, 1\] did not finish within 20 s"):
        spawn(sleep_forever, 2, timeout=20)
    assert time.monotonic() - started < 40


def test_workers_see_the_callers_environment_even_where_a_module_reads_it_at_import(monkeypatch) -> None:
    # Earlier spawns started the fork server, whose transformers import read HF_HUB_OFFLINE once;
    # after the caller changes it, workers must import under the new value, as fresh processes would.
    spawn(rank_and_world, 1, timeout=120)
    offline = not huggingface_hub.constants.HF_HUB_OFFLINE  # the opposite of what this process read
    monkeypatch.setenv("HF_HUB_OFFLINE", str(int(offline)))
    monkeypatch.setenv("MESHPLAN_PROBE", "the caller's")
    assert spawn(environment_as_imported, 1, "MESHPLAN_PROBE", timeout=120) == [("the caller's", offline)]


def test_calls_from_any_test_are_served_by_the_preloaded_fork_server() -> None:
    # pytest names the running test in PYTEST_CURRENT_TEST; were that counted as a change of the
    # environment, every test after the first would start fresh interpreters, importing DeepSpeed
    # and Lightning again in each worker. The probe imports neither.
    import os

    from meshplan import testing

    served = spawn(was_imported_before_the_call, 2, "deepspeed", timeout=120)
    started_with = testing._server_environment or {}
    changed = sorted(key for key in {*started_with, *os.environ} if started_with.get(key) != os.environ.get(key))
    assert served == [True, True], f"variables changed since the fork server started: {changed}"
