"""Fine-tune a pretrained MiniLM on product reviews with a plain Accelerate loop and a meshplan recipe.

    accelerate launch --config_file "$(meshplan recipes --path zero2)" examples/accelerate_finetune.py

The launcher starts the processes (the recipe says how many; --num_processes N to change it)
and its --config_file is the recipe: a catalogue recipe or your own file. The only meshplan
line is `meshplan.accelerator()`, which realizes that recipe. The fine-tuned model is saved to
OUTPUT/model, a Hugging Face model directory that AutoModelForSequenceClassification.from_pretrained loads.
"""

import argparse
from importlib.resources import files
from pathlib import Path

import torch
from accelerate.utils import set_seed
from datasets import load_dataset
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import meshplan
from meshplan.models import minilm_path

LABELS = ["negative", "positive"]
BATCH_SIZE = 8  # per process
MAX_LENGTH = 48  # tokens; the reviews are short


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=30, help="optimizer steps")
    parser.add_argument("--eval-samples", type=int, default=300, help="held-out reviews to measure accuracy on")
    parser.add_argument("--output", default="accelerate-output", help="where everything this script writes goes")
    return parser.parse_args()


def review_loaders(tokenizer, eval_samples: int) -> tuple[DataLoader, DataLoader]:
    """The reviews packaged with meshplan (text, label 0/1), tokenized: a training and a held-out loader."""
    data = files("meshplan") / "data"
    reviews = load_dataset("csv", data_files={split: str(data / f"reviews-{split}.csv") for split in ("train", "test")})
    reviews["test"] = reviews["test"].select(range(min(eval_samples, len(reviews["test"]))))

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, padding="max_length", max_length=MAX_LENGTH)

    reviews = reviews.map(tokenize, batched=True).rename_column("label", "labels")
    reviews = reviews.with_format("torch", columns=["input_ids", "attention_mask", "labels"])
    # Plain loaders: accelerator.prepare gives each process its share.
    return (DataLoader(reviews["train"], batch_size=BATCH_SIZE, shuffle=True),
            DataLoader(reviews["test"], batch_size=32))


@torch.no_grad()
def held_out_accuracy(accelerator, model, eval_loader) -> float:
    """Accuracy over exactly the held-out set.

    gather_for_metrics collects every process's predictions and drops the samples that
    Accelerate repeated to give every process the same number of batches.
    """
    model.eval()
    correct = total = 0
    for batch in eval_loader:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        predictions, labels = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"]))
        correct += (predictions == labels).sum().item()
        total += len(labels)
    model.train()
    return correct / total


def main() -> None:
    args = parse_arguments()
    # Instead of accelerate.Accelerator(): the recipe `accelerate launch` was given becomes the layout.
    accelerator = meshplan.accelerator()
    set_seed(0)  # the same new classifier head in every process
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm_path(), num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
        label2id={label: index for index, label in enumerate(LABELS)})
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    train_loader, eval_loader = review_loaders(tokenizer, args.eval_samples)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    zero = accelerator.state.deepspeed_plugin  # None unless the recipe is a ZeRO one
    layout = accelerator.distributed_type.value + (f", ZeRO stage {zero.zero_stage}" if zero else "")
    accelerator.print(f"layout: {layout}")
    accelerator.print(f"world size: {accelerator.num_processes}")

    before = held_out_accuracy(accelerator, model, eval_loader)
    step = 0
    while step < args.max_steps:  # as many passes over the data as the steps need
        for batch in train_loader:
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step == 1 or step % 10 == 0 or step == args.max_steps:
                mean_loss = accelerator.reduce(loss.detach(), "mean")  # the loss of the whole global batch
                accelerator.print(f"step {step}/{args.max_steps}: training loss {mean_loss.item():.4f}")
            if step == args.max_steps:
                break
    after = held_out_accuracy(accelerator, model, eval_loader)
    accelerator.print(f"steps: {step}")
    accelerator.print(f"held-out accuracy ({len(eval_loader.dataset)} reviews): before {before:.3f}, after {after:.3f}")

    # The Hugging Face examples' way to save: get_state_dict gathers whole tensors under every
    # layout (ZeRO-3 partitions, TP shards); every process calls it, the main process writes.
    model_dir = Path(args.output) / "model"
    accelerator.unwrap_model(model).save_pretrained(
        model_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save,
        state_dict=accelerator.get_state_dict(model))
    if accelerator.is_main_process:
        tokenizer.save_pretrained(model_dir)
    accelerator.print(f"saved the model to {model_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
