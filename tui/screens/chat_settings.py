"""The chat settings form: system prompt and sampling, checked before they reach the engine."""

from __future__ import annotations

from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static, TextArea

from tui.screens.chat import Sampling


def parse_sampling(
    system: str, max_new_tokens: str, temperature: str, top_p: str
) -> tuple[Sampling | None, str]:
    """The settings typed, or None and one sentence on the first bad field."""
    try:
        tokens = int(max_new_tokens)
    except ValueError:
        return None, f"max new tokens must be a whole number, not {max_new_tokens!r}."
    if not 1 <= tokens <= 32768:
        return None, "max new tokens must be between 1 and 32768."
    try:
        temp = float(temperature)
    except ValueError:
        return None, f"temperature must be a number, not {temperature!r}."
    if not 0 <= temp <= 5:
        return None, "temperature must be between 0 (greedy) and 5."
    try:
        nucleus = float(top_p)
    except ValueError:
        return None, f"top-p must be a number, not {top_p!r}."
    if not 0 < nucleus <= 1:
        return None, "top-p must be above 0 and at most 1."
    return Sampling(system=system, max_new_tokens=tokens, temperature=temp, top_p=nucleus), ""


class ChatSettingsScreen(ModalScreen[Sampling | None]):
    """Edit the system prompt and sampling; ctrl+s keeps them."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+s", "save", "Keep"),
        Binding("escape", "cancel", "Cancel"),
    ]

    def __init__(self, sampling: Sampling) -> None:
        super().__init__()
        self.sampling = sampling

    def compose(self) -> ComposeResult:
        with Vertical(id="chat-settings"):
            yield Label("Chat settings  [dim]ctrl+s keep · esc cancel[/]", id="chat-settings-title")
            yield Label("system prompt", classes="edit-label")
            yield TextArea(self.sampling.system, id="set-system", soft_wrap=True, tab_behavior="focus")
            with Grid(id="chat-settings-grid"):
                yield Label("max new tokens", classes="form-label")
                yield Input(str(self.sampling.max_new_tokens), compact=True, id="set-max")
                yield Label("temperature", classes="form-label")
                yield Input(f"{self.sampling.temperature:g}", compact=True, id="set-temperature")
                yield Label("top-p", classes="form-label")
                yield Input(f"{self.sampling.top_p:g}", compact=True, id="set-top-p")
            yield Static(id="chat-settings-error")
            with Horizontal(id="chat-settings-buttons"):
                yield Button("Keep (ctrl+s)", variant="success", compact=True, id="keep")
                yield Button("Cancel (esc)", compact=True, id="cancel")

    def on_mount(self) -> None:
        self.query_one("#set-system", TextArea).focus()
        self._validate()

    def _validate(self) -> Sampling | None:
        sampling, error = parse_sampling(
            self.query_one("#set-system", TextArea).text,
            self.query_one("#set-max", Input).value,
            self.query_one("#set-temperature", Input).value,
            self.query_one("#set-top-p", Input).value,
        )
        message = self.query_one("#chat-settings-error", Static)
        message.update(error)
        message.display = bool(error)
        self.query_one("#keep", Button).disabled = sampling is None
        return sampling

    @on(Input.Changed)
    @on(TextArea.Changed)
    def _changed(self) -> None:
        self._validate()

    @on(Button.Pressed, "#keep")
    def action_save(self) -> None:
        """Keep the settings if they are valid."""
        sampling = self._validate()
        if sampling is not None:
            self.dismiss(sampling)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        """Close without changes."""
        self.dismiss(None)
