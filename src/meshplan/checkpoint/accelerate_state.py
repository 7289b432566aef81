"""Accelerate's ``save_state``/``load_state`` in meshplan's layout-independent format.

``meshplan.accelerator()`` returns a CheckpointingAccelerator (or its tensor-parallel subclass):
``save_state`` writes models and optimizers as whole tensors, schedulers, registered objects and
the step counter as plain data, and each process's random number generator states; any layout
can ``load_state`` it. Automatic checkpoint naming (``ProjectConfiguration``) works as in
Accelerate: ``checkpoints/checkpoint_<i>`` in the project directory, ``total_limit`` honoured,
``load_state()`` with no folder takes the latest complete one and numbering goes on after it.
Not saved (unlike Accelerate's own ``save_state``): sampler and stateful data loader states,
and ``register_save_state_pre_hook`` hooks are not called; skip consumed batches with
``accelerator.skip_first_batches``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from meshplan._compat.accelerate import (
    TENSOR_PARALLEL_DIMENSION,
    deepspeed_engine,
    prepared_models,
    prepared_optimizers,
    prepared_schedulers,
    registered_objects,
)
from meshplan.checkpoint.engines import deepspeed_counters, deepspeed_counters_problem, restore_deepspeed_counters
from meshplan.checkpoint.manifest import is_complete, latest_checkpoint
from meshplan.checkpoint.random_state import random_states, saved_random_states, set_random_states
from meshplan.tp.sync import share_random_state_over
from meshplan.checkpoint.sharded import STATE_FILE, CheckpointReader, load_training_state, save_training_state
from meshplan.checkpoint.state_checks import (
    count_problem,
    kind_problem,
    like_problem,
    scaler_problem,
    state_error,
    warn_skipped,
    without_stray_scalars,
)
from meshplan.checkpoint.store import discard_checkpoint, plain_data
from meshplan.errors import CheckpointError, shown_path
from meshplan.plan import Plan


# What save_state writes into state.pt, and load_state reads back.
_STATE_KEYS = ("step", "schedulers", "custom_objects", "grad_scaler", "deepspeed_counters")


class CheckpointingAccelerator(Accelerator):
    """An Accelerator for a meshplan Plan whose checkpoints any other layout can resume from."""

    def __init__(self, plan: Plan, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.plan = plan

    def save_state(self, output_dir: str | None = None, safe_serialization: bool = True, **kwargs: Any) -> str:
        """Saves models, optimizers, schedulers, registered objects and RNG states to ``output_dir``
        (or the next automatically named folder); it appears there only once complete. Collective."""
        location = self._save_location(output_dir)
        engine = deepspeed_engine(self)
        state = {
            "step": self.step,
            "schedulers": [scheduler.state_dict() for scheduler in prepared_schedulers(self)],
            "custom_objects": [obj.state_dict() for obj in registered_objects(self)],
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "deepspeed_counters": deepspeed_counters(engine) if engine is not None else None,
        }
        save_training_state(location, self._named_models(), self._named_optimizers(), plain_data(state),
                            rank_state=random_states(),
                            manifest={"front_end": "accelerate", "layout": repr(self.plan), "step": self.step})
        if self.project_configuration.automatic_checkpoint_naming:
            self.project_configuration.iteration += 1
        return str(location)

    def load_state(self, input_dir: str | None = None, **kwargs: Any) -> None:
        """Loads a checkpoint saved under any meshplan layout (the latest one when automatically named). Collective.

        The saved state (step, schedulers, registered objects, scaler, counters) and this
        process's generator states are checked before anything is loaded: a crafted entry is a
        CheckpointError naming it, and the model, optimizers and schedulers are left as they were.
        """
        location = input_dir or self._latest_saved()
        with CheckpointReader(location) as reader:
            state = reader.state()
            self._check_state(reader.path, state)
            generators = saved_random_states(reader, self.process_index)
            load_training_state(reader, self._named_models(), self._named_optimizers())
        for scheduler, saved in zip(prepared_schedulers(self), state["schedulers"]):
            scheduler.load_state_dict(saved)
        for obj, saved in zip(registered_objects(self), state["custom_objects"]):
            obj.load_state_dict(saved)
        if self.scaler is not None and state["grad_scaler"] is not None:
            self.scaler.load_state_dict(state["grad_scaler"])
        self.step = state["step"]
        if self.project_configuration.automatic_checkpoint_naming and input_dir is None:
            # Numbering goes on after the loaded checkpoint, so a restarted job can save again.
            self.project_configuration.iteration = _iteration(Path(location)) + 1
        engine = deepspeed_engine(self)
        if engine is not None:
            restore_deepspeed_counters(engine, state["deepspeed_counters"], self.step)
        if generators is not None:  # a checkpoint from fewer processes has none for this one
            set_random_states(generators)
        # One random stream per TP group again.
        share_random_state_over(getattr(self, "torch_device_mesh", None), TENSOR_PARALLEL_DIMENSION)

    def _check_state(self, checkpoint: Path, state: dict[str, Any]) -> None:
        """Refuses the saved state unless every entry ``load_state`` reads fits what this script prepared.

        A scheduler's or the scaler's state may hold only entries the live one has, each of the
        same kind (torch's ``load_state_dict`` copies any key in as an attribute), except a
        scheduler's plain scalars from another torch version, left out with a warning; the
        scaler's values are in the ranges torch's GradScaler accepts; a registered
        object's is a dict where its own ``state_dict()`` is; what it holds is the object's to read.
        """
        def refuse(entry: str, problem: str | None) -> None:
            if problem is not None:
                raise state_error(checkpoint, STATE_FILE, entry, problem)

        for key in _STATE_KEYS:
            refuse(key, None if key in state else "is missing")
        refuse("step", count_problem(state["step"]))
        refuse("schedulers", kind_problem(state["schedulers"], list))
        refuse("custom_objects", kind_problem(state["custom_objects"], list))
        schedulers, objects = prepared_schedulers(self), registered_objects(self)
        if len(state["schedulers"]) != len(schedulers) or len(state["custom_objects"]) != len(objects):
            raise CheckpointError(
                f"checkpoint {shown_path(checkpoint)} holds {len(state['schedulers'])} schedulers and "
                f"{len(state['custom_objects'])} registered objects; this script prepared {len(schedulers)} and "
                f"registered {len(objects)}."
            )
        skipped = []
        for index, (scheduler, saved) in enumerate(zip(schedulers, state["schedulers"])):
            current = scheduler.state_dict()
            saved, stray = without_stray_scalars(saved, current)
            refuse(f"schedulers[{index}]", like_problem(saved, current, "the scheduler"))
            state["schedulers"][index] = saved  # what load_state hands the scheduler
            if stray:
                skipped.append((f"schedulers[{index}]", stray))
        for index, (obj, saved) in enumerate(zip(objects, state["custom_objects"])):
            if isinstance(obj.state_dict(), dict):
                refuse(f"custom_objects[{index}]", kind_problem(saved, dict))
        if self.scaler is not None and state["grad_scaler"] is not None:
            refuse("grad_scaler", scaler_problem(state["grad_scaler"], self.scaler.state_dict()))
        refuse("deepspeed_counters", deepspeed_counters_problem(state["deepspeed_counters"]))
        warn_skipped(checkpoint, STATE_FILE, skipped, "this torch's schedulers")

    def _named_models(self) -> dict[str, Any]:
        return {f"model_{index}": self.unwrap_model(model) for index, model in enumerate(prepared_models(self))}

    def _named_optimizers(self) -> dict[str, Any]:
        return {f"optimizer_{index}": optimizer for index, optimizer in enumerate(prepared_optimizers(self))}

    def _save_location(self, output_dir: str | None) -> Path:
        if not self.project_configuration.automatic_checkpoint_naming:
            if output_dir is None:
                raise CheckpointError("save_state() needs an output_dir unless ProjectConfiguration(automatic_checkpoint_naming=True).")
            return Path(output_dir)
        folder = Path(self.project_dir) / "checkpoints"
        limit = self.project_configuration.total_limit
        if self.is_main_process and limit is not None:
            saved = sorted((path for path in folder.glob("checkpoint_*") if _iteration(path) >= 0 and is_complete(path)),
                           key=_iteration)
            for old in saved[: max(0, len(saved) + 1 - limit)]:
                discard_checkpoint(old, context="total_limit: ")  # only a folder meshplan wrote is deleted
        location = folder / f"checkpoint_{self.save_iteration}"
        if location.exists():
            raise CheckpointError(f"{location} already exists (iteration {self.save_iteration}); set "
                                  f"accelerator.project_configuration.iteration to the iteration to go on from.")
        return location

    def _latest_saved(self) -> str:
        if not self.project_configuration.automatic_checkpoint_naming:
            raise CheckpointError("load_state() needs an input_dir unless ProjectConfiguration(automatic_checkpoint_naming=True).")
        latest = latest_checkpoint(Path(self.project_dir) / "checkpoints")
        if latest is None:
            raise CheckpointError(f"no complete checkpoint in {Path(self.project_dir) / 'checkpoints'}.")
        return latest


def _iteration(path: Path) -> int:
    """The number of an automatically named checkpoint (``checkpoint_<i>``, or ``.checkpoint_<i>.replaced``
    while it was being replaced); -1 for any other name, which automatic naming did not write."""
    match = re.fullmatch(r"\.?checkpoint_(\d+)(\.replaced)?", path.name)
    return int(match.group(1)) if match else -1
