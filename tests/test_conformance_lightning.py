"""The Lightning conformance matrix: an ordinary Lightning script's everyday APIs under every layout.

Two spawns carry every cell (process start-up dominates the cost): one of 2 workers runs the
whole script of tests/helpers/conformance_lightning.py under ddp, zero1, zero2, zero3, zero3-offload,
tp and fsdp2 (ZeRO-3 on FSDP2) in turn, one of 4 workers under tp-dp (TP 2 x DP 2) and tp-fsdp
(TP 2 x FSDP2 2). The ``+lora`` layouts (ddp, zero3, tp, tp-dp) run the same script on the model
wrapped in peft LoRA adapters. Each test below asserts one group
of cells for every layout against numbers computed here, in one process, and then records the
cells it proved in the conformance matrix (tests/helpers/matrix.py).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from helpers import conformance_lightning as script
from helpers import matrix, parity
from helpers.conformance_lightning import ACCUMULATE, CLIP_BY_MODEL, EPOCHS, GAMMA, LEARNING_RATE, STEPS_PER_EPOCH, eval_set
from meshplan.testing import spawn

TWO_PROCESS_LAYOUTS = ["ddp", "zero1", "zero2", "zero3", "zero3-offload", "tp", "fsdp2", "ddp+lora", "zero3+lora", "tp+lora"]
FOUR_PROCESS_LAYOUTS = ["tp-dp", "tp-fsdp", "tp-dp+lora"]
LAYOUTS = TWO_PROCESS_LAYOUTS + FOUR_PROCESS_LAYOUTS
STEPS = EPOCHS * STEPS_PER_EPOCH
# Tolerances with AdamW eps=1e-6 (parity.ADAM_EPS). The noise floor there (DESIGN.md) is 5.6e-6
# in the weights after 2 steps for a merely re-split batch; the 4 steps here stay under 1e-5.
LOSS_TOLERANCE = parity.LOSS_TOLERANCE
WEIGHT_TOLERANCE = parity.WEIGHT_TOLERANCE
EVAL_TOLERANCE = 1e-5  # one forward pass in fp32: only the order of the sums differs
# bf16 keeps 8 bits of mantissa (relative error 2^-8 = 0.4%): on losses near 4.1 one rounding
# is about 0.016 at worst; measured differences are 1e-4 to 3e-4 (the losses are fp32 and near ln 64).
BF16_LOSS_TOLERANCE = 5e-3
BF16_VISIBLE = 1e-5  # two fp32 runs agree to 5e-7: a larger difference shows that bf16 was used


# ---------------------------------------------------------------- the single-process reference


def _reference_run(clip: float | None, model_name: str = "llama") -> dict[str, Any]:
    """The main run in one plain PyTorch loop: accumulate, clip, step AdamW, step StepLR."""
    model = parity.build_model(model_name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, eps=parity.ADAM_EPS)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=GAMMA)
    losses, norms, lrs = [], [], []
    loader = DataLoader(parity.TokenDataset("llama"), batch_size=parity.GLOBAL_BATCH)
    for _ in range(EPOCHS):
        for index, batch in enumerate(loader):
            loss = model(**batch).loss
            (loss / ACCUMULATE).backward()
            losses.append(loss.item())
            if (index + 1) % ACCUMULATE == 0:
                norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip or math.inf).item())
                lrs.append(optimizer.param_groups[0]["lr"])
                optimizer.step()
                optimizer.zero_grad()
                scheduler.step()
    weights = {name: tensor.detach().numpy().copy() for name, tensor in model.named_parameters()}
    return {"losses": losses, "norms": norms, "lrs": lrs, "lr_after": optimizer.param_groups[0]["lr"], "weights": weights}


@pytest.fixture(scope="module")
def references() -> dict[str, dict[str, Any]]:
    """The reference run of each model the layouts train (the plain Llama, and its LoRA model)."""
    return {model: _reference_run(clip, model) for model, clip in CLIP_BY_MODEL.items()}


@pytest.fixture(scope="module")
def reference(references: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return references["llama"]


def _plain_model(weights: dict[str, np.ndarray], model_name: str = "llama") -> torch.nn.Module:
    """A plain, single-process model (parity.build_model's ``model_name``) holding ``weights``."""
    model = parity.build_model(model_name)
    model.load_state_dict({name: torch.from_numpy(value) for name, value in weights.items()}, strict=not model_name.endswith("-lora"))
    loaded = {name for name, _ in model.named_parameters()}
    assert loaded == set(weights), "the weights are not those of the model"
    return model.eval()


@torch.no_grad()
def _plain_eval(weights: dict[str, np.ndarray], model_name: str = "llama") -> dict[str, float]:
    """Validation and test loss of a plain model holding ``weights``."""
    model = _plain_model(weights, model_name)

    def loss(name: str) -> float:
        ids = eval_set(name).input_ids
        return model(input_ids=ids, labels=ids).loss.item()

    return {"val_loss": loss("val"), "test_loss": loss("test")}


def _weight_error(weights: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(weights[name] - reference[name]).max()) for name in reference)


# ---------------------------------------------------------------- the runs under every layout


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, deepspeed_ops: None) -> dict[str, dict[str, Any]]:
    """Rank 0's measurements per layout (the predictions of every rank are in them)."""
    folder = tmp_path_factory.mktemp("lightning-conformance")
    measured: dict[str, dict[str, Any]] = {}
    for layouts, processes in ((TWO_PROCESS_LAYOUTS, 2), (FOUR_PROCESS_LAYOUTS, 4)):
        ranks = spawn(script.run_layouts, processes, layouts, str(folder), timeout=600)
        measured.update(ranks[0])
    return measured


@pytest.fixture(scope="module")
def trained_eval(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per layout: the plain model's eval numbers with the weights that layout trained."""
    return {layout: _plain_eval(result["weights"], script.model_name(layout)) for layout, result in results.items()}


def _rows(predictions: dict[int, list]) -> list[int]:
    """Every predicted sample index, over the data-parallel ranks."""
    return sorted(index for rows in predictions.values() for index, _ in rows)


def _gathers_in_forward(layout: str) -> bool:
    """True for the layouts whose forward pass gathers parameters from every data-parallel process."""
    return layout.startswith("zero3") or layout in ("fsdp2", "tp-fsdp")


def _engine_layout(layout: str) -> str:
    """The layout without its model: ``zero3`` for ``zero3+lora``."""
    return layout.removesuffix(script.LORA_SUFFIX)


# A forward pass of these layouts is collective: 9 predict samples in batches of 4 give data-parallel
# rank 0 two batches and rank 1 one, which they refuse (by world rank).
UNEVEN_PREDICT_COUNTS = {"zero3": "[2, 1]", "zero3-offload": "[2, 1]", "fsdp2": "[2, 1]", "tp-fsdp": "[2, 2, 1, 1]"}
REFUSING_ENGINE = {"zero3": "ZeRO stage 3", "zero3-offload": "ZeRO stage 3", "fsdp2": "FSDP2", "tp-fsdp": "FSDP2"}


# ---------------------------------------------------------------- the cells


@pytest.mark.slow  # trains the tiny model in this process
@pytest.mark.parametrize("model", ["llama", "llama-lora"])
def test_the_reference_clips_and_accumulates(model: str, references: dict[str, dict[str, Any]]) -> None:
    # Otherwise the clipping cells would prove nothing: the norm is above the threshold at every
    # step, and clipping moves the reference's weights far beyond the parity tolerance.
    reference = references[model]
    assert min(reference["norms"]) > 2 * CLIP_BY_MODEL[model]
    assert _weight_error(reference["weights"], _reference_run(None, model)["weights"]) > 10 * WEIGHT_TOLERANCE
    assert len(reference["losses"]) == ACCUMULATE * STEPS and len(reference["norms"]) == STEPS


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fit_accumulates_clips_and_schedules_as_one_process(layout: str, results: dict, references: dict) -> None:
    result, reference = results[layout], references[script.model_name(layout)]
    assert result["global_step"] == STEPS  # one optimizer step per ACCUMULATE batches
    errors = [abs(a - b) for a, b in zip(result["losses"], reference["losses"], strict=True)]
    assert max(errors) < LOSS_TOLERANCE, f"losses {result['losses']} vs {reference['losses']}"
    assert _weight_error(result["weights"], reference["weights"]) < WEIGHT_TOLERANCE
    assert result["lr_after"] == pytest.approx(LEARNING_RATE * GAMMA**STEPS, rel=1e-12)
    matrix.record("Lightning", layout, {"trainer.fit": matrix.WORKS, "accumulate_grad_batches": matrix.WORKS,
                                        "gradient_clip_val": matrix.WORKS, "LR scheduler": matrix.WORKS,
                                        'precision "32-true"': matrix.WORKS})


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["same_trainer", "new_trainer"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_validate_test_and_predict_after_fit(layout: str, trainer: str, results: dict, trained_eval: dict) -> None:
    measured, expected = results[layout][trainer], trained_eval[layout]
    assert measured["val_loss"] == pytest.approx(expected["val_loss"], abs=EVAL_TOLERANCE)
    assert measured["test_loss"] == pytest.approx(expected["test_loss"], abs=EVAL_TOLERANCE)
    samples = script.PREDICT_SAMPLES
    if _gathers_in_forward(layout):  # refused, then 8 samples predicted
        refused = measured["predict_refused"]
        engine = _engine_layout(layout)
        assert REFUSING_ENGINE[engine] in refused and UNEVEN_PREDICT_COUNTS[engine] in refused, refused
        samples = script.EVEN_PREDICT_SAMPLES
    else:
        assert measured["predict_refused"] is None
    assert _rows(measured["predictions"]) == list(range(samples))  # each sample exactly once
    plain_logits = _plain_logits(results[layout]["weights"], samples, script.model_name(layout))
    for rows in measured["predictions"].values():
        for index, logits in rows:
            np.testing.assert_allclose(logits, plain_logits[index], atol=EVAL_TOLERANCE)
    where = "after fit" if trainer == "same_trainer" else "on a new Trainer after fit"
    predict = "trainer.predict (exact count)"
    cells = {f"trainer.validate {where}": matrix.WORKS, f"trainer.test {where}": matrix.WORKS,
             f"{predict} {where}": matrix.WORKS}
    if _gathers_in_forward(layout):
        cells[f"{predict} {where}, uneven batches per rank"] = matrix.refused(
            f"a forward pass is collective under {REFUSING_ENGINE[_engine_layout(layout)]}")
    matrix.record("Lightning", layout, cells)


@pytest.mark.slow
def test_a_sharded_module_refuses_another_tp_size(results: dict) -> None:
    # The module keeps the sharding of its first run; a Trainer with another tp_size must say so
    # (before any collective) instead of sharding it twice.
    message = results["tp"]["resharded"]
    assert "already sharded by TensorParallel over 2 processes" in message and "tp_size=1" in message
    matrix.record("Lightning", "tp", {"trainer.validate after fit with another tp_size": matrix.refused(
        "a sharded module keeps its tp_size")})


@pytest.mark.slow
def test_an_fsdp2_sharded_module_refuses_tensor_parallel(results: dict) -> None:
    message = results["fsdp2"]["resharded"]
    assert "already sharded by ZeRO(stage=3, engine='fsdp2') and cannot be re-sharded as TensorParallel" in message
    matrix.record("Lightning", "fsdp2", {"trainer.validate after fit with another layout": matrix.refused(
        "a sharded module keeps its layout")})


@pytest.mark.slow
def test_fsdp2_evaluates_outside_inference_mode(results: dict) -> None:
    # Lightning evaluates under torch.inference_mode on GPUs, where the first gather of FSDP2 over one
    # process (one GPU) fails; the strategy's evaluation steps leave inference mode for no_grad, with
    # the same logits.
    measured = results["fsdp2"]["inference_mode"]
    assert "Inference tensors do not track version counter" in measured["bare_error"]
    untrained = _plain_logits(_untrained_weights(), script.EVEN_PREDICT_SAMPLES)[: script.PREDICT_BATCH]
    np.testing.assert_allclose(measured["logits"], untrained, atol=EVAL_TOLERANCE)


@torch.no_grad()
def _plain_logits(weights: dict[str, np.ndarray], samples: int, model_name: str = "llama") -> np.ndarray:
    """The last-position logits of a plain model holding ``weights`` on the first ``samples`` predict rows."""
    return _plain_model(weights, model_name)(input_ids=eval_set("predict", samples).input_ids).logits[:, -1].numpy()


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_validate_and_test_load_the_weights_of_a_checkpoint(layout: str, results: dict, trained_eval: dict) -> None:
    # A new module on a new Trainer: the losses are the trained model's only if the weights were loaded.
    measured, expected = results[layout]["from_checkpoint"], trained_eval[layout]
    assert measured["val_loss"] == pytest.approx(expected["val_loss"], abs=EVAL_TOLERANCE)
    assert measured["test_loss"] == pytest.approx(expected["test_loss"], abs=EVAL_TOLERANCE)
    model = script.model_name(layout)
    # The untrained model is far from the trained one (LoRA moves the loss least: by 4.9e-4, 49 tolerances).
    assert abs(_plain_eval(_untrained_weights(model), model)["val_loss"] - expected["val_loss"]) > 10 * EVAL_TOLERANCE
    matrix.record("Lightning", layout, {"trainer.validate(ckpt_path=...)": matrix.WORKS,
                                        "trainer.test(ckpt_path=...)": matrix.WORKS})


def _untrained_weights(model_name: str = "llama") -> dict[str, np.ndarray]:
    return {name: tensor.detach().numpy() for name, tensor in parity.build_model(model_name).named_parameters()}


def _csv_values(rows: list[dict[str, str]], column: str) -> dict[int, float]:
    """The logged values of ``column`` by step (one value per step, checked)."""
    values: dict[int, set[float]] = {}
    for row in rows:
        if row.get(column):
            values.setdefault(int(row["step"]), set()).add(float(row[column]))
    assert all(len(logged) == 1 for logged in values.values()), f"{column} logged twice at one step: {values}"
    return {step: logged.pop() for step, logged in values.items()}


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_model_checkpoint_keeps_the_expected_checkpoints(layout: str, results: dict) -> None:
    result = results[layout]
    val_losses = _csv_values(result["csv"], "val_loss")  # by step: one validation per epoch
    assert sorted(val_losses) == [STEPS_PER_EPOCH * (epoch + 1) - 1 for epoch in range(EPOCHS)]
    best_epoch = int(np.argmin([val_losses[step] for step in sorted(val_losses)]))
    best_loss = min(val_losses.values())
    assert result["best_model_score"] == pytest.approx(best_loss, abs=1e-6)
    assert result["checkpoints"] == {
        "every": [f"step={step}.ckpt" for step in range(2, STEPS + 1, 2)],  # every_n_train_steps=2
        "best": sorted([f"epoch={best_epoch}-val_loss={best_loss:.4f}.ckpt", "last.ckpt"]),  # top 1 and last
    }
    matrix.record("Lightning", layout, {"ModelCheckpoint (every_n_train_steps, save_last, save_top_k)": matrix.WORKS})


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_learning_rate_monitor_and_csv_logger_log_every_step(layout: str, results: dict, references: dict) -> None:
    reference = references[script.model_name(layout)]
    rows = results[layout]["csv"]
    lr_columns = sorted({column for row in rows for column, value in row.items() if column.startswith("lr-") and value})
    assert len(lr_columns) == 1, lr_columns
    logged = _csv_values(rows, lr_columns[0])
    assert list(logged) == list(range(STEPS))
    assert [logged[step] for step in range(STEPS)] == pytest.approx(reference["lrs"], rel=1e-12)
    matrix.record("Lightning", layout, {"LearningRateMonitor": matrix.WORKS, "CSVLogger": matrix.WORKS})


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sync_dist_logs_the_mean_over_ranks(layout: str, results: dict) -> None:
    result = results[layout]
    mean_rank = (result["world_size"] + 1) / 2  # every rank logs its rank + 1
    assert result["rank_value"] == mean_rank
    assert set(_csv_values(result["csv"], "rank_value").values()) == {mean_rank}
    matrix.record("Lightning", layout, {"self.log(sync_dist=True)": matrix.WORKS})


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fit_resumes_from_last_as_if_never_stopped(layout: str, results: dict) -> None:
    result, resumed = results[layout], results[layout]["resume"]
    assert resumed["interrupted_step"] == STEPS_PER_EPOCH
    assert resumed["global_step"] == STEPS
    # The resumed Trainer runs the second epoch only: its batches' losses are the uninterrupted run's.
    errors = [abs(a - b) for a, b in zip(resumed["losses"], result["losses"][ACCUMULATE * STEPS_PER_EPOCH:], strict=True)]
    assert max(errors) < LOSS_TOLERANCE
    assert _weight_error(resumed["weights"], result["weights"]) < WEIGHT_TOLERANCE
    matrix.record("Lightning", layout, {'resume with ckpt_path="last"': matrix.WORKS})


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_early_stopping_stops_after_patience(layout: str, results: dict) -> None:
    run = results[layout]["bf16"]
    # The monitored value never improves after epoch 0: with patience 1 training stops after epoch 1 of 10.
    assert run["stopped_epoch"] == 1
    assert run["current_epoch"] == 2 and run["global_step"] == 2 * STEPS_PER_EPOCH
    matrix.record("Lightning", layout, {"EarlyStopping": matrix.WORKS})


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bf16_mixed_trains_close_to_fp32(layout: str, results: dict) -> None:
    run, fp32 = results[layout]["bf16"], results[layout]["losses"]
    differences = [abs(a - b) for a, b in zip(run["losses"], fp32, strict=True)]
    assert max(differences) < BF16_LOSS_TOLERANCE
    assert max(differences) > BF16_VISIBLE
    if layout.startswith("zero"):  # fsdp2 (ZeRO on FSDP2) runs Lightning's bf16-mixed, as TP does
        # DeepSpeed's bf16 mode: the module's weights are bf16, the optimizer's master copy fp32.
        assert run["parameter_dtypes"] == ["torch.bfloat16"] and run["master_dtype"] == "torch.float32"
    else:
        # Lightning's bf16-mixed: fp32 weights, bf16 autocast in forward.
        assert run["parameter_dtypes"] == ["torch.float32"] and run["master_dtype"] is None
    matrix.record("Lightning", layout, {'precision "bf16-mixed"': matrix.WORKS})


def test_zero3_batch_check_counts_the_batches_each_stage_runs() -> None:
    import lightning.pytorch as pl

    from meshplan.lightning.base import _STAGE_LIMITS, _batches_run

    trainer = pl.Trainer(accelerator="cpu", devices=1, limit_val_batches=0.5, limit_predict_batches=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    assert _batches_run(5, trainer.limit_val_batches) == 2
    assert _batches_run(5, trainer.limit_predict_batches) == 3
    assert _batches_run(5, trainer.limit_train_batches) == 5  # the default 1.0: every batch
    # The sanity check prepares the loader that every validation of the fit reuses: the check
    # must compare the batches validation runs (5 against 4 hangs), not the 2 sanity steps.
    assert _STAGE_LIMITS["sanity_check"][0] == "limit_val_batches"
