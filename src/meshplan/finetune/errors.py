"""The error `meshplan finetune` reports as bad input (exit code 2, one paragraph)."""


class FinetuneError(ValueError):
    """Bad input to a fine-tuning job: a model, data set or device count that cannot be used."""
