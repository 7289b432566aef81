"""Writes docs/tp-plans.md: which transformers architectures meshplan's tensor parallelism shards, and how.

    python scripts/tp_coverage.py                  # writes docs/tp-plans.md (under a minute on 2 cores)
    python scripts/tp_coverage.py --out FILE.md

For every model type in transformers' causal-LM, masked-LM and sequence-classification mappings,
the script builds the default config (cut to 2 layers) on the meta device, so no weights exist,
and asks ``meshplan.tp.shard.plan_models``, the function that Lightning, Accelerate and
``meshplan finetune`` call before sharding, for the model's plan. The table therefore says what
the code does: a row is "own plan", "inferred" or "not shardable" because plan_models said so.
tests/test_tp_plans.py checks the llama, bert and gpt2 rows against this script's classify().
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers.models.auto import modeling_auto

from meshplan.errors import PlanError
from meshplan.tp.plans import check_tp_size, tp_plan_source
from meshplan.tp.shard import plan_models

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "tp-plans.md"
COMMAND = "python scripts/tp_coverage.py"
TP_SIZE = 2
LAYERS = 2  # enough for `*` in a pattern to matter, few enough to build hundreds of models quickly

# The mappings whose model types the table lists, in the order a type's class is picked from them,
# each with the Auto class that builds its models (it also picks the text config of a composite one).
MAPPINGS = {
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "AutoModelForCausalLM"),
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES": (modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES, "AutoModelForMaskedLM"),
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES": (
        modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES, "AutoModelForSequenceClassification"),
}
# Shown on the page as what the table leaves out: types only in the seq2seq mapping.
SEQ2SEQ_MAPPING = modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

# Config fields that count layers, in the main config and in each sub-config.
_LAYER_FIELDS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers", "decoder_layers",
                 "num_encoder_layers", "num_decoder_layers")

OWN, INFERRED, REFUSED = "own plan", "inferred", "not shardable"
NOT_BUILT = "could not be built on meta"
PLANNING_FAILED = "planning failed (a meshplan bug)"
# Failures that may come from cutting the depth: tried again on the full default model.
_DEPTH_SENSITIVE = {NOT_BUILT, "plan names a non-module", "other"}


@dataclass(frozen=True)
class Row:
    """One model type's line in the table."""

    model_type: str
    architecture: str
    result: str  # OWN, INFERRED or REFUSED
    reason: str  # why REFUSED; for the others, how the plan was found
    category: str  # the reason in a few words, for the counts
    tp_size_check: str  # whether TP_SIZE divides the split sizes of the default config; "" when not shardable


def model_types() -> dict[str, tuple[str, str]]:
    """``{model type: (architecture class name, Auto class name)}``, from the first mapping that has the type."""
    picked: dict[str, tuple[str, str]] = {}
    for mapping, auto_class in MAPPINGS.values():
        for model_type, names in mapping.items():
            picked.setdefault(model_type, (names[0] if isinstance(names, (tuple, list)) else names, auto_class))
    return dict(sorted(picked.items()))


def classify(model_type: str) -> Row:
    """The table row for ``model_type``: its default model built on meta, planned by plan_models.

    A model that fails at 2 layers in a way the depth may explain (a plan naming layers only
    deeper models have, such as a hybrid's attention layers) is tried again at its full default
    depth, so that it is judged on the model its plan was written for.
    """
    architecture, auto_class = model_types()[model_type]
    row = _build_and_classify(model_type, architecture, auto_class, shrink=True)
    if row.category in _DEPTH_SENSITIVE:
        deep = _build_and_classify(model_type, architecture, auto_class, shrink=False)
        row = row if deep.category == NOT_BUILT else deep
    return row


def _build_and_classify(model_type: str, architecture: str, auto_class: str, *, shrink: bool) -> Row:
    try:
        model = build(model_type, auto_class, shrink=shrink)
    except Exception as error:  # noqa: BLE001 - any failure to build is a row of the table, not a crash
        return Row(model_type, architecture, REFUSED, f"{NOT_BUILT}: {type(error).__name__}", NOT_BUILT, "")
    return _classify_model(model_type, architecture, model)


def build(model_type: str, auto_class: str, *, shrink: bool) -> torch.nn.Module:
    """The default ``model_type`` model, built by ``auto_class`` on the meta device (no memory for weights)."""
    config = transformers.AutoConfig.for_model(model_type)
    if shrink:
        _shrink(config)
    with torch.device("meta"):
        return getattr(transformers, auto_class).from_config(config)


def _shrink(config: object, seen: set[int] | None = None) -> None:
    """Cuts every layer count in ``config`` and its sub-configs to LAYERS; widths stay, for the tp_size check."""
    seen = seen if seen is not None else set()
    if id(config) in seen:
        return
    seen.add(id(config))
    for field in _LAYER_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > LAYERS:
            setattr(config, field, LAYERS)
    for key in getattr(config, "sub_configs", None) or {}:
        sub_config = getattr(config, key, None)
        if isinstance(sub_config, transformers.PretrainedConfig):
            _shrink(sub_config, seen)


def _classify_model(model_type: str, architecture: str, model: torch.nn.Module) -> Row:
    try:
        source = tp_plan_source(model)
        plan_models(model, 1)  # every plan check; tp_size 1 divides everything, TP_SIZE is its own column
    except PlanError as error:
        category, reason = short_reason(str(error))
        return Row(model_type, architecture, REFUSED, reason, category, "")
    except Exception as error:  # noqa: BLE001 - not a PlanError: a meshplan bug, shown in the table
        reason = f"meshplan's planning raised {type(error).__name__}: {str(error)[:80]}"
        return Row(model_type, architecture, REFUSED, reason, PLANNING_FAILED, "")
    if source == "own":
        return Row(model_type, architecture, OWN, "its config's base_model_tp_plan", OWN, _tp_size_check(model))
    # plan_models raises for a model without a plan, so the only other source is "inferred"
    return Row(model_type, architecture, INFERRED, "BERT-family encoder", INFERRED, _tp_size_check(model))


def _tp_size_check(model: torch.nn.Module) -> str:
    try:
        check_tp_size(model, TP_SIZE)
    except PlanError as error:
        match = re.search(r"does not divide (\w+=\d+)", str(error))
        return f"no: {match.group(1) if match else error}"
    return "yes"


# (pattern over a PlanError's message, category, reason) for the errors plan_models raises.
_REASONS = [
    (r"no TP plan can work for it: its blocks' layers are ([\w ]+?) \(", "no nn.Linear layers",
     "no plan; its layers are {0}, not nn.Linear"),
    (r"no TP plan can work for it", "no nn.Linear layers", "no plan; no nn.Linear layers in its blocks"),
    (r"has no tensor-parallel plan", "no plan", "no plan (none in its config; not a BERT-family encoder)"),
    (r"tp_plan\['([^']*)'\]='([^']*)': meshplan cannot apply", "plan style meshplan does not apply",
     "its plan uses style {1} (on {0}), which meshplan does not apply"),
    (r"tp_plan pattern '([^']*)' matches no submodule", "plan names a non-module",
     "its plan's pattern {0} matches no module (a parameter, or a layer the model lacks)"),
    (r"tp_plan pattern '([^']*)' matches \S+, a (\w+) ", "plan shards a non-Linear module",
     "its plan shards {1} ({0}), which is not nn.Linear or nn.Embedding"),
]


def short_reason(message: str) -> tuple[str, str]:
    """``(category, reason)`` for a PlanError's message: its gist in a few words, for the table."""
    for pattern, category, reason in _REASONS:
        match = re.search(pattern, message)
        if match:
            return category, reason.format(*(f"`{group}`" for group in match.groups()))
    return "other", message.split(". ")[0][:160]


def write_page(rows: list[Row], path: Path) -> None:
    """docs/tp-plans.md: how it was made, the counts, then one row per model type."""
    path.write_text("\n".join(page_lines(rows)) + "\n")


def page_lines(rows: list[Row]) -> list[str]:
    """The page's lines (see write_page)."""
    counts = {result: sum(row.result == result for row in rows) for result in (OWN, INFERRED, REFUSED)}
    refused = [row.category for row in rows if row.result == REFUSED]
    reasons = ", ".join(f"{category}: {refused.count(category)}"
                        for category in sorted(set(refused), key=lambda c: (-refused.count(c), c)))
    divides = sum(row.tp_size_check == "yes" for row in rows)
    covered = set(model_types())
    seq2seq_only = sorted(set(SEQ2SEQ_MAPPING) - covered)
    encoder_decoders = sorted(set(SEQ2SEQ_MAPPING) & covered)
    return [
        "# Tensor-parallel plans by architecture",
        "",
        f"Generated by `{COMMAND}` with transformers {transformers.__version__} and torch {torch.__version__}; "
        f"do not edit it by hand. `tests/test_tp_plans.py` checks the llama, bert and "
        f"gpt2 rows against the code.",
        "",
        f"The table lists every model type in transformers' {', '.join(f'`{name}`' for name in MAPPINGS)} "
        f"({len(rows)} types), {len(encoder_decoders)} of them encoder-decoder models (those also in "
        f"`MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES`, such as bart and t5), each through the class these mappings "
        f"hold for it. For each type the script builds the default config, cut to {LAYERS} layers, on the meta "
        f"device, as the first class of the three mappings that has it, and asks `meshplan.tp.shard.plan_models` (the function Lightning, Accelerate and "
        f"`meshplan finetune` call before sharding) for its plan. A model that fails at {LAYERS} layers in a way "
        f"depth may explain (it cannot be built, or a plan pattern matches no module) is tried again at its full "
        f"default depth.",
        "",
        "- **own plan**: the model's config has a `base_model_tp_plan`, and meshplan can apply every entry.",
        "- **inferred**: no plan of its own; meshplan's BERT-family plan fits its structure.",
        "- **not shardable**: `plan_models` raises a PlanError (the reason column gives its gist), or the model "
        "could not be built on the meta device. A model without a plan whose blocks hold nn.Linear layers can "
        "still be sharded with a plan you pass (`TensorParallel(tp_size=2, tp_plan={...})`); the PlanError lists "
        "those layers.",
        "",
        f"The `tp_size={TP_SIZE}` column: whether {TP_SIZE} divides the default config's `num_attention_heads`, "
        f"`num_key_value_heads` and `intermediate_size`, which meshplan checks before sharding (a checkpoint's own "
        f"config may differ).",
        "",
        "What a row proves: the plan `plan_models` would apply, and that each of its patterns names an nn.Linear "
        "or nn.Embedding of the model with a style meshplan applies. No model is sharded or run here. meshplan's "
        "tests train Llama (own plan) and BERT/MiniLM (inferred) under tensor parallelism; for another model the "
        "attention code must also reshape with `-1` heads (see [tensor-parallel.md](tensor-parallel.md)).",
        "",
        f"**Counts**: own plan {counts[OWN]}, inferred {counts[INFERRED]}, not shardable {counts[REFUSED]} "
        f"({reasons}). `tp_size={TP_SIZE}` divides the default config of {divides} of the "
        f"{counts[OWN] + counts[INFERRED]} shardable ones.",
        "",
        f"Not listed: the {len(seq2seq_only)} types found only in `MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES` "
        f"({', '.join(seq2seq_only)}).",
        "",
        f"| model type | architecture tried | result | reason | tp_size={TP_SIZE} |",
        "| --- | --- | --- | --- | --- |",
        *(table_row(row) for row in rows),
    ]


def table_row(row: Row) -> str:
    """One model type's Markdown table row."""
    cells = (row.model_type, row.architecture, row.result, row.reason, row.tp_size_check or "-")
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def main(argv: list[str] | None = None) -> int:
    """Classifies every model type and writes the page; prints the counts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PAGE, help=f"the page to write (default {PAGE.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()  # default configs warn about token ids; the table is the output
    warnings.filterwarnings("ignore")
    start = time.monotonic()
    rows = []
    for model_type in model_types():
        rows.append(classify(model_type))
        print(f"{model_type}: {rows[-1].result} ({rows[-1].reason})", file=sys.stderr, flush=True)
    write_page(rows, args.out)
    counts = {result: sum(row.result == result for row in rows) for result in (OWN, INFERRED, REFUSED)}
    print(f"wrote {args.out} in {time.monotonic() - start:.0f} s: {len(rows)} model types; "
          + ", ".join(f"{result} {count}" for result, count in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
