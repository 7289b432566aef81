"""`import meshplan` costs only what is used, and keeps its promises whatever is imported first.

The public names load on first use: a `meshplan` command, an Accelerate worker or an HF Trainer
worker never pays the seconds Lightning takes to import. Lightning users still find the
strategies registered, whether Lightning was imported before meshplan, after it, or through
``meshplan.lightning`` itself.
"""

from __future__ import annotations

import subprocess
import sys
from types import ModuleType

import meshplan
import meshplan.planner

REGISTERED_CHECK = """
from lightning.pytorch.strategies import StrategyRegistry
from meshplan.lightning import REGISTERED_STRATEGIES
missing = [name for name in REGISTERED_STRATEGIES if name not in StrategyRegistry]
assert not missing and len(REGISTERED_STRATEGIES) >= 9, missing
"""
IMPORT_ORDERS = {
    # Nothing heavy until asked for; the registration happens the moment Lightning loads.
    "meshplan, then lightning": """
import sys
import meshplan
heavy = [name for name in ("torch", "lightning", "deepspeed", "transformers", "accelerate") if name in sys.modules]
assert not heavy, heavy
import lightning
""",
    # meshplan.lightning imports Lightning, whose loading would register through a module still loading.
    "meshplan.lightning first": "from meshplan.lightning import ZeRO\n",
}


def test_the_strategies_are_registered_whatever_is_imported_first() -> None:
    # Lightning imported first, as in this process, is tests/test_plan.py's case.
    runs = {order: subprocess.Popen([sys.executable, "-c", code + REGISTERED_CHECK], stderr=subprocess.PIPE, text=True)
            for order, code in IMPORT_ORDERS.items()}
    for order, run in runs.items():
        _, error = run.communicate(timeout=300)
        assert run.returncode == 0, f"{order}:\n{error[-3000:]}"


def test_every_public_name_is_what_it_names_not_a_module_of_the_same_name() -> None:
    # Importing a submodule binds its name in the package: a public name must not share one.
    for package in (meshplan, meshplan.planner):
        for name in package._PUBLIC_NAMES:
            assert not isinstance(getattr(package, name), ModuleType), f"{package.__name__}.{name}"
    assert callable(meshplan.estimate) and callable(meshplan.planner.estimate)
    assert meshplan.ZeRO.__module__ == "meshplan.lightning.zero"
    assert {name for name in meshplan.__all__ if not hasattr(meshplan, name)} == set()
    assert meshplan.accelerate.__name__ == "meshplan.accelerate"  # a submodule, loaded as if imported
