"""Fine-tune a pretrained MiniLM on product reviews with the Hugging Face Trainer and a meshplan layout.

    torchrun --nproc-per-node 2 examples/trainer_finetune.py --recipe zero2
    python examples/trainer_finetune.py --recipe ddp            # one process (ZeRO needs a launcher, even for one)

Any launcher starts the processes (torchrun, accelerate launch, or none). The layout comes from
a recipe: a catalogue name (ddp, zero1, zero2, zero3, zero3-offload) or the path of your own
recipe file; it becomes TrainingArguments through strategy.training_arguments(). The
fine-tuned model is saved to OUTPUT/model, a Hugging Face model directory that
AutoModelForSequenceClassification.from_pretrained loads.
"""

import argparse
from importlib.resources import files
from pathlib import Path

import numpy as np
from datasets import load_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments, set_seed

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
    parser.add_argument("--output", default="trainer-output", help="where everything this script writes goes")
    return parser.parse_args()


def review_datasets(tokenizer, eval_samples: int):
    """The reviews packaged with meshplan (text, label 0/1), tokenized: the training and the held-out split."""
    data = files("meshplan") / "data"
    reviews = load_dataset("csv", data_files={split: str(data / f"reviews-{split}.csv") for split in ("train", "test")})
    reviews["test"] = reviews["test"].select(range(min(eval_samples, len(reviews["test"]))))

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, padding="max_length", max_length=MAX_LENGTH)

    reviews = reviews.map(tokenize, batched=True, remove_columns=["text"])  # the Trainer finds "label" itself
    return reviews["train"], reviews["test"]


def compute_metrics(prediction) -> dict[str, float]:
    """Accuracy over the whole held-out set: the Trainer gathers every process's predictions first."""
    return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}


def main() -> None:
    args = parse_arguments()
    output = Path(args.output)
    strategy = meshplan.from_recipe(args.recipe)
    training_args = TrainingArguments(
        output_dir=str(output / "trainer"),
        per_device_train_batch_size=BATCH_SIZE,
        per_device_eval_batch_size=32,
        max_steps=args.max_steps,
        learning_rate=5e-5,
        lr_scheduler_type="constant",  # as in the Lightning and Accelerate examples
        logging_steps=10,
        logging_first_step=True,
        save_strategy="no",  # this script saves the model itself, at the end
        report_to="none",
        disable_tqdm=True,
        seed=0,
        # Held-out accuracy before the first step. (Not trainer.evaluate() before train(): under
        # ZeRO-1 and -2 the Trainer evaluates only once training has set up DeepSpeed.)
        eval_on_start=True,
        # The classifier's loss is a mean over its own batch. With the default (True), transformers 5
        # multiplies it, and its gradients, by the number of processes, expecting a per-token sum.
        average_tokens_across_devices=False,
        **strategy.training_arguments(),  # the layout: DeepSpeed config, DDP options, CPU backend
    )
    set_seed(0)  # the same new classifier head in every process
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm_path(), num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
        label2id={label: index for index, label in enumerate(LABELS)})
    train, test = review_datasets(tokenizer, args.eval_samples)
    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=test,
                      processing_class=tokenizer, compute_metrics=compute_metrics)

    result = trainer.train()
    before = next(entry["eval_accuracy"] for entry in trainer.state.log_history if "eval_accuracy" in entry)
    after = trainer.evaluate()["eval_accuracy"]
    if trainer.is_world_process_zero():
        print(f"layout: {strategy.plan}")
        print(f"world size: {training_args.world_size}")
        for entry in trainer.state.log_history:  # the Trainer logs the loss averaged over every process
            if "loss" in entry:
                print(f"step {entry['step']}/{args.max_steps}: training loss {entry['loss']:.4f}")
        print(f"steps: {result.global_step}, mean training loss {result.training_loss:.4f}")
        print(f"held-out accuracy ({len(test)} reviews): before {before:.3f}, after {after:.3f}")

    # save_model writes whole weights under every layout: under ZeRO-3 meshplan's DeepSpeed config
    # gathers the partitions (stage3_gather_16bit_weights_on_model_save). The tokenizer goes along.
    model_dir = output / "model"
    trainer.save_model(str(model_dir))
    if trainer.is_world_process_zero():
        print(f"saved the model to {model_dir}")


if __name__ == "__main__":
    main()
