"""Shared fixtures: the single-process reference runs that every parity test compares with."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch

from helpers import parity

# DeepSpeed compiles its ops with the first `ninja` on PATH, into one cache shared by every
# process. With .venv/bin off PATH, processes that find the environment's ninja (pip's 1.13) and
# those that find the system's (1.11) disagree on the build log's format and rebuild the op in
# turn (about a minute each, with every ZeRO process waiting on the build lock). The environment's
# own bin directory first makes the whole session, and every process it starts, use one ninja.
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


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

