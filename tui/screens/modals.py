"""Small modal screens shared by the tabs: error, confirm, one-line prompt and the key help."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, Static

from tui.failures import Failure


class ErrorScreen(ModalScreen[None]):
    """A failure that needs acknowledging: its title as the header, one sentence, and the next step."""

    DEFAULT_CSS = """
    ErrorScreen { align: center middle; }
    ErrorScreen > Vertical {
        width: 72; max-width: 95%; height: auto; max-height: 90%;
        border: thick $error; background: $surface; padding: 0 1;
    }
    ErrorScreen #error-title { text-style: bold; color: $error; width: 1fr; }
    ErrorScreen #error-next { color: $text-muted; margin-top: 1; }
    ErrorScreen Horizontal { height: auto; align-horizontal: right; margin-top: 1; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,enter", "dismiss", "Close")]

    def __init__(self, failure: Failure) -> None:
        super().__init__()
        self.failure = failure

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.failure.title, id="error-title")
            yield Static(self.failure.message, id="error-message", markup=False)
            if self.failure.next_step:
                yield Static(f"→ {self.failure.next_step}", id="error-next", markup=False)
            with Horizontal():
                yield Button("Close", variant="error", compact=True, id="close")

    @on(Button.Pressed, "#close")
    def _close(self) -> None:
        self.dismiss(None)


class ConfirmScreen(ModalScreen[bool]):
    """Yes/no for actions that cannot be undone (stopping a run, dropping unreadable lines)."""

    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Vertical {
        width: 64; max-width: 95%; height: auto; border: thick $warning; background: $surface; padding: 0 1;
    }
    ConfirmScreen #confirm-title { text-style: bold; }
    ConfirmScreen Horizontal { height: auto; align-horizontal: right; margin-top: 1; }
    ConfirmScreen Button { margin-left: 2; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, title: str, question: str, yes: str = "Yes") -> None:
        super().__init__()
        self.title_text = title
        self.question = question
        self.yes = yes

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.title_text, id="confirm-title")
            yield Static(self.question, markup=False)
            with Horizontal():
                yield Button(f"{self.yes} (y)", variant="warning", compact=True, id="yes")
                yield Button("No (n)", compact=True, id="no")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class PromptScreen(ModalScreen[tuple[str, str] | None]):
    """Ask for one line of text (a name or a path), optionally with a choice (a file format)."""

    DEFAULT_CSS = """
    PromptScreen { align: center middle; }
    PromptScreen > Vertical {
        width: 70; max-width: 95%; height: auto; border: thick $primary; background: $surface; padding: 0 1;
    }
    PromptScreen #prompt-title { text-style: bold; }
    PromptScreen #prompt-hint { color: $text-muted; }
    PromptScreen Input, PromptScreen Select { margin-top: 1; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(
        self,
        title: str,
        hint: str = "",
        *,
        value: str = "",
        placeholder: str = "",
        choices: Iterable[tuple[str, str]] = (),
        choice: str = "",
    ) -> None:
        super().__init__()
        self.title_text = title
        self.hint = hint
        self.value = value
        self.placeholder = placeholder
        self.choices = list(choices)
        self.choice = choice

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.title_text, id="prompt-title")
            if self.hint:
                yield Static(self.hint, id="prompt-hint", markup=False)
            yield Input(self.value, placeholder=self.placeholder, compact=True, id="prompt-input")
            if self.choices:
                yield Select(
                    self.choices,
                    value=self.choice or self.choices[0][1],
                    allow_blank=False,
                    compact=True,
                    id="prompt-choice",
                )

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    @on(Input.Submitted)
    def _submit(self) -> None:
        value = self.query_one(Input).value.strip()
        if not value:
            self.notify("Type a value first (escape cancels).", severity="warning")
            return
        choice = str(self.query_one(Select).value) if self.choices else ""
        self.dismiss((value, choice))

    def action_cancel(self) -> None:
        self.dismiss(None)


def bindings_table(title: str, bindings: Iterable[BindingType]) -> Table:
    """A two-column table of keys and what they do."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", min_width=14)
    table.add_column()
    table.add_row(Text(title, style="bold underline"), "")
    for binding in bindings:
        if isinstance(binding, Binding):
            keys, description = binding.key, binding.description
        else:
            keys, description = binding[0], binding[2] if len(binding) > 2 else binding[1]
        if not description:
            continue
        shown = " ".join(_key_name(key) for key in keys.split(","))
        table.add_row(shown, description)
    return table


def _key_name(key: str) -> str:
    names = {"question_mark": "?", "slash": "/", "escape": "esc", "enter": "⏎", "delete": "del"}
    return names.get(key, key.replace("ctrl+", "^"))


class HelpScreen(ModalScreen[None]):
    """Every key, per tab, generated from the bindings themselves so it cannot drift."""

    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll {
        width: 76; max-width: 98%; height: 90%; border: thick $primary; background: $surface; padding: 0 1;
    }
    HelpScreen .help-section { margin-bottom: 1; height: auto; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q,question_mark", "dismiss", "Close")]

    def __init__(self, sections: list[tuple[str, list[BindingType]]], tips: str = "") -> None:
        super().__init__()
        self.sections = sections
        self.tips = tips

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            for title, bindings in self.sections:
                yield Static(bindings_table(title, bindings), classes="help-section")
            if self.tips:
                yield Static(self.tips, classes="help-section", markup=False)


class PickScreen(ModalScreen[str | None]):
    """Pick one of a few options with the arrow keys and enter."""

    DEFAULT_CSS = """
    PickScreen { align: center middle; }
    PickScreen > Vertical {
        width: 64; max-width: 95%; height: auto; max-height: 80%;
        border: thick $primary; background: $surface; padding: 0 1;
    }
    PickScreen #pick-title { text-style: bold; }
    PickScreen OptionList { height: auto; max-height: 16; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, options: list[tuple[str, str]], current: str = "") -> None:
        super().__init__()
        self.title_text = title
        self.options = options
        self.current = current

    def compose(self) -> ComposeResult:
        from textual.widgets import OptionList
        from textual.widgets.option_list import Option

        with Vertical():
            yield Label(self.title_text, id="pick-title")
            yield OptionList(*[Option(label, id=value) for label, value in self.options], id="pick-list")

    def on_mount(self) -> None:
        from textual.widgets import OptionList

        options = self.query_one(OptionList)
        values = [value for _, value in self.options]
        if self.current in values:
            options.highlighted = values.index(self.current)
        options.focus()

    def on_option_list_option_selected(self, event) -> None:
        self.dismiss(event.option.id)

    def action_cancel(self) -> None:
        self.dismiss(None)


class TextScreen(ModalScreen[None]):
    """A long text to read (one parity question's answers in full), scrolled with the arrow keys."""

    DEFAULT_CSS = """
    TextScreen { align: center middle; }
    TextScreen > VerticalScroll {
        width: 100%; max-width: 110; height: auto; max-height: 100%;
        border: thick $primary; background: $surface; padding: 0 1;
    }
    TextScreen #text-title { text-style: bold; }
    TextScreen #text-body { height: auto; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,enter,q", "dismiss", "Close")]

    def __init__(self, title: str, body: Text) -> None:
        super().__init__()
        self.title_text = title
        self.body = body

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Label(self.title_text, id="text-title", markup=False)
            yield Static(self.body, id="text-body")

    def on_mount(self) -> None:
        self.query_one(VerticalScroll).focus()
