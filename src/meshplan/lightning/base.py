"""What every meshplan Lightning strategy shares: its Plan, equality and early validation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch.distributed as dist

from meshplan.errors import PlanError
from meshplan.launch import warn_if_restarts_share_the_rendezvous_store
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

    # Checkpoints: one directory of whole tensors that every meshplan layout can resume from
    # (meshplan.checkpoint.lightning_state). Lightning's own dump of the weights and optimizer
    # states is skipped: the tensors are gathered one at a time while saving instead.

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        """Checkpoints load into the set-up (sharded) model and optimizers."""
        return True

    @property
    def lightning_restore_optimizer(self) -> bool:
        """The optimizers are restored with the weights, in ``load_checkpoint``."""
        return False

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Empty: ``save_checkpoint`` gathers the weights itself, one tensor at a time."""
        return {}

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """Empty: ``save_checkpoint`` gathers the optimizer state itself, one tensor at a time."""
        return {}

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """Writes a layout-independent checkpoint directory at ``filepath``, published once complete. Collective."""
        from meshplan.checkpoint.lightning_state import save_lightning_checkpoint

        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options.")
        save_lightning_checkpoint(self, checkpoint, filepath)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Loads a meshplan checkpoint written under any layout into this one; returns Lightning's state."""
        from meshplan.checkpoint.lightning_state import load_lightning_checkpoint

        return load_lightning_checkpoint(self, checkpoint_path)

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        """Nothing to do: ``load_checkpoint`` has loaded the weights."""

    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        """Nothing to do: ``load_checkpoint`` has loaded the optimizer state."""

    def remove_checkpoint(self, filepath: Any) -> None:
        """Deletes a checkpoint directory (rank 0), as ModelCheckpoint asks for old ones.

        A symbolic link (ModelCheckpoint's ``save_last="link"`` makes ``last.ckpt`` one) is
        unlinked: that removes the link only, never what it points to. Otherwise only a folder
        meshplan wrote is deleted (``discard_checkpoint``); anything else at that path is kept, with
        a warning: a training run does not stop over it.
        """
        from meshplan.checkpoint.store import discard_checkpoint

        if self.is_global_zero:
            path = Path(filepath)
            if os.path.islink(path):
                os.unlink(path)
                return
            discard_checkpoint(path)

    def _process_counts(self) -> tuple[int, int]:
        """The world size and the processes per node that the layout is checked and sized against.

        Lightning's count by default: ``num_nodes`` x ``devices``. Under Ray Train each worker's
        Trainer sees only its own device (``devices="auto"``), so meshplan.ray counts Ray's workers.
        """
        return self.num_nodes * self.num_processes, self.num_processes

    def _validate_layout(self) -> None:
        """Checks the layout against the world size and the Trainer before any process group exists."""
        self.plan.check_world_size(*self._process_counts())
        warn_if_restarts_share_the_rendezvous_store()
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


# The Trainer argument that limits the batches of each stage, and the stage's name in messages.
_STAGE_LIMITS = {"train": ("limit_train_batches", "training"), "validate": ("limit_val_batches", "validation"),
                 # The sanity check prepares the loader every validation of the fit then reuses, so the
                 # check is of what validation runs, not of the few sanity steps.
                 "sanity_check": ("limit_val_batches", "validation"), "test": ("limit_test_batches", "test"),
                 "predict": ("limit_predict_batches", "predict")}


def _batches_run(batches: int, limit: Any) -> int:
    """How many of a loader's ``batches`` the Trainer runs under a limit_*_batches-style ``limit``."""
    if isinstance(limit, float) and limit <= 1.0:
        return int(batches * limit)
    if isinstance(limit, int) and limit >= 0:
        return min(batches, limit)
    return batches


def check_equal_batch_counts(dataloader: object, trainer: Any, layout: str, alternative: str,
                             data_parallel_size: int | None = None) -> None:
    """Refuses a loader that gives the processes different numbers of batches when a forward pass is collective.

    Every forward pass of ZeRO-3 (DeepSpeed) and of FSDP2 gathers each layer's parameters from all
    data-parallel processes; a process with an extra batch would wait for the others forever.
    Lightning evens out training, validation and test data by repeating samples, but its predict
    sampler does not (so that each sample is predicted once). Every process reaches this check
    for the same loader (collective).

    Args:
        layout: the layout's name in the message ("ZeRO stage 3").
        alternative: what else the user may do, with ``{stage}`` for the stage's name.
        data_parallel_size: the ranks the samples are split over (the world when None).
    """
    stage = getattr(trainer.state.stage, "value", trainer.state.stage)
    limit_argument, name = _STAGE_LIMITS.get(stage, (None, "these"))
    try:
        batches = len(dataloader)  # type: ignore[arg-type]
    except (TypeError, NotImplementedError):  # an iterable loader: its length is unknown
        batches = None
    if batches is not None and limit_argument is not None:
        batches = _batches_run(batches, getattr(trainer, limit_argument, None))
    counts: list[int | None] = [None] * dist.get_world_size()
    dist.all_gather_object(counts, batches)
    if None in counts or len(set(counts)) == 1:
        return
    raise PlanError(
        f"{layout} gathers the parameters from every process in each forward pass, so every process must run "
        f"the same number of {name} batches, but this {name} loader gives them {counts} (by rank). Use a number "
        f"of samples that splits evenly (a multiple of {data_parallel_size or len(counts)} data-parallel processes x "
        f"the batch size), or {alternative.format(stage=name)}."
    )
