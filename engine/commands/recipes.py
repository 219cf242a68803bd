"""`tunedeck recipes`: list shipped and workspace recipes, or validate one."""

from __future__ import annotations

import argparse

from engine.recipes import find_recipe, list_recipes, load_recipe
from engine.workspace import Workspace

HELP = "list the shipped and workspace recipes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--check NAME` validates one recipe and prints it resolved."""
    parser.add_argument("--check", metavar="RECIPE", help="validate a recipe and print it resolved")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides for --check")


def run(args: argparse.Namespace) -> int:
    """Print the recipe list, or the resolved recipe."""
    workspace = Workspace.open(args.workspace, create=False) if args.workspace else None
    root = workspace.root if workspace else None
    if args.check:
        recipe = load_recipe(find_recipe(args.check, root), args.overrides)
        print(recipe.to_toml(), end="")
        return 0
    for path in list_recipes(root):
        recipe = load_recipe(path)
        print(f"{path.stem:<16} {recipe.train.method:<6} {recipe.description}")
    return 0
