"""The ``meshplan`` command."""

from __future__ import annotations

import argparse
import sys


def _list_strategies(args: argparse.Namespace) -> int:
    from meshplan.lightning import REGISTERED_STRATEGIES

    width = max(len(name) for name in REGISTERED_STRATEGIES)
    for name, (_, _, description) in REGISTERED_STRATEGIES.items():
        print(f"{name:<{width}}  {description}")
    return 0


def _list_recipes(args: argparse.Namespace) -> int:
    from meshplan.recipes import catalogue

    recipes = catalogue()
    width = max(len(name) for name in recipes)
    for name, recipe in recipes.items():
        purpose = recipe.description.splitlines()[0].split(":", 1)[-1].strip() if recipe.description else ""
        print(f"{name:<{width}}  {purpose}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``meshplan`` command and its subcommands."""
    parser = argparse.ArgumentParser(prog="meshplan", description="One parallel layout for Lightning, Accelerate and the HF Trainer.")
    commands = parser.add_subparsers(dest="command", required=True)
    strategies = commands.add_parser("strategies", help="list the strategy names registered with Lightning")
    strategies.set_defaults(run=_list_strategies)
    recipes = commands.add_parser("recipes", help="list the recipes (Accelerate config files) meshplan ships")
    recipes.set_defaults(run=_list_recipes)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``meshplan`` console script; returns the exit code (2 for bad input)."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
