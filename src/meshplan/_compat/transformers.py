"""transformers internals meshplan relies on, each behind one small function, with a canary each.

Read from transformers 5.24.0. This module imports transformers only inside its canaries, so
that modules which must stay light (meshplan.finetune.output, checked by the CLI before any
model loads) can use it.

Public equivalents used instead (no wrapper, no canary): ``PreTrainedModel.tp_plan`` for
``model._tp_plan``; ``Trainer(callbacks=[...])`` for ``callback_handler.callbacks.insert``.
"""

from __future__ import annotations

import inspect
import re

from meshplan._compat import Internal, require_source

READ_FROM = "5.24.0"

# The file-name rule of PreTrainedModel.save_pretrained's clean-up of an earlier save, copied below.
_SHARD_NAME = re.compile(r"(.*?)-\d{5}-of-\d{5}")


def deleted_by_save_pretrained(name: str) -> bool:
    """Whether transformers' ``save_pretrained`` (safetensors) deletes a file of this name in the directory it saves to.

    It removes earlier weight shards: files whose name starts with "model" and, without
    ".safetensors" and ".bin", ends in ``-NNNNN-of-NNNNN`` (the clean-up in
    ``PreTrainedModel.save_pretrained``, read from transformers 5.24.0).
    """
    stem = name.replace(".bin", "").replace(".safetensors", "")
    return name.startswith("model") and _SHARD_NAME.fullmatch(stem) is not None


def _check_save_pretrained_clean_up() -> None:
    from transformers import PreTrainedModel
    from transformers.utils import SAFE_WEIGHTS_NAME

    assert SAFE_WEIGHTS_NAME == "model.safetensors", f"the weights file is now {SAFE_WEIGHTS_NAME!r}"
    source = inspect.getsource(PreTrainedModel.save_pretrained)
    snippets = ['filename.replace(".bin", "").replace(".safetensors", "")', f're.compile(r"{_SHARD_NAME.pattern}")',
                "reg.fullmatch(filename_no_suffix)", "filename.startswith(weights_no_suffix)", "os.remove(full_filename)"]
    missing = [snippet for snippet in snippets if snippet not in source]
    assert not missing, f"save_pretrained's clean-up of an earlier save no longer contains {', '.join(missing)}"


def _check_shipped_plan_styles() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from meshplan.plan import TP_STYLES

    config = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=16)
    with torch.device("meta"):  # no weights: only the plan transformers resolves for the model is read
        model = LlamaForCausalLM(config)
    plan = model.tp_plan
    assert plan, "LlamaForCausalLM(...).tp_plan is empty"
    unknown = sorted({style for style in plan.values() if style not in TP_STYLES})
    assert not unknown, f"Llama's plan now uses styles meshplan does not apply: {', '.join(unknown)}"


def _check_trainer_reads_the_deepspeed_flag() -> None:
    from transformers import training_args

    from meshplan._compat.accelerate import USE_DEEPSPEED

    require_source(training_args.TrainingArguments, f'strtobool(os.environ.get("{USE_DEEPSPEED}", "false"))')


INTERNALS: list[Internal] = [
    Internal("transformers", "PreTrainedModel.save_pretrained (copied clean-up rule)",
             "meshplan finetune refuses an --output holding weight shards that saving the model would delete",
             READ_FROM, _check_save_pretrained_clean_up),
    Internal("transformers", "PreTrainedModel.tp_plan styles (base_model_tp_plan vocabulary)",
             "meshplan applies a model's own TP plan, whose style names are transformers'",
             READ_FROM, _check_shipped_plan_styles),
    Internal("transformers", "TrainingArguments reads ACCELERATE_USE_DEEPSPEED",
             "meshplan.training_arguments() refuses a DDP layout in a process where the flag would make the Trainer "
             "run DeepSpeed (hf_trainer.py)", READ_FROM, _check_trainer_reads_the_deepspeed_flag),
]
