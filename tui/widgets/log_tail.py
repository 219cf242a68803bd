"""The last lines of a run's log, drawn to fit the widget's height; repaints without a layout pass."""

from __future__ import annotations

from collections import deque

from rich.text import Text
from textual.widget import Widget

LINES_KEPT = 200


class LogTail(Widget):
    """A fixed-size view of the newest log lines (the whole log stays in the run folder)."""

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.lines: deque[Text] = deque(maxlen=LINES_KEPT)

    def clear(self) -> None:
        """Forget every line."""
        self.lines.clear()
        self.refresh()

    def extend(self, lines: list[Text]) -> None:
        """Add lines at the bottom."""
        if lines:
            self.lines.extend(lines)
            self.refresh()

    def render(self) -> Text:
        height = max(1, self.size.height)
        shown = list(self.lines)[-height:]
        for line in shown:
            line.no_wrap, line.overflow = True, "ellipsis"
        return Text("\n").join(shown)
