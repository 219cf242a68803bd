"""A braille line plot of training and eval loss: no plotting library, 2×4 dots a cell, any size."""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.text import Text
from textual.widget import Widget

Point = tuple[float, float]

# Bit of each dot in a braille cell, indexed [column][row].
_DOT_BITS = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))
_BRAILLE_BASE = 0x2800
Y_LABEL_WIDTH = 7
# Plain ANSI colour names, so the two lines stay distinct in 8- and 16-colour terminals (screen, old tmux).
LOSS_COLOR = "bold bright_cyan"
EVAL_COLOR = "bold yellow"


def _nice(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 0.01:
        return f"{value:.3f}"
    return f"{value:.1e}"


def plot_lines(
    series: Sequence[tuple[Sequence[Point], str]], width: int, height: int, *, x_label: str = "step"
) -> list[Text]:
    """Lines of a plot `width`×`height` cells: a y-axis, the series (later ones drawn over earlier) and an
    x-axis."""
    plot_w = max(4, width - Y_LABEL_WIDTH)
    plot_h = max(2, height - 1)
    points = [p for data, _ in series for p in data if math.isfinite(p[1])]
    if not points:
        lines = [Text(" " * width) for _ in range(height)]
        if height:
            lines[height // 2] = Text("waiting for the first logged step…".center(width)[:width], style="dim")
        return lines
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x_min, x_max = min(xs), max(xs)
    y_min, y_max = min(ys), max(ys)
    if y_max - y_min < 1e-9:
        y_min, y_max = y_min - 0.5, y_max + 0.5
    if x_max - x_min < 1e-9:
        x_max = x_min + 1
    dots_w, dots_h = plot_w * 2, plot_h * 4
    cells = [[0] * plot_w for _ in range(plot_h)]
    owner: list[list[str | None]] = [[None] * plot_w for _ in range(plot_h)]

    def to_dot(point: Point) -> tuple[int, int]:
        dx = round((point[0] - x_min) / (x_max - x_min) * (dots_w - 1))
        dy = round((y_max - point[1]) / (y_max - y_min) * (dots_h - 1))
        return dx, dy

    def set_dot(dx: int, dy: int, style: str) -> None:
        cx, cy = dx // 2, dy // 4
        if 0 <= cx < plot_w and 0 <= cy < plot_h:
            cells[cy][cx] |= _DOT_BITS[dx % 2][dy % 4]
            owner[cy][cx] = style

    for data, style in series:
        # Points are reduced to one (low, high) span per dot column first, so drawing costs the plot's width,
        # not the number of steps.
        columns: dict[int, tuple[int, int]] = {}
        for point in data:
            if math.isfinite(point[1]):
                dx, dy = to_dot(point)
                low, high = columns.get(dx, (dy, dy))
                columns[dx] = (min(low, dy), max(high, dy))
        previous: tuple[int, int] | None = None
        for dx in sorted(columns):
            low, high = columns[dx]
            for dy in range(low, high + 1):
                set_dot(dx, dy, style)
            if previous is not None:
                # Join neighbouring columns so a steep drop reads as a line, not scattered dots.
                px, py = previous
                target = low if abs(low - py) < abs(high - py) else high
                steps = max(abs(dx - px), abs(target - py), 1)
                for i in range(1, steps):
                    set_dot(px + (dx - px) * i // steps, py + (target - py) * i // steps, style)
            previous = (dx, (low + high) // 2)

    lines: list[Text] = []
    for row in range(plot_h):
        if row == 0:
            label = _nice(y_max)
        elif row == plot_h - 1:
            label = _nice(y_min)
        elif row == plot_h // 2 and plot_h > 4:
            label = _nice((y_max + y_min) / 2)
        else:
            label = ""
        line = Text(label.rjust(Y_LABEL_WIDTH - 1)[: Y_LABEL_WIDTH - 1] + "┤", style="dim")
        for col in range(plot_w):
            bits = cells[row][col]
            line.append(chr(_BRAILLE_BASE + bits) if bits else " ", style=owner[row][col] or "")
        lines.append(line)
    left = f"{x_label} {x_min:.0f}"
    right = f"{x_max:.0f}"
    axis = " " * Y_LABEL_WIDTH + left + right.rjust(max(1, plot_w - len(left)))
    lines.append(Text(axis[:width], style="dim"))
    return lines


class LossPlot(Widget):
    """Training loss as a line and eval loss as a second line in another colour, rescaled on every update."""

    DEFAULT_CSS = """
    LossPlot { height: 8; min-height: 4; }
    """

    def __init__(self, *, name: str | None = None, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.loss_points: tuple[Point, ...] = ()
        self.eval_points: tuple[Point, ...] = ()

    def set_series(self, loss_points: Sequence[Point], eval_points: Sequence[Point]) -> None:
        """Replace the plotted points; redraws only when they changed."""
        loss, evals = tuple(loss_points), tuple(eval_points)
        if loss != self.loss_points or evals != self.eval_points:
            self.loss_points, self.eval_points = loss, evals
            self.refresh()

    def render(self) -> Text:
        lines = plot_lines(
            [(self.loss_points, LOSS_COLOR), (self.eval_points, EVAL_COLOR)],
            self.size.width,
            self.size.height,
        )
        return Text("\n").join(lines)
