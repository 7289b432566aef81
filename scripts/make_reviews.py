"""Writes the product-review sentiment data set that `meshplan finetune` trains on by default.

    python scripts/make_reviews.py     # rewrites src/meshplan/data/reviews-{train,test}.csv

Reviews are composed from hand-written parts (what was bought, what happened, how the writer
closes), so that the label (0 negative, 1 positive) follows from the meaning and not from one
keyword: negations ("never works when I need it") and neutral sentences are mixed in. The
held-out split has reviews that occur nowhere in training; a third of them are built on verdict
phrases that never occur in training either, so accuracy also measures generalization.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

SUBJECTS = [
    "the headphones", "this blender", "the hotel room", "the pasta", "the delivery", "the battery", "customer service",
    "the running shoes", "this laptop", "the coffee maker", "the tent", "the phone case", "the vacuum cleaner",
    "the mattress", "this novel", "the restaurant", "the rental car", "the kitchen knife", "the backpack",
    "the smart watch", "the desk chair", "the printer", "the guided tour", "the winter jacket", "the app",
]
POSITIVE = [
    "works perfectly", "exceeded my expectations", "is worth every penny", "was a delight to use",
    "arrived early and well packed", "feels solid and well made", "made my mornings so much easier",
    "still works like new after a year", "is the best purchase I made this year", "was friendly and quick to help",
    "does exactly what it promises", "is comfortable from the first minute", "never lets me down",
    "could not have been better", "was spotless and quiet", "tastes fresh and delicious", "lasts all day on one charge",
    "is easy to set up", "fits perfectly", "impressed the whole family", "runs fast and smooth",
    "was a pleasant surprise", "keeps me warm even on freezing days", "is beautifully designed",
]
NEGATIVE = [
    "stopped working after a week", "is a waste of money", "broke on the first day", "was cold and bland",
    "arrived late and damaged", "feels cheap and flimsy", "made everything more complicated",
    "fell apart within a month", "is the worst purchase I made this year", "was rude and unhelpful",
    "does not do what it promises", "is uncomfortable to use", "keeps letting me down",
    "could not have been worse", "was dirty and noisy", "tastes stale and greasy", "dies before lunch",
    "is a nightmare to set up", "does not fit at all", "disappointed the whole family", "is painfully slow",
    "was an unpleasant surprise", "lets the cold straight through", "is ugly and awkward",
    "never works when I need it", "never lived up to the hype",
]
# Phrases held out of training entirely.
HELD_OUT_POSITIVE = [
    "is a joy to own", "went beyond what I hoped for", "deserves five stars", "is simply excellent",
    "works better than the expensive brands", "made me genuinely happy",
]
HELD_OUT_NEGATIVE = [
    "is a total letdown", "should never have been sold", "deserves zero stars", "is simply terrible",
    "works worse than the cheapest brands", "made me genuinely angry",
]
OPENERS = ["Honestly,", "After two weeks,", "In short,", "To be fair,", "Well,", "Overall,", "So far", "I have to say", ""]
NEUTRAL_CLOSERS = ["I bought it last month.", "Shipping took three days.", "I use it every day.", "It came in a blue box.",
                   "My sister recommended it.", "I paid with a gift card.", ""]
POSITIVE_CLOSERS = ["Would buy again.", "Highly recommended.", "Five stars from me.", "I am very happy with it.",
                    "I will never go back to my old one."]
# Cue words ("stars", "never") occur in both classes, so that no single word decides the label.
NEGATIVE_CLOSERS = ["Returning it tomorrow.", "Avoid it.", "One star is too many.", "I want my money back.",
                    "Two stars at most."]


def review(rng: random.Random, phrase: str, positive: bool) -> str:
    closers = NEUTRAL_CLOSERS + (POSITIVE_CLOSERS if positive else NEGATIVE_CLOSERS)
    sentence = " ".join(part for part in (rng.choice(OPENERS), rng.choice(SUBJECTS), phrase) if part) + "."
    sentence = sentence[0].upper() + sentence[1:]
    return " ".join(part for part in (sentence, rng.choice(closers)) if part)


def make(rng: random.Random, positive: list[str], negative: list[str], count: int) -> list[tuple[str, int]]:
    rows = set()
    while len(rows) < count:
        label = rng.randrange(2)
        rows.add((review(rng, rng.choice(positive if label else negative), bool(label)), label))
    rows = sorted(rows)
    rng.shuffle(rows)
    return rows


def main() -> None:
    rng = random.Random(20261130)
    folder = Path(__file__).resolve().parents[1] / "src" / "meshplan" / "data"
    seen = make(rng, POSITIVE, NEGATIVE, 1400)
    unseen = make(rng, HELD_OUT_POSITIVE, HELD_OUT_NEGATIVE, 100)
    test = seen[1200:] + unseen
    rng.shuffle(test)
    splits = {"train": seen[:1200], "test": test}
    for split, rows in splits.items():
        with open(folder / f"reviews-{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows(rows)


if __name__ == "__main__":
    main()
