"""Fine-tune a pretrained MiniLM on product reviews with the Lightning Trainer and a meshplan layout.

    python examples/lightning_finetune.py --recipe zero3

Lightning starts the processes itself: 2 on a machine without GPUs, one per GPU otherwise
(--devices N to choose). The layout comes from a recipe: a catalogue name (ddp, zero2, zero3,
tp, ...) or the path of your own recipe file. The fine-tuned model is exported to OUTPUT/model,
a Hugging Face model directory that AutoModelForSequenceClassification.from_pretrained loads.
"""

import argparse
from importlib.resources import files
from pathlib import Path

import lightning as L
import torch
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
    parser.add_argument("--recipe", default="zero2", help="a catalogue name (`meshplan recipes`) or a recipe file")
    parser.add_argument("--max-steps", type=int, default=30, help="optimizer steps")
    parser.add_argument("--eval-samples", type=int, default=300, help="held-out reviews to measure accuracy on")
    parser.add_argument("--devices", type=int, default=None, help="processes (default: every GPU, or 2 on CPU)")
    parser.add_argument("--output", default="lightning-output", help="where everything this script writes goes")
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
    # No sampler here: Lightning gives each process its own share of the data.
    return (DataLoader(reviews["train"], batch_size=BATCH_SIZE, shuffle=True),
            DataLoader(reviews["test"], batch_size=32))


class ReviewClassifier(L.LightningModule):
    """A Hugging Face model in a LightningModule: the strategy shards it, the module just trains it."""

    def __init__(self, learning_rate: float = 5e-5) -> None:
        super().__init__()
        # Load the model here, in __init__: under ZeRO-3 the strategy partitions it when training starts.
        self.model = AutoModelForSequenceClassification.from_pretrained(
            minilm_path(), num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
            label2id={label: index for index, label in enumerate(LABELS)})
        self.model.train()  # from_pretrained returns it in eval mode, and Lightning keeps each module's mode
        self.learning_rate = learning_rate

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        step = self.global_step + 1  # the step this batch completes
        if step == 1 or step % 10 == 0 or step == self.trainer.max_steps:
            # The mean over the processes is the loss of the whole global batch; every process takes part.
            mean_loss = self.all_gather(loss.detach()).mean()
            self.print(f"step {step}/{self.trainer.max_steps}: training loss {mean_loss:.4f}")  # rank 0 prints
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        accuracy = (logits.argmax(-1) == batch["labels"]).float().mean()
        # Lightning averages over batches (weighted by batch_size) and, with sync_dist, over processes.
        # (When the processes do not divide the set, Lightning repeats a few samples to even them out.)
        self.log("accuracy", accuracy, sync_dist=True, batch_size=len(batch["labels"]))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.learning_rate)


def main() -> None:
    args = parse_arguments()
    output = Path(args.output)
    if (output / "model").exists():  # meshplan.export writes a new directory, never into an old one
        raise SystemExit(f"{output / 'model'} exists already: pass another --output, or remove it first.")
    L.seed_everything(0, verbose=False)  # the same new classifier head in every process
    strategy = meshplan.from_recipe(args.recipe)  # a Lightning strategy for the recipe's layout
    on_gpu = torch.cuda.is_available()
    trainer = L.Trainer(
        accelerator="gpu" if on_gpu else "cpu", devices=args.devices or (torch.cuda.device_count() if on_gpu else 2),
        strategy=strategy, max_steps=args.max_steps, max_epochs=-1,
        default_root_dir=output, logger=False, enable_checkpointing=False,  # this script saves the model itself
        enable_progress_bar=False, enable_model_summary=False,
    )
    module = ReviewClassifier()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    train_loader, eval_loader = review_loaders(tokenizer, args.eval_samples)

    # The first call to the Trainer starts the other processes: they run this script from the top.
    before = trainer.validate(module, eval_loader, verbose=False)[0]["accuracy"]
    trainer.fit(module, train_loader)
    after = trainer.validate(module, eval_loader, verbose=False)[0]["accuracy"]
    if trainer.is_global_zero:
        print(f"layout: {strategy.plan}")
        print(f"world size: {trainer.world_size}")
        print(f"steps: {trainer.global_step}")
        print(f"held-out accuracy ({len(eval_loader.dataset)} reviews): before {before:.3f}, after {after:.3f}")

    # A meshplan checkpoint holds whole tensors under every layout (ZeRO-3 partitions are gathered);
    # meshplan.export turns it into a Hugging Face model directory.
    checkpoint = output / "checkpoint"
    trainer.save_checkpoint(checkpoint, weights_only=True)  # the weights are all that export needs
    if trainer.is_global_zero:
        model_dir = output / "model"
        meshplan.export(checkpoint, model_dir)
        tokenizer.save_pretrained(model_dir)
        print(f"saved the model to {model_dir}")


if __name__ == "__main__":  # Lightning runs this file again in every process it starts
    main()
