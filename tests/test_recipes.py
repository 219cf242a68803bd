"""Recipes: every shipped one validates, and bad ones fail naming the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import RecipeError
from engine.recipes import find_recipe, list_recipes, load_recipe, recipe_from_dict, recipes_dir

SHIPPED = sorted(recipes_dir().glob("*.toml"))


def test_the_four_kinds_of_recipe_ship() -> None:
    methods = {load_recipe(path).train.method for path in SHIPPED}
    assert {"lora", "qlora", "full"} <= methods
    qlora = load_recipe(find_recipe("qlora-7b"))
    assert (qlora.quant.quant_type, qlora.quant.double_quant, qlora.quant.compute_dtype) == (
        "nf4",
        True,
        "bfloat16",
    )
    assert qlora.train.optimizer.startswith("paged_adamw")
    assert qlora.lora.target_modules == "all-linear"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_recipe_loads_and_opens_with_its_launch_command(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    head = path.read_text(encoding="utf-8").splitlines()[:3]
    assert any(line.startswith("# Launch:") and "tunedeck train" in line for line in head)
    assert recipe_from_dict(recipe.to_dict()) == recipe_from_dict(load_recipe(path).to_dict())


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[train]\nlerning_rate = 1e-4\n",
            "unknown field `train.lerning_rate` (did you mean 'learning_rate'?)",
        ),
        ("[trian]\nepochs = 1\n", "unknown section or key `trian` (did you mean 'train'?)"),
        ('[train]\nbatch_size = "eight"\n', "`train.batch_size` must be a whole number"),
        ("[train]\nbatch_size = 0\n", "`train.batch_size` must be greater than 0"),
        ('[train]\nmethod = "qlra"\n', "`train.method` is 'qlra' (did you mean 'qlora'?)"),
        ("[lora]\ndropout = 1.5\n", "`lora.dropout` must be at least 0 and below 1"),
        ("[train]\nlearning_rate = 3\n", "`train.learning_rate` must be between 0 and 1"),
        ("[train\n", "is not valid TOML"),
    ],
)
def test_bad_recipes_name_the_file_and_the_field(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert str(path) in caught.value.message
    assert expected in caught.value.message


def test_overrides_apply_and_are_validated(tmp_path: Path) -> None:
    path = find_recipe("demo-cpu")
    recipe = load_recipe(path, ["train.learning_rate=5e-4", "lora.r=8", 'lora.target_modules=["q_proj"]'])
    assert (recipe.train.learning_rate, recipe.lora.r, recipe.lora.target_modules) == (5e-4, 8, ["q_proj"])
    with pytest.raises(RecipeError, match=r"unknown field `lora\.rank`"):
        load_recipe(path, ["lora.rank=8"])
    with pytest.raises(RecipeError, match=r"not of the form section\.key=value"):
        load_recipe(path, ["epochs"])


def test_fingerprint_changes_with_what_training_computes_only() -> None:
    path = find_recipe("demo-cpu")
    base = load_recipe(path)
    assert load_recipe(path).fingerprint() == base.fingerprint()
    assert load_recipe(path, ["train.learning_rate=5e-4"]).fingerprint() != base.fingerprint()


def test_unknown_recipe_name_suggests_the_closest(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="did you mean 'demo-cpu'"):
        find_recipe("demo-cp")
    assert find_recipe("demo-cpu") in list_recipes()
