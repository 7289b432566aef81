"""Lightning checkpoints in meshplan's layout-independent format, for every meshplan strategy.

``trainer.save_checkpoint``, ``ModelCheckpoint`` and ``fit(ckpt_path=...)`` work as usual; the
checkpoint is a directory of whole tensors that any meshplan strategy, on any number of
processes, can resume from. Lightning's own state (loops, callbacks, schedulers) is kept as
plain data next to the tensors and read back with ``weights_only=True``, then checked by type
before anything is loaded (``check_lightning_state``); each process's random number generators
are saved too, so dropout continues as in the uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.trainer.states import TrainerFn
from packaging.version import InvalidVersion, Version

from meshplan._compat.lightning import (CHECKPOINT_LOOPS, CHECKPOINT_TENSOR_PARTS, CHECKPOINT_VERSION_KEY, LEGACY_SCALER_KEY,
                                        checkpoint_key_of)
from meshplan.checkpoint.engines import deepspeed_counters, deepspeed_counters_problem, restore_deepspeed_counters
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
from meshplan.checkpoint.store import plain_data
from meshplan.errors import shown, shown_key


def save_lightning_checkpoint(strategy: Any, checkpoint: dict[str, Any], filepath: Any) -> None:
    """Saves the LightningModule, the optimizers (unless weights only) and Lightning's state. Collective."""
    state = plain_data({key: value for key, value in checkpoint.items() if key not in CHECKPOINT_TENSOR_PARTS})
    engine = _deepspeed_engine(strategy)
    if engine is not None:
        state["meshplan_deepspeed_counters"] = deepspeed_counters(engine)
    optimizers = _named_optimizers(strategy) if "optimizer_states" in checkpoint else {}
    save_training_state(
        filepath, {"module": strategy.lightning_module}, optimizers, state, rank_state=random_states(),
        manifest={"front_end": "lightning", "layout": repr(strategy.plan), "step": int(checkpoint.get("global_step", 0))},
    )


def load_lightning_checkpoint(strategy: Any, filepath: Any) -> dict[str, Any]:
    """Loads weights and optimizer state into the set-up strategy; returns Lightning's state. Collective.

    Lightning's state and this process's generator states are checked before anything is loaded:
    a crafted entry is a CheckpointError naming it, and the model is left as it was.
    """
    fitting = strategy.lightning_module.trainer.state.fn == TrainerFn.FITTING
    with CheckpointReader(filepath) as reader:
        state = reader.state()
        check_lightning_state(reader.path, state, _dict_entries(strategy), _live_schedulers(strategy),
                              _live_scalers(strategy))
        generators = saved_random_states(reader, strategy.global_rank)
        # Validating or testing from a checkpoint needs the weights only (even if optimizers linger from a fit).
        load_training_state(reader, {"module": strategy.lightning_module}, _named_optimizers(strategy) if fitting else {})
    if generators is not None:  # a checkpoint from fewer processes has none for this one
        set_random_states(generators)
    share_random_state_over(getattr(strategy, "device_mesh", None), "tensor_parallel")  # one stream per TP group again
    engine = _deepspeed_engine(strategy)
    if engine is not None:
        restore_deepspeed_counters(engine, state.get("meshplan_deepspeed_counters"), state.get("global_step", 0))
    return state


# A checkpoint older than Lightning 2.0 would be migrated by Lightning, editing loop states in
# place, and no meshplan checkpoint is that old.
_OLDEST_VERSION = Version("2.0.0")


def check_lightning_state(checkpoint: Path, state: dict[str, Any], dict_entries: Iterable[str] = (),
                          schedulers: Sequence[dict[str, Any]] = (), scalers: dict[str, dict[str, Any]] | None = None) -> None:
    """Refuses Lightning's state (``state.pt``) if an entry that meshplan or Lightning reads has the wrong type.

    Counters are non-negative integers, the loops, callbacks and scheduler states (and the
    ``dict_entries``: the precision plugin's and the datamodule's) are dicts; what they hold is
    Lightning's to read. Where the live objects are known, more is checked: each scheduler state
    against ``schedulers`` (the live schedulers' states, in order) as for Accelerate, its plain
    scalars from another torch version left out with a warning (``state`` is changed in place);
    each entry of ``scalers`` (entry name -> the live gradient scaler's state) as a scaler's
    state. A CheckpointError names the checkpoint and the entry.
    """
    def refuse(entry: str, problem: str | None) -> None:
        if problem is not None:
            raise state_error(checkpoint, STATE_FILE, entry, problem)

    version = state.get(CHECKPOINT_VERSION_KEY)
    refuse(CHECKPOINT_VERSION_KEY, kind_problem(version, str) or _version_problem(version))
    for name in ("epoch", "global_step"):
        if name in state:
            refuse(name, count_problem(state[name]))
    refuse("meshplan_deepspeed_counters", deepspeed_counters_problem(state.get("meshplan_deepspeed_counters")))
    if state.get("loops") is not None:
        refuse("loops", kind_problem(state["loops"], dict))
        for loop in CHECKPOINT_LOOPS:
            refuse(f"loops[{loop!r}]", kind_problem(state["loops"].get(loop), dict))
    if state.get("callbacks") is not None:
        refuse("callbacks", kind_problem(state["callbacks"], dict))
        for key, callback_state in state["callbacks"].items():
            refuse(f"callbacks[{shown(key)}]", kind_problem(callback_state, dict))
    if "lr_schedulers" in state:
        refuse("lr_schedulers", kind_problem(state["lr_schedulers"], list))
        skipped = []
        for index, scheduler_state in enumerate(state["lr_schedulers"]):
            refuse(f"lr_schedulers[{index}]", kind_problem(scheduler_state, dict))
            if index < len(schedulers):  # Lightning loads them pairwise, into the schedulers it has
                saved, stray = without_stray_scalars(scheduler_state, schedulers[index])
                refuse(f"lr_schedulers[{index}]", like_problem(saved, schedulers[index], "the scheduler"))
                state["lr_schedulers"][index] = saved
                if stray:
                    skipped.append((f"lr_schedulers[{index}]", stray))
        warn_skipped(checkpoint, STATE_FILE, skipped, "this torch's schedulers")
    for key in dict_entries:
        if key in state:
            refuse(shown_key(key), kind_problem(state[key], dict))
    for key, current in (scalers or {}).items():
        if key in state:
            refuse(shown_key(key), scaler_problem(state[key], current))


def _version_problem(version: str) -> str | None:
    try:
        too_old = len(version) > 64 or Version(version) < _OLDEST_VERSION
    except InvalidVersion:
        too_old = True
    return f"is {shown(version)}, not a Lightning version of at least {_OLDEST_VERSION}" if too_old else None


def _dict_entries(strategy: Any) -> list[str]:
    """The entries of Lightning's state that its precision plugin and the datamodule load as dicts."""
    owners = [strategy.precision_plugin, strategy.lightning_module.trainer.datamodule]
    return [checkpoint_key_of(owner) for owner in owners if owner is not None] + [LEGACY_SCALER_KEY]


def _live_schedulers(strategy: Any) -> list[dict[str, Any]]:
    """The states of the schedulers Lightning will load the checkpoint's into (none before they are configured)."""
    configs = getattr(strategy.lightning_module.trainer, "lr_scheduler_configs", None) or []
    return [config.scheduler.state_dict() for config in configs]


def _live_scalers(strategy: Any) -> dict[str, dict[str, Any]]:
    """The entries Lightning hands the precision plugin's gradient scaler, with the scaler's own state (none without one)."""
    plugin = strategy.precision_plugin
    if getattr(plugin, "scaler", None) is None:
        return {}
    current = plugin.scaler.state_dict()
    return {checkpoint_key_of(plugin): current, LEGACY_SCALER_KEY: current}


def _deepspeed_engine(strategy: Any) -> Any:
    return strategy.deepspeed_engine if isinstance(strategy, DeepSpeedStrategy) else None


def _named_optimizers(strategy: Any) -> dict[str, Any]:
    return {f"optimizer_{index}": optimizer for index, optimizer in enumerate(strategy.optimizers)}
