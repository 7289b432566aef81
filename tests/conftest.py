"""Shared fixtures: the single-process reference runs that every parity test compares with."""

from __future__ import annotations

import os
from typing import Iterator

import pytest
import torch

from helpers import parity


@pytest.fixture(scope="session", autouse=True)
def run_in_a_temporary_directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The whole session, and every process it starts, works in a temporary directory: nothing a
    run writes (lightning_logs/, .deepspeed_env, meshplan-output/) lands in the checkout."""
    before = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(before)


@pytest.fixture(scope="session")
def deepspeed_ops() -> None:
    """Builds DeepSpeed's CPU communication op once, before workers race to compile it (cached afterwards)."""
    from meshplan._compat.deepspeed import build_cpu_communication_op

    build_cpu_communication_op()


@pytest.fixture(scope="session")
def reference_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Reference runs saved as (losses, weights), keyed by parity.reference_key; computed once."""
    folder = tmp_path_factory.mktemp("references")
    paths = {}
    for model, clip in parity.REFERENCE_RUNS:
        key = parity.reference_key(model, clip)
        paths[key] = str(folder / f"{key}.pt")
        torch.save(parity.reference_run(model, clip), paths[key])
    return paths

