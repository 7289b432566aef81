"""Tensor parallelism for Hugging Face models: plans as data (plans.py), applied with DTensor (apply.py)."""
