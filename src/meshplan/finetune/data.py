"""Data for `meshplan finetune`: the shipped review set, a local CSV/JSON file, or a `datasets` data set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from datasets import ClassLabel, Dataset, DatasetDict, load_dataset, load_from_disk

from meshplan.finetune.errors import FinetuneError

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
DEFAULT_DATA = "reviews"  # the shipped product-review sentiment set
DEFAULT_LABEL_NAMES = ("negative", "positive")
TEXT_COLUMNS = ("text", "sentence", "content", "review", "document")
LABEL_COLUMNS = ("label", "labels", "label_id", "class")


def load_splits(data: str | None) -> DatasetDict:
    """Loads ``data`` as train and test splits (a held-out 20% when the data has no test split)."""
    if data in (None, DEFAULT_DATA):
        files = {split: str(DATA_DIR / f"reviews-{split}.csv") for split in ("train", "test")}
        return load_dataset("csv", data_files=files)
    splits = _load(data)
    if isinstance(splits, Dataset):
        splits = DatasetDict({"train": splits})
    if "train" not in splits:
        raise FinetuneError(f"data set {data!r} has no 'train' split (it has {', '.join(splits)}).")
    # GLUE-style test splits hide their labels (-1): such a split cannot measure accuracy.
    held_out = next((name for name in ("test", "validation") if name in splits and not _labels_hidden(splits[name])), None)
    if held_out is None:
        split = splits["train"].train_test_split(test_size=0.2, seed=0)
        return DatasetDict({"train": split["train"], "test": split["test"]})
    return DatasetDict({"train": splits["train"], "test": splits[held_out]})


def _labels_hidden(split: Dataset) -> bool:
    label = next((name for name in LABEL_COLUMNS if name in split.column_names), None)
    return label is not None and len(split) > 0 and all(value == -1 for value in split[label][:100])


def _load(data: str) -> Dataset | DatasetDict:
    path = Path(data)
    suffix = path.suffix.lower()
    if path.is_file() and suffix in (".csv", ".json", ".jsonl"):
        return _loaded(lambda: load_dataset("csv" if suffix == ".csv" else "json", data_files=str(path)), data)
    if path.is_dir():
        return _loaded(lambda: load_from_disk(str(path)), data)
    if path.suffix or "/" in data and not _looks_like_hub_name(data):
        raise FinetuneError(f"data {data!r} does not exist; pass a CSV or JSON file, a saved data set directory, "
                            f"or the name of a data set in the `datasets` cache.")
    return _loaded(lambda: load_dataset(data), data)


def _looks_like_hub_name(data: str) -> bool:
    return data.count("/") == 1 and not data.startswith((".", "/"))


def _loaded(load: Any, data: str) -> Dataset | DatasetDict:
    try:
        return load()
    except Exception as error:  # noqa: BLE001 - any loader failure is bad input here
        raise FinetuneError(f"data {data!r} could not be loaded: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None


def find_columns(dataset: Dataset, task: str, data: str | None) -> tuple[str, str | None]:
    """The text column, and the label column for classification; a FinetuneError names what is missing."""
    columns = dataset.column_names
    text = next((name for name in TEXT_COLUMNS if name in columns), None)
    if text is None:
        raise FinetuneError(f"data {data or DEFAULT_DATA!r} has no text column: it has {', '.join(columns)}; "
                            f"name the text column one of {', '.join(TEXT_COLUMNS)}.")
    if task != "classification":
        return text, None
    label = next((name for name in LABEL_COLUMNS if name in columns), None)
    if label is None:
        raise FinetuneError(f"data {data or DEFAULT_DATA!r} has no label column for classification: it has "
                            f"{', '.join(columns)}; name the label column one of {', '.join(LABEL_COLUMNS)}.")
    return text, label


def label_names(splits: DatasetDict, label: str, data: str | None) -> list[str]:
    """The class names, in label-id order."""
    feature = splits["train"].features[label]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    values = sorted({value for split in splits.values() for value in split[label]}, key=str)
    if data in (None, DEFAULT_DATA):
        return list(DEFAULT_LABEL_NAMES)
    if all(isinstance(value, int) for value in values):
        return [str(value) for value in range(max(values) + 1)]
    return [str(value) for value in values]


def encode(splits: DatasetDict, tokenizer: Any, text: str, label: str | None, names: list[str] | None,
           max_length: int) -> DatasetDict:
    """Tokenizes to fixed-length tensors: input_ids, attention_mask and labels."""
    ids = {name: index for index, name in enumerate(names or [])}

    def _encode(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(batch[text], truncation=True, max_length=max_length, padding="max_length")
        if label is not None:
            encoded["labels"] = [value if isinstance(value, int) else ids[str(value)] for value in batch[label]]
        else:  # causal LM: predict every real token
            encoded["labels"] = [[token if keep else -100 for token, keep in zip(tokens, mask)]
                                 for tokens, mask in zip(encoded["input_ids"], encoded["attention_mask"])]
        return encoded

    columns = splits["train"].column_names
    encoded = splits.map(_encode, batched=True, remove_columns=columns)
    return encoded.with_format("torch", columns=["input_ids", "attention_mask", "labels"])


class StepSampler(torch.utils.data.Sampler):
    """The training examples of one data-parallel rank, step by step, for the whole run.

    The run is one long sequence of global batches: passes over the data set, each in its own
    seeded order. Rank r of a data-parallel group of size n takes the r-th n-th of every global
    batch. Starting at ``start_step`` skips the batches already trained on, so a run resumed
    from a checkpoint sees exactly the data the uninterrupted run would have seen.

    Like a stateful data loader restored mid-epoch, its length stays the whole run's: Lightning
    counts the batches of the epoch trained before the checkpoint among those of the loader.
    """

    def __init__(self, size: int, global_batch: int, dp_rank: int, dp_size: int, steps: int, seed: int,
                 start_step: int = 0) -> None:
        self.size, self.global_batch, self.per_rank = size, global_batch, global_batch // dp_size
        self.dp_rank, self.steps, self.seed, self.start_step = dp_rank, steps, seed, start_step

    def _order(self, index: int) -> torch.Tensor:
        """Pass ``index`` over the data set: a permutation seeded by the run's seed and the pass."""
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + index))

    def __iter__(self):
        passes: dict[int, torch.Tensor] = {}
        for step in range(self.start_step, self.steps):
            first = step * self.global_batch + self.dp_rank * self.per_rank
            for position in range(first, first + self.per_rank):
                index = position // self.size
                if index not in passes:
                    passes = {index: self._order(index)}  # one pass in memory at a time
                yield int(passes[index][position % self.size])

    def __len__(self) -> int:
        return self.steps * self.per_rank
