"""Lightning checkpoints in meshplan's layout-independent format, for every meshplan strategy.

``trainer.save_checkpoint``, ``ModelCheckpoint`` and ``fit(ckpt_path=...)`` work as usual; the
checkpoint is a directory of whole tensors that any meshplan strategy, on any number of
processes, can resume from. Lightning's own state (loops, callbacks, schedulers) is kept as
plain data next to the tensors and read back with ``weights_only=True``; each process's random
number generators are saved too, so dropout continues as in the uninterrupted run.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.trainer.states import TrainerFn

from meshplan.checkpoint.engines import deepspeed_counters, restore_deepspeed_counters
from meshplan.checkpoint.random_state import random_states, set_random_states
from meshplan.checkpoint.sharded import load_training_state, save_training_state
from meshplan.checkpoint.store import plain_data

# The parts of Lightning's checkpoint dict that the tensors replace.
_TENSOR_PARTS = ("state_dict", "optimizer_states")


def save_lightning_checkpoint(strategy: Any, checkpoint: dict[str, Any], filepath: Any) -> None:
    """Saves the LightningModule, the optimizers (unless weights only) and Lightning's state. Collective."""
    state = plain_data({key: value for key, value in checkpoint.items() if key not in _TENSOR_PARTS})
    engine = _deepspeed_engine(strategy)
    if engine is not None:
        state["meshplan_deepspeed_counters"] = deepspeed_counters(engine)
    optimizers = _optimizers(strategy) if "optimizer_states" in checkpoint else {}
    save_training_state(
        filepath, {"module": strategy.lightning_module}, optimizers, state, rank_state=random_states(),
        manifest={"front_end": "lightning", "layout": repr(strategy.plan), "step": int(checkpoint.get("global_step", 0))},
    )


def load_lightning_checkpoint(strategy: Any, filepath: Any) -> dict[str, Any]:
    """Loads weights and optimizer state into the set-up strategy; returns Lightning's state. Collective."""
    fitting = strategy.lightning_module.trainer.state.fn == TrainerFn.FITTING
    # Validating or testing from a checkpoint needs the weights only (even if optimizers linger from a fit).
    reader = load_training_state(filepath, {"module": strategy.lightning_module}, _optimizers(strategy) if fitting else {})
    state = reader.state()
    saved_random_states = reader.rank_state(strategy.global_rank)
    if saved_random_states is not None:  # a checkpoint from fewer processes has none for this one
        set_random_states(saved_random_states)
    engine = _deepspeed_engine(strategy)
    if engine is not None:
        restore_deepspeed_counters(engine, state.get("meshplan_deepspeed_counters"), int(state.get("global_step", 0)))
    return state


def _deepspeed_engine(strategy: Any) -> Any:
    return strategy.deepspeed_engine if isinstance(strategy, DeepSpeedStrategy) else None


def _optimizers(strategy: Any) -> dict[str, Any]:
    return {f"optimizer_{index}": optimizer for index, optimizer in enumerate(strategy.optimizers)}
