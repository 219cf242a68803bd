"""The new-run form: a recipe plus the main knobs, validated by engine.recipes as you type, errors inline."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.suggester import SuggestFromList
from textual.widgets import Button, Input, Label, Select, Static

from engine.errors import EngineError, RecipeError
from engine.recipes import apply_overrides, read_recipe_data, recipe_from_dict
from tui.engine_client import EngineClient
from tui.prefs import Prefs

# (section.key, label, kind): kind is "text", "number", "gpus" (a count or "all") or a tuple of choices.
FIELDS: tuple[tuple[str, str, Any], ...] = (
    ("model.base", "base model", "text"),
    ("data.dataset", "dataset", "dataset"),
    ("train.method", "method", ("lora", "qlora", "full")),
    ("train.epochs", "epochs", "number"),
    ("train.max_steps", "max steps", "number"),
    ("train.batch_size", "batch size", "number"),
    ("train.grad_accum", "grad accum", "number"),
    ("train.learning_rate", "learning rate", "number"),
    ("data.max_length", "max length", "number"),
    ("data.eval_fraction", "eval fraction", "number"),
    ("lora.r", "lora r", "number"),
    ("lora.alpha", "lora alpha", "number"),
    ("lora.dropout", "lora dropout", "number"),
    ("train.save_steps", "save steps", "number"),
    ("train.eval_steps", "eval steps", "number"),
    ("train.device", "device", "text"),
    ("train.gpus", "gpus", "gpus"),
)
FIELD_RE = re.compile(r"`([a-z_]+\.[a-z_]+)`")


def field_id(path: str) -> str:
    """The widget id of a form field."""
    return "f-" + path.replace(".", "-")


def value_text(value: Any) -> str:
    """How a recipe value reads in a form field."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def override_text(path: str, text: str, kind: Any) -> str:
    """`section.key=value` with text values quoted as TOML strings, so `true` or `1e-4` stay what they look
    like."""
    if kind == "number" or (kind == "gpus" and text.strip().isdigit()):
        return f"{path}={text.strip()}"
    return f"{path}={json.dumps(text.strip())}"


def estimated_steps(
    pairs: int,
    epochs: float,
    max_steps: int,
    batch: int,
    accum: int,
    eval_fraction: float,
    processes: int = 1,
) -> int:
    """About how many optimizer steps a recipe takes on `pairs` rows (what the trainer will report); the batch
    size is per process, so every process of a multi-GPU run takes its share of each step."""
    if max_steps > 0:
        return max_steps
    train_rows = max(1, pairs - math.ceil(pairs * eval_fraction)) if pairs else 0
    per_epoch = math.ceil(train_rows / max(1, batch * accum * processes))
    return math.ceil(per_epoch * epochs)


def count_rows(path: Path) -> int:
    """Non-blank lines of a JSONL file (a cheap pair count for the step estimate)."""
    try:
        with open(path, "rb") as handle:
            return sum(1 for line in handle if line.strip())
    except OSError:
        return 0


class NewRunScreen(ModalScreen[tuple[str, list[str]] | None]):
    """Pick a recipe, adjust knobs, start; dismisses with (recipe path, overrides)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+s", "start", "Start run"),
        Binding("escape", "cancel", "Cancel"),
    ]

    def __init__(self, engine: EngineClient, prefs: Prefs) -> None:
        super().__init__()
        self.engine = engine
        self.prefs = prefs
        self.recipes = engine.list_recipes()
        self.recipe_data: dict[str, Any] = {}
        self.resolved: dict[str, Any] = {}
        self.error: str = ""
        self.overrides: list[str] = []

    def compose(self) -> ComposeResult:
        recipe_options = [(path.stem, str(path)) for path in self.recipes]
        last = self.prefs.get("recipe")
        initial = last if any(value == last for _, value in recipe_options) else None
        if initial is None:
            initial = next(
                (v for name, v in recipe_options if name == "demo-cpu"),
                recipe_options[0][1] if recipe_options else None,
            )
        datasets = [p.name for p in self.engine.workspace.list_datasets()]
        with Vertical(id="new-run"):
            yield Label("New training run  [dim]ctrl+s start · esc cancel[/]", id="new-run-title")
            with Horizontal(classes="form-row"):
                yield Label("recipe", classes="form-label")
                yield Select(
                    recipe_options,
                    value=initial or Select.NULL,
                    allow_blank=False,
                    compact=True,
                    id="f-recipe",
                )
            with Grid(id="new-run-grid"):
                for path, label, kind in FIELDS:
                    yield Label(label, classes="form-label")
                    if kind == "dataset":
                        options = [(name, name) for name in datasets]
                        yield Select(
                            options, allow_blank=True, compact=True, id=field_id(path), prompt="(recipe's)"
                        )
                    elif isinstance(kind, tuple):
                        yield Select(
                            [(c, c) for c in kind], allow_blank=False, compact=True, id=field_id(path)
                        )
                    else:
                        suggester = (
                            SuggestFromList(self.engine.list_models(), case_sensitive=False)
                            if path == "model.base"
                            else None
                        )
                        yield Input(
                            compact=True,
                            id=field_id(path),
                            suggester=suggester,
                            type="number" if kind == "number" else "text",
                        )
            yield Static(id="new-run-summary")
            yield Static(id="new-run-error")
            with Horizontal(id="new-run-buttons"):
                yield Button("Start (ctrl+s)", variant="success", compact=True, id="start")
                yield Button("Cancel (esc)", compact=True, id="cancel")

    def on_mount(self) -> None:
        self._load_recipe()
        self.query_one("#f-recipe", Select).focus()

    @property
    def recipe_path(self) -> str:
        """The chosen recipe file."""
        value = self.query_one("#f-recipe", Select).value
        return "" if value is Select.NULL else str(value)

    def _load_recipe(self) -> None:
        """Fill every field with the recipe's resolved values."""
        try:
            self.recipe_data = read_recipe_data(Path(self.recipe_path))
            recipe = recipe_from_dict(self.recipe_data, where=Path(self.recipe_path).name)
        except EngineError as exc:
            self._show_error(exc.message, None)
            return
        self.resolved = {
            f"{section}.{key}": value
            for section in ("model", "data", "train", "lora")
            for key, value in dataclasses.asdict(getattr(recipe, section)).items()
        }
        datasets = {p.name for p in self.engine.workspace.list_datasets()}
        with self.prevent(Input.Changed, Select.Changed):
            for path, _, kind in FIELDS:
                value = self.resolved.get(path)
                widget = self.query_one(f"#{field_id(path)}")
                if isinstance(widget, Select):
                    if kind == "dataset":
                        widget.value = value if value in datasets else Select.NULL
                    else:
                        widget.value = value
                elif isinstance(widget, Input):
                    widget.value = value_text(value)
        self.validate_form()

    def collect_overrides(self) -> list[str]:
        """Overrides for every field whose value differs from the recipe's."""
        overrides = []
        for path, _, kind in FIELDS:
            widget = self.query_one(f"#{field_id(path)}")
            if isinstance(widget, Select):
                if widget.value is Select.NULL:
                    continue
                text = str(widget.value)
            else:
                text = widget.value  # type: ignore[attr-defined]
            if text.strip() == value_text(self.resolved.get(path, "")).strip():
                continue
            overrides.append(override_text(path, text, kind if kind in ("number", "gpus") else "text"))
        return overrides

    def validate_form(self) -> bool:
        """Validate the recipe with the overrides and show the first problem at its field; True when valid."""
        for widget in self.query(".-invalid"):
            widget.remove_class("-invalid")
        self.overrides = self.collect_overrides()
        try:
            data = apply_overrides(self.recipe_data, self.overrides)
            recipe = recipe_from_dict(data, where="form")
        except RecipeError as exc:
            match = FIELD_RE.search(exc.message)
            self._show_error(exc.message.removeprefix("form: "), match.group(1) if match else None)
            return False
        self._show_error("", None)
        dataset_path = self.engine.workspace.datasets_dir / recipe.data.dataset
        pairs = count_rows(dataset_path)
        steps = estimated_steps(
            pairs,
            recipe.train.epochs,
            recipe.train.max_steps,
            recipe.train.batch_size,
            recipe.train.grad_accum,
            recipe.data.eval_fraction,
            recipe.train.gpus if isinstance(recipe.train.gpus, int) else 1,
        )
        where = f"{pairs} pairs" if dataset_path.exists() else f"{recipe.data.dataset} (not in datasets/)"
        changed = ", ".join(o.split("=")[0] for o in self.overrides) or "none"
        self.query_one("#new-run-summary", Static).update(
            f"[dim]{where} → about {steps} steps · changed: {changed}[/]"
        )
        return True

    def _show_error(self, message: str, field: str | None) -> None:
        self.error = message
        error = self.query_one("#new-run-error", Static)
        error.update(message)
        error.display = bool(message)
        self.query_one("#start", Button).disabled = bool(message)
        if field:
            for widget in self.query(f"#{field_id(field)}"):
                widget.add_class("-invalid")

    @on(Select.Changed, "#f-recipe")
    def _recipe_changed(self) -> None:
        self._load_recipe()

    @on(Input.Changed)
    @on(Select.Changed)
    def _field_changed(self, event: Input.Changed | Select.Changed) -> None:
        if event.control.id != "f-recipe":
            self.validate_form()

    @on(Button.Pressed, "#start")
    def action_start(self) -> None:
        """Start the run if the form is valid."""
        if not self.validate_form():
            self.notify(self.error, title="Recipe problem", severity="error")
            return
        self.prefs.set(recipe=self.recipe_path)
        self.dismiss((self.recipe_path, self.overrides))

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        """Close without starting."""
        self.dismiss(None)
