"""TP plans for Hugging Face models: the model's own, an inferred one, or the user's.

A plan is plain data, ``{module pattern: style}``, in the syntax of transformers'
``base_model_tp_plan``. This module decides which plan a model gets and checks that the model's
shapes can be split ``tp_size`` ways; ``meshplan.tp.apply`` carries the plan out.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from meshplan._compat.peft import is_modules_to_save
from meshplan.errors import PlanError
from meshplan.tp.apply import linear_layer_patterns, listed, pattern_to_regex, unshardable_layer_names

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

# Where resolve_tp_plan takes a model's plan from; "none" means it raises.
PLAN_SOURCES = ("user", "own", "inferred", "none")

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


def tp_plan_source(model: PreTrainedModel, user_plan: dict[str, str] | None = None) -> str:
    """Where ``resolve_tp_plan`` takes the plan for ``model`` from, one of ``PLAN_SOURCES``.

    "user": the plan passed; "own": the plan transformers resolved for the model from its
    config's ``base_model_tp_plan``; "inferred": meshplan's BERT-family plan; "none": no plan.
    """
    if user_plan is not None:
        return "user"
    if own_tp_plan(model):
        return "own"
    if infer_tp_plan(model) is not None:
        return "inferred"
    return "none"


def own_tp_plan(model: PreTrainedModel) -> dict[str, str]:
    """The plan transformers resolved for ``model`` (its ``tp_plan``), empty when it has none."""
    return dict(model.tp_plan or {})


def resolve_tp_plan(model: PreTrainedModel, user_plan: dict[str, str] | None = None) -> dict[str, str]:
    """The TP plan for ``model``, with patterns relative to ``model`` itself.

    Order: the user's plan (patterns relative to the base model, as in ``base_model_tp_plan``,
    or to the whole model), else the plan transformers resolved for the model, else a plan
    inferred from the model's structure (see ``tp_plan_source``).

    Raises:
        PlanError: the model has no plan and none can be inferred; the message shows a plan built
            from the model's own nn.Linear layers, or says that none can work.
    """
    source = tp_plan_source(model, user_plan)
    if source == "user":
        plan = {_relative_to_model(model, pattern): style for pattern, style in user_plan.items()}
        return _keep_tied_embeddings_whole(model, plan, refuse=True)
    if source == "own":
        return _without_trained_copies(model, _keep_tied_embeddings_whole(model, own_tp_plan(model), refuse=False))
    if source == "inferred":
        return _without_trained_copies(model, infer_tp_plan(model))
    raise _no_plan_error(model)


def _without_trained_copies(model: PreTrainedModel, plan: dict[str, str]) -> dict[str, str]:
    """Drops the entries of the model's own or inferred plan that name a module peft trains a whole copy of
    (``modules_to_save``): such copies stay whole on every rank. A user's plan naming one is refused
    (meshplan.peft.tp_plan_for_lora_layer)."""
    copies = [name for name, module in model.named_modules() if is_modules_to_save(module)]
    if plan is None or not copies:
        return plan
    return {pattern: style for pattern, style in plan.items()
            if not any(pattern_to_regex(pattern).match(name) for name in copies)}


def _no_plan_error(model: PreTrainedModel) -> PlanError:
    """Why ``model`` has no plan, and what works instead: a plan of its own nn.Linear layers, or DDP/ZeRO."""
    missing = f"{type(model).__name__} has no tensor-parallel plan (its config has no base_model_tp_plan)"
    patterns = linear_layer_patterns(model.base_model)  # relative to the base model, as a user plan is
    if not patterns:
        return PlanError(
            f"{missing}, and no TP plan can work for it: {_what_its_blocks_hold(model)}, and torch's tensor "
            f"parallel styles shard only nn.Linear and nn.Embedding. Use DDP or ZeRO for this model."
        )
    # A block's first layer is an attention input (colwise), its last the MLP's output (rowwise).
    example = f'"{patterns[0]}": "colwise"' + (f', ..., "{patterns[-1]}": "rowwise"' if len(patterns) > 1 else "")
    return PlanError(
        f"{missing} and meshplan cannot infer one from its structure (it infers plans for BERT-family encoders "
        f"only). Pass one, in the syntax of base_model_tp_plan, with patterns relative to the base model, built "
        f"from its nn.Linear layers ({listed(patterns)}): TensorParallel(tp_size=2, tp_plan={{{example}}}). "
        f"Styles: colwise for a layer whose output the next sharded layer takes (Q, K, V, the MLP's first), "
        f"rowwise for that next layer (the attention output, the MLP's second)."
    )


def _what_its_blocks_hold(model: PreTrainedModel) -> str:
    """For a model without nn.Linear layers in its blocks: the classes its blocks use instead (GPT-2's Conv1D)."""
    unshardable = unshardable_layer_names(model)
    if not unshardable:
        return "its blocks hold no nn.Linear layer"
    modules = dict(model.named_modules())
    classes = sorted({type(modules[name]).__name__ for name in unshardable})
    return f"its blocks' layers are {' and '.join(classes)} ({listed(unshardable, limit=2)}), not nn.Linear"


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
    for where, config in _sized_configs(model.config):
        for field in _SPLIT_FIELDS:
            value = getattr(config, field, None)
            if isinstance(value, int) and value % tp_size:
                raise PlanError(
                    f"tp_size={tp_size} does not divide {field}={value} of {type(model).__name__}{where}: each of "
                    f"the {tp_size} tensor-parallel ranks must hold a whole number of them. Use a tp_size that "
                    f"divides {value}."
                )


def _sized_configs(config: object) -> list[tuple[str, object]]:
    """``(where, config)`` for the configs that hold the sizes TP splits.

    The text model's config; a decoder's when a model has two text configs. A heterogeneous config
    (sizes that vary by layer) refuses to give a global size, so each layer's config is checked.
    """
    if hasattr(config, "get_text_config"):
        try:
            config = config.get_text_config()
        except ValueError:  # both a text encoder and a decoder: the decoder is the one trained
            config = config.get_text_config(decoder=True)
    if getattr(config, "is_heterogeneous", False):
        return [(f" (layer {index})", layer) for index, layer in enumerate(config.per_layer_config)]
    return [("", config)]


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
