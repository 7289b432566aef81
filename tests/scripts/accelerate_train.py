"""The command line of tests/helpers/accelerate_train.py, for ``accelerate launch``.

    accelerate launch --config_file recipes/zero2.yaml --num_processes 2 tests/scripts/accelerate_train.py OUT.json REFERENCE.pt \\
        [RECIPE] [--loss-scale S] [--accumulate N] [--clip MAX_NORM] [--conformance] [--no-end-training]

The training loop lives in the helper so that tests can also spawn it and compute its reference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the helpers package

from helpers.accelerate_train import main  # noqa: E402


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("output")
    parser.add_argument("reference")
    parser.add_argument("recipe", nargs="?")
    parser.add_argument("--loss-scale", type=float, default=1.0)
    parser.add_argument("--conformance", action="store_true")
    parser.add_argument("--no-end-training", action="store_true")
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--clip", type=float, default=None, help="accelerator.clip_grad_norm_ at this norm every step")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = _arguments(sys.argv[1:])
    main(arguments.output, arguments.reference, arguments.recipe, clip=arguments.clip, loss_scale=arguments.loss_scale,
         conformance=arguments.conformance, end_training=not arguments.no_end_training, accumulation=arguments.accumulate)
