"""The event protocol and recipe validation the trainer depends on (pure: no model, no subprocess)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from engine.errors import RecipeError
from engine.events import EVENT_TYPES, Event, EventTail, EventWriter, parse_event, read_events
from engine.launch import recipe_differences
from engine.recipes import list_recipes, load_recipe, recipe_from_dict

SAMPLE_VALUES = {str: "text é", int: 7, float: 1.5, bool: True}


def _sample(cls: type[Event]) -> Event:
    """An instance of an event type with every field set to a non-default value."""
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name == "time":
            continue
        annotation = str(field.type)
        if "dict" in annotation:
            kwargs[field.name] = {"checkpoint": "/x/step_3", "count": 2}
        elif annotation.startswith("int"):
            kwargs[field.name] = 7
        elif annotation.startswith("float"):
            kwargs[field.name] = 1.5
        else:
            kwargs[field.name] = "text é"
    return cls(**kwargs, time=1_700_000_000.25)


@pytest.mark.parametrize("event_type", sorted(EVENT_TYPES))
def test_every_event_type_round_trips(event_type: str) -> None:
    event = _sample(EVENT_TYPES[event_type])
    line = event.to_json()
    assert "\n" not in line
    parsed = parse_event(line)
    assert parsed == event and type(parsed) is type(event)


def test_readers_skip_unknown_malformed_and_truncated_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    events = [_sample(cls) for cls in EVENT_TYPES.values()]
    writer = EventWriter(log_path=path)
    for event in events:
        writer.emit(event)
    writer.close()
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"v":1,"type":"from_the_future","x":1}\nnot json\n{"v":1,"type":"step","step":')
    assert read_events(path) == events
    tail = EventTail(path)
    assert tail.poll() == events
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("3}\n")  # the cut line completes: it is now a whole step event
    assert [event.step for event in tail.poll()] == [3]


@pytest.mark.parametrize("path", list_recipes(), ids=lambda p: p.stem)
def test_every_shipped_recipe_loads_and_round_trips(path: Path, tmp_path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    saved = tmp_path / "recipe.toml"
    saved.write_text(recipe.to_toml(), encoding="utf-8")
    again = load_recipe(saved)
    # A run's saved recipe.toml must fingerprint like the recipe it came from, or resume would refuse.
    assert again.fingerprint() == recipe.fingerprint()
    assert recipe_differences(recipe.to_dict(), again.to_dict()) == []


@pytest.mark.parametrize(
    ("text", "field", "hint"),
    [
        ("[train]\nepochz = 3\n", "train.epochz", "did you mean 'epochs'"),
        ('[lora]\nr = "sixteen"\n', "lora.r", "whole number"),
        ("[train]\nlearning_rate = 2\n", "train.learning_rate", "between 0 and 1"),
        ("[data]\neval_fraction = 1.5\n", "data.eval_fraction", "below 1"),
        ('[train]\nmethod = "qlorra"\n', "train.method", "did you mean 'qlora'"),
        ("[train]\nbatch_size = 0\n", "train.batch_size", "greater than 0"),
        ('[modle]\nbase = "x"\n', "modle", "did you mean 'model'"),
    ],
)
def test_bad_recipes_name_the_file_and_the_field(tmp_path: Path, text: str, field: str, hint: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    message = caught.value.message
    assert str(path) in message and field in message and hint in message


def test_overrides_are_validated_like_the_file() -> None:
    from engine.recipes import find_recipe

    with pytest.raises(RecipeError, match=r"lora\.r"):
        load_recipe(find_recipe("demo-cpu"), ["lora.r=-1"])
    assert load_recipe(find_recipe("demo-cpu"), ["train.epochs=2"]).train.epochs == 2.0


def test_recipe_differences_name_each_changed_field() -> None:
    before = recipe_from_dict({"train": {"epochs": 8}}).to_dict()
    after = recipe_from_dict({"train": {"epochs": 10}, "lora": {"r": 8}}).to_dict()
    assert recipe_differences(before, after) == ["lora.r: 16 → 8", "train.epochs: 8.0 → 10.0"]
