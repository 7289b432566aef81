"""TP plans for Hugging Face models: the model's own, an inferred one, or the user's.

A plan is plain data, ``{module pattern: style}``, in the syntax of transformers'
``base_model_tp_plan``. This module decides which plan a model gets and checks that the model's
shapes can be split ``tp_size`` ways; ``meshplan.tp.apply`` carries the plan out.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from meshplan.errors import PlanError
from meshplan.tp.apply import pattern_to_regex

# BERT-family encoders (BERT, RoBERTa, XLM-R, ELECTRA, MiniLM, ...) ship without a TP plan. Their
# layers share one structure, so one Megatron plan fits them all: Q, K, V and the MLP's first
# layer split by output column, the attention output and the MLP's second layer by input row.
BERT_FAMILY_PLAN = {
    "encoder.layer.*.attention.self.query": "colwise",
    "encoder.layer.*.attention.self.key": "colwise",
    "encoder.layer.*.attention.self.value": "colwise",
    "encoder.layer.*.attention.output.dense": "rowwise",
    "encoder.layer.*.intermediate.dense": "colwise",
    "encoder.layer.*.output.dense": "rowwise",
}

_EXAMPLE_PLAN = '{"encoder.layer.*.attention.self.query": "colwise", ..., "encoder.layer.*.output.dense": "rowwise"}'

# Config fields that the colwise/rowwise split divides by tp_size.
_SPLIT_FIELDS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def find_pretrained_models(root: nn.Module) -> list[tuple[str, PreTrainedModel]]:
    """The outermost ``PreTrainedModel`` instances inside ``root`` (``root`` itself included)."""
    found: list[tuple[str, PreTrainedModel]] = []
    # named_modules() walks outer modules first, so a model's own submodels come after it.
    for name, module in root.named_modules():
        if isinstance(module, PreTrainedModel) and not any(_is_inside(name, outer) for outer, _ in found):
            found.append((name, module))
    return found


def resolve_tp_plan(model: PreTrainedModel, user_plan: dict[str, str] | None = None) -> dict[str, str]:
    """The TP plan for ``model``, with patterns relative to ``model`` itself.

    Order: the user's plan (patterns relative to the base model, as in ``base_model_tp_plan``,
    or to the whole model), else the plan transformers resolved for the model, else a plan
    inferred from the model's structure.

    Raises:
        PlanError: the model has no plan and none can be inferred.
    """
    if user_plan is not None:
        plan = {_relative_to_model(model, pattern): style for pattern, style in user_plan.items()}
        return _keep_tied_embeddings_whole(model, plan, refuse=True)
    own_plan = dict(getattr(model, "_tp_plan", None) or {})
    if own_plan:
        return _keep_tied_embeddings_whole(model, own_plan, refuse=False)
    inferred = infer_tp_plan(model)
    if inferred is not None:
        return inferred
    raise PlanError(
        f"{type(model).__name__} has no tensor-parallel plan (its config has no base_model_tp_plan) and meshplan "
        f"cannot infer one from its structure. Pass one, in the syntax of base_model_tp_plan, with patterns relative "
        f"to the base model: TensorParallel(tp_size=2, tp_plan={_EXAMPLE_PLAN}). Styles: colwise, rowwise."
    )


def _keep_tied_embeddings_whole(model: PreTrainedModel, plan: dict[str, str], *, refuse: bool) -> dict[str, str]:
    """Drops (or, for a user's plan, refuses) entries that would shard one of two tied embeddings.

    Sharding gives each module a DTensor of its own, so the tie would silently break: the two
    copies would train apart, and the output one be discarded when the model is loaded again.
    """
    tied = _tied_embedding_names(model)
    hits = [pattern for pattern in plan if any(pattern_to_regex(pattern).match(name) for name in tied)]
    if hits and refuse:
        raise PlanError(
            f"tp_plan entries {hits} would shard {' and '.join(tied)} of {type(model).__name__}, which share one "
            f"weight (tie_word_embeddings=True); sharding breaks the tie. Leave both out of tp_plan."
        )
    return {pattern: style for pattern, style in plan.items() if pattern not in hits}


def _tied_embedding_names(model: PreTrainedModel) -> list[str]:
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is None or outputs is None or getattr(outputs, "weight", None) is not getattr(inputs, "weight", None):
        return []
    return [name for name, module in model.named_modules() if module is inputs or module is outputs]


def infer_tp_plan(model: PreTrainedModel) -> dict[str, str] | None:
    """A plan inferred from the module structure, or None when the structure is not recognised."""
    base = model.base_model
    prefix = "" if base is model else _module_name(model, base) + "."
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        return None
    names = {name for name, _ in layers[0].named_modules()}
    expected = {pattern.removeprefix("encoder.layer.*.") for pattern in BERT_FAMILY_PLAN}
    if not expected <= names:
        return None
    return {prefix + pattern: style for pattern, style in BERT_FAMILY_PLAN.items()}


def check_tp_size(model: PreTrainedModel, tp_size: int) -> None:
    """Raises a PlanError when ``tp_size`` does not divide a dimension that TP splits."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for field in _SPLIT_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and value % tp_size:
            raise PlanError(
                f"tp_size={tp_size} does not divide {field}={value} of {type(model).__name__}: each of the "
                f"{tp_size} tensor-parallel ranks must hold a whole number of them. Use a tp_size that divides "
                f"{value}."
            )


def _is_inside(name: str, outer: str) -> bool:
    return outer == "" or name == outer or name.startswith(outer + ".")


def _relative_to_model(model: PreTrainedModel, pattern: str) -> str:
    base = model.base_model
    if base is model:
        return pattern
    prefixed = f"{_module_name(model, base)}.{pattern}"
    regex = pattern_to_regex(prefixed)
    if any(regex.match(name) for name, _ in model.named_modules()):
        return prefixed
    return pattern


def _module_name(root: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in root.named_modules() if module is target)
