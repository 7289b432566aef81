"""What every meshplan Lightning strategy shares: its Plan, equality and early validation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from meshplan.errors import PlanError
from meshplan.plan import Plan, normalize_precision


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

    def to_recipe(self, path: str | os.PathLike, *, num_processes: int = 2, num_machines: int = 1,
                  description: str = "") -> Path:
        """Writes this layout as an Accelerate config file for ``accelerate launch --config_file``."""
        from meshplan.recipes import write_recipe

        return write_recipe(self.plan, path, num_processes=num_processes, num_machines=num_machines,
                            description=description)

    def training_arguments(self) -> dict[str, Any]:
        """Keyword arguments for ``transformers.TrainingArguments`` that train with this layout."""
        from meshplan.hf_trainer import training_arguments

        return training_arguments(self.plan)

    def _validate_layout(self) -> None:
        """Checks the layout against the world size and the Trainer before any process group exists."""
        self.plan.check_world_size(self.num_nodes * self.num_processes, self.num_processes)
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is not None:
            _check_training_settings(self.plan, trainer)


# The Lightning Trainer argument that holds each training setting a recipe may fix.
_TRAINER_SETTINGS = {
    "mixed_precision": ("precision", lambda trainer: normalize_precision(trainer.precision) or trainer.precision),
    "gradient_accumulation_steps": ("accumulate_grad_batches", lambda trainer: trainer.accumulate_grad_batches),
    "gradient_clipping": ("gradient_clip_val", lambda trainer: trainer.gradient_clip_val),
}


def _check_training_settings(plan: Plan, trainer: Any) -> None:
    """Refuses a Trainer whose settings contradict those the layout (a recipe) fixes."""
    for option, (argument, read) in _TRAINER_SETTINGS.items():
        wanted, actual = plan.option(option), read(trainer)
        if wanted is not None and wanted != actual:
            raise PlanError(
                f"option {option}={wanted!r} contradicts Trainer({argument}={actual!r}); set them to the same "
                f"value, or drop {option} from the strategy or recipe."
            )
