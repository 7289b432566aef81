"""Defaults of `meshplan finetune` that its help shows: kept apart so that the CLI imports no transformers to print them."""

LEARNING_RATE = 1e-4
# LoRA trains a few small matrices that start from zero (and a classifier head from scratch): it
# wants a step ten times larger than full fine-tuning to get as far in the same number of steps.
LORA_LEARNING_RATE = 1e-3
LORA_R = 8
LORA_ALPHA = 16
LORA_TARGETS = "q,v"
