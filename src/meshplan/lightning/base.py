"""What every meshplan Lightning strategy shares: its Plan, equality and early validation."""

from __future__ import annotations

from typing import Any

from meshplan.plan import Plan


class PlanStrategyMixin:
    """Gives a Lightning strategy a frozen ``plan`` and compares strategies by it.

    The mixin sits before the Lightning strategy class in the bases and adds no state besides
    ``plan``; everything that runs is Lightning's or the engine's.
    """

    plan: Plan

    def __eq__(self, other: Any) -> bool:
        return type(self) is type(other) and self.plan == other.plan

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.plan))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.plan!r})"

    def _validate_layout(self) -> None:
        """Checks the layout against the world size and the model before any process group exists."""
        self.plan.check_world_size(self.num_nodes * self.num_processes, self.num_processes)
