"""A training script written for plain Accelerate; the only meshplan line is meshplan.accelerator().

``accelerate launch`` runs it through tests/scripts/accelerate_train.py (its command line);
meshplan.testing.spawn runs ``main`` with a strategy or recipe in hand, and the tests compute its
single-process reference with ``reference_run``.

``main`` trains the parity model for parity.STEPS steps on the global batch split over the
data-parallel ranks, and writes the global loss per step and the worst weight error against the
reference. With ``conformance=True`` (``--conformance``) it then exercises the rest of what an
Accelerate script calls (see ``_conformance``) and writes each outcome for the test to assert.
"""

from __future__ import annotations

import atexit
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

import meshplan
from meshplan._compat.accelerate import deepspeed_engine, release_accelerator

from . import parity

RESUME_AFTER = 2  # steps before the checkpoint that the script resumes from
EVAL_SIZE = 9  # no world size of the catalogue divides it: gather_for_metrics must drop the padding
EVAL_BATCH = 2  # per data-parallel rank
# Multiplies the loss before backward: the gradient norm rises above DeepSpeed's default clipping
# of 1.0 (the unscaled parity model's stays near 0.8), so a hidden clip departs from the reference.
HIGH_GRADIENT_SCALE = 4.0


def main(output: str, reference_path: str, strategy_or_recipe: object = None, clip: float | None = None,
         model_name: str = "llama", resume_from: str | None = None, loss_scale: float = 1.0,
         conformance: bool = False, end_training: bool = True, accumulation: int = 1) -> None:
    """Trains and writes the results; ``strategy_or_recipe`` goes to meshplan.accelerator(), and
    with ``clip`` the loop clips gradients with accelerator.clip_grad_norm_.

    The run saves its state after RESUME_AFTER steps (``state-step2`` next to ``output``) and at
    the end (``state-final``), then loads the first, trains the remaining steps again and reports
    how far those losses and weights are from the uninterrupted run's. With ``resume_from`` it
    instead starts from that checkpoint (saved under any layout) and trains the remaining steps.
    ``loss_scale`` multiplies the loss given to backward (the reported losses are unscaled); with
    ``accumulation`` each step accumulates that many micro-batches in ``accelerator.accumulate``.
    """
    if not end_training:
        # Registered before meshplan's own exit handler, so it runs after it (atexit is last in, first out).
        atexit.register(_report_process_group, Path(output).parent / f"atexit.{os.environ.get('RANK', '0')}")
    accelerator = meshplan.accelerator(strategy_or_recipe, **({"gradient_accumulation_steps": accumulation}
                                                             if accumulation > 1 else {}))
    data_parallel_size = accelerator.num_processes // getattr(accelerator, "tp_size", 1)
    model = parity.build_model(model_name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=parity.LEARNING_RATE[model_name], eps=parity.ADAM_EPS)
    # A constant schedule: prepared and checkpointed like any scheduler, without changing the parity.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    dataset = parity.TokenDataset(model_name)
    loader = DataLoader(dataset, batch_size=parity.GLOBAL_BATCH // (data_parallel_size * accumulation))
    eval_loader = DataLoader(Subset(dataset, range(EVAL_SIZE)), batch_size=EVAL_BATCH)
    model, optimizer, loader, eval_loader, scheduler = accelerator.prepare(model, optimizer, loader, eval_loader, scheduler)
    folder = Path(output).parent
    train = lambda batches, **kwargs: _train(accelerator, model, optimizer, scheduler, batches, clip, loss_scale, **kwargs)  # noqa: E731
    if resume_from:
        accelerator.load_state(resume_from)
        losses = train(accelerator.skip_first_batches(loader, RESUME_AFTER * accumulation))
        extra = {}
    else:
        losses = train(loader, save_after=(RESUME_AFTER, folder / "state-step2"))
        accelerator.save_state(str(folder / "state-final"))
        final = parity.full_parameters(accelerator.unwrap_model(model))
        accelerator.load_state(str(folder / "state-step2"))
        resumed_losses = train(accelerator.skip_first_batches(loader, RESUME_AFTER * accumulation))
        resumed = parity.full_parameters(accelerator.unwrap_model(model))
        extra = {"resumed_losses": resumed_losses,
                 "resume_weight_error": max((resumed[key] - final[key]).abs().max().item() for key in final)}
    weights = parity.full_parameters(accelerator.unwrap_model(model))
    _, reference = torch.load(reference_path, weights_only=True)
    weight_error = max((weights[key].cpu() - reference[key]).abs().max().item() for key in reference)
    if conformance:
        extra["conformance"] = _conformance(accelerator, model, eval_loader, loader, weights, folder, loss_scale, model_name)
    if accelerator.is_main_process:
        torch.save({key: value.cpu() for key, value in weights.items()}, folder / "weights.pt")
        Path(output).write_text(json.dumps({
            "losses": losses, "weight_error": weight_error, "num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type), "data_parallel_size": data_parallel_size, **extra,
        }))
    if end_training:
        accelerator.end_training()


def _report_process_group(path: Path) -> None:
    """At exit: whether a process group is still alive once meshplan's teardown has run."""
    path.write_text(str(torch.distributed.is_initialized()))


def _train(accelerator, model, optimizer, scheduler, loader, clip, loss_scale, save_after=None) -> list[float]:
    """One pass over ``loader``; the global loss of every optimizer step (the mean over its
    micro-batches). ``save_after=(k, folder)`` saves after step k."""
    losses, micro_losses = [], []
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss * loss_scale if loss_scale != 1.0 else loss)
            if clip is not None and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        micro_losses.append(loss.detach())
        if accelerator.sync_gradients:
            losses.append(accelerator.reduce(torch.stack(micro_losses).mean(), "mean").item())
            micro_losses = []
            if save_after is not None and len(losses) == save_after[0]:
                accelerator.save_state(str(save_after[1]))
    return losses


def _conformance(accelerator, model, eval_loader, loader, weights, folder: Path, loss_scale: float, model_name: str) -> dict:
    """The everyday calls after training, each with an outcome the test can check."""
    from meshplan import PlanError

    result: dict = {}
    model.eval()
    gathered = []
    with torch.no_grad():
        for batch in eval_loader:
            gathered.append(accelerator.gather_for_metrics(batch["input_ids"]).cpu())
    gathered = torch.cat(gathered)
    result["gathered_rows"] = len(gathered)
    result["gathered_equals_eval_set"] = torch.equal(gathered, parity.TokenDataset(model_name).input_ids[:EVAL_SIZE])
    # Python objects (decoded predictions, say) take Accelerate's gather_object path.
    objects = []
    for batch in eval_loader:
        objects += accelerator.gather_for_metrics([f"sample starting {int(row[0])}" for row in batch["input_ids"]])
    result["gathered_objects"] = objects
    model.train()
    result["reduce_sum_of_ones"] = accelerator.reduce(torch.ones((), device=accelerator.device), "sum").item()
    result["reduce_sum_of_counts"] = accelerator.reduce(torch.tensor(5, device=accelerator.device), "sum").tolist()
    # A trigger set on the main process alone must stop every process, or the others would wait forever.
    if accelerator.is_main_process:
        accelerator.set_trigger()
    seen = torch.tensor(float(accelerator.check_trigger()), device=accelerator.device)
    result["trigger_seen_by_every_rank"] = accelerator.reduce(seen, "mean").item() == 1.0
    result["clip"] = _clip_probe(accelerator, model, loader, loss_scale, PlanError)
    result["saves"] = _saves(accelerator, model, weights, folder)
    return result


def _clip_probe(accelerator, model, loader, loss_scale: float, plan_error: type) -> dict:
    """accelerator.clip_grad_norm_ after one more backward on the first batch (no optimizer step).

    DeepSpeed steps inside backward, so under ZeRO only the refusal of a max_norm that the recipe
    does not set is probed (before any backward).
    """
    if deepspeed_engine(accelerator) is not None:
        measured = float(accelerator.clip_grad_norm_(model.parameters(), float("inf")))
        try:
            accelerator.clip_grad_norm_(model.parameters(), 0.5)
        except plan_error as error:
            return {"refused": str(error), "measured": measured}
        return {"refused": None, "measured": measured}
    batch = next(iter(loader))
    accelerator.backward(model(**batch).loss * loss_scale)  # Accelerate divides it by the accumulation steps
    norm = accelerator.clip_grad_norm_(model.parameters(), 1e9)  # measures without clipping
    model.zero_grad()
    return {"norm": float(norm)}


def _saves(accelerator, model, weights: dict, folder: Path) -> dict:
    """get_state_dict (its error against the trained weights), then save_model and the save_pretrained
    pattern of the HF examples into ``folder`` (the test loads those with from_pretrained: loading
    here would run under DeepSpeed's ZeRO-3 initialisation, a collective)."""
    state = accelerator.get_state_dict(model)
    accelerator.save_model(model, folder / "save_model")
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(
        folder / "save_pretrained", is_main_process=accelerator.is_main_process, save_function=accelerator.save,
        state_dict=accelerator.get_state_dict(model),
    )
    if accelerator.is_main_process:
        unwrapped.config.save_pretrained(folder / "save_model")  # save_model writes the weights only
    accelerator.wait_for_everyone()
    return {"get_state_dict": _error(state, weights)} if accelerator.is_main_process else {}


def _error(tensors: dict, weights: dict) -> float | str:
    """The largest difference from the trained weights, or which weight is missing."""
    missing = sorted(set(weights) - set(tensors))
    if missing:
        return f"missing {missing[:3]}"
    return max((tensors[key].detach().float().cpu() - weights[key].float().cpu()).abs().max().item() for key in weights)


def reference_run(loss_scale: float, model_name: str = "llama",
                  clip: float | None = None) -> tuple[list[float], dict[str, torch.Tensor], list[float]]:
    """The single-process reference of ``main`` with ``loss_scale`` on the global batch, clipping the
    gradient norm at ``clip`` (None: no clipping).

    Returns the losses, the final weights and the gradient norm of every step (before clipping).
    """
    model = parity.build_model(model_name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=parity.LEARNING_RATE[model_name], eps=parity.ADAM_EPS)
    losses, norms = [], []
    for batch in DataLoader(parity.TokenDataset(model_name), batch_size=parity.GLOBAL_BATCH):
        loss = model(**batch).loss
        (loss * loss_scale).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf") if clip is None else clip).item())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, {key: value.detach().clone() for key, value in model.named_parameters()}, norms


def first_batch_gradient_norm(weights: dict[str, torch.Tensor], loss_scale: float, accumulation: int = 1,
                              model_name: str = "llama") -> float:
    """The gradient norm, at ``weights``, of the first micro-batch's loss (over all data-parallel
    ranks) times ``loss_scale / accumulation``, in one process."""
    model = parity.build_model(model_name)
    model.load_state_dict(weights, strict=False)
    batch = next(iter(DataLoader(parity.TokenDataset(model_name), batch_size=parity.GLOBAL_BATCH // accumulation)))
    (model(**batch).loss * loss_scale / accumulation).backward()
    return torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item()



def tear_down(accelerator: Any) -> None:
    """Frees what one Accelerator built, so that the next in the same processes starts from nothing
    (the process group stays): meshplan._compat.accelerate.release_accelerator."""
    release_accelerator(accelerator)


def forward_precision(layouts: list[Any]) -> list[dict[str, Any]]:
    """Per layout: what a bf16 ``meshplan.accelerator`` computes in, and the loss of the first batch
    beside the fp32 loss of the same weights (a spawn worker)."""
    from transformers import LlamaForCausalLM

    results = []
    for layout in layouts:
        losses = {}
        for precision in ("no", "bf16"):
            torch.manual_seed(0)
            model = LlamaForCausalLM(parity.tiny_llama_config())
            optimizer = torch.optim.AdamW(model.parameters())
            accelerator = meshplan.accelerator(layout, mixed_precision=precision)
            model, optimizer = accelerator.prepare(model, optimizer)
            computed: list[torch.dtype] = []
            inner = accelerator.unwrap_model(model).model.layers[0].mlp.down_proj
            hook = inner.register_forward_hook(lambda module, inputs, output: computed.append(output.dtype))
            ids = torch.arange(16).reshape(2, 8) % 64
            output = model(input_ids=ids, labels=ids)
            hook.remove()
            losses[precision] = (output.loss.item(), str(computed[0]), str(output.logits.dtype))
            tear_down(accelerator)
        results.append(losses)
    return results
