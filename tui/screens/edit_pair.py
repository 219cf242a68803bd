"""The pair editor: multi-line question and answer, optional system prompt, lints as you type."""

from __future__ import annotations

from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static, TextArea

from engine.dataset import QAPair, estimate_tokens, normalise_question


def quick_lints(pair: QAPair, other_questions: set[str], max_tokens: int | None) -> list[str]:
    """The lints engine.dataset would report for this pair, cheap enough to run on every key."""
    found = []
    if not pair.question.strip():
        found.append("the question is empty")
    elif normalise_question(pair.question) in other_questions:
        found.append("the question repeats another row's")
    if not pair.answer.strip():
        found.append("the answer is empty")
    estimate = estimate_tokens(pair)
    if max_tokens is not None and estimate > max_tokens:
        found.append(f"about {estimate:,} tokens, over the limit of {max_tokens:,}")
    return found


class EditPairScreen(ModalScreen[QAPair | None]):
    """Edit one pair; ctrl+s keeps it (and autosaves the file), escape throws the edit away."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+s", "save", "Keep edit"),
        Binding("escape", "cancel", "Cancel"),
    ]

    def __init__(
        self, pair: QAPair, *, title: str, other_questions: set[str], max_tokens: int | None
    ) -> None:
        super().__init__()
        self.pair = pair
        self.title_text = title
        self.other_questions = other_questions
        self.max_tokens = max_tokens

    def compose(self) -> ComposeResult:
        with Vertical(id="edit-pair"):
            yield Label(
                f"{self.title_text}  [dim]ctrl+s keep · esc cancel · tab next field[/]", id="edit-title"
            )
            yield Input(
                self.pair.system, placeholder="system prompt (optional)", compact=True, id="edit-system"
            )
            yield Label("question", classes="edit-label")
            yield TextArea(self.pair.question, id="edit-question", soft_wrap=True, tab_behavior="focus")
            yield Label("answer", classes="edit-label")
            yield TextArea(self.pair.answer, id="edit-answer", soft_wrap=True, tab_behavior="focus")
            yield Static(id="edit-lints")
            with Horizontal(id="edit-buttons"):
                yield Button("Keep (ctrl+s)", variant="success", compact=True, id="keep")
                yield Button("Cancel (esc)", compact=True, id="cancel")

    def on_mount(self) -> None:
        self.query_one("#edit-question", TextArea).focus()
        self._relint()

    def current(self) -> QAPair:
        """The pair as typed so far."""
        return QAPair(
            question=self.query_one("#edit-question", TextArea).text,
            answer=self.query_one("#edit-answer", TextArea).text,
            system=self.query_one("#edit-system", Input).value,
        )

    @on(TextArea.Changed)
    @on(Input.Changed)
    def _relint(self) -> None:
        pair = self.current()
        lints = quick_lints(pair, self.other_questions, self.max_tokens)
        text = f"~{estimate_tokens(pair):,} tokens"
        text += "  [red]✖ " + " · ".join(lints) + "[/]" if lints else "  [green]✓ no lints[/]"
        self.query_one("#edit-lints", Static).update(text)

    @on(Button.Pressed, "#keep")
    def action_save(self) -> None:
        """Keep the edit."""
        self.dismiss(self.current())

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        """Discard the edit."""
        self.dismiss(None)
