"""Durations and training metrics as text, shared by the CLI and the TUI so a run reads the same in both.

Standard library only: the TUI imports this module and must never load the ML stack.
"""

from __future__ import annotations

import math

# Format specs (for `format`) of the metrics both the run log and the Train tab show.
LOSS_SPEC = ".4f"
LEARNING_RATE_SPEC = ".2e"
TOKENS_PER_S_SPEC = ",.0f"


def hours_minutes_seconds(seconds: float) -> tuple[int, int, int]:
    """A non-negative span rounded to whole seconds, split into hours, minutes and seconds."""
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return hours, minutes, secs


def clock_duration(seconds: float | None) -> str:
    """`1:02:05` or `4:05`, for log lines; `?` when unknown, and a negative span reads `0:00`."""
    if seconds is None:
        return "?"
    hours, minutes, secs = hours_minutes_seconds(max(seconds, 0))
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def compact_duration(seconds: float | None) -> str:
    """`1h02m`, `4m05s` or `12s`, for narrow panes; an em dash when unknown, NaN or negative."""
    if seconds is None or math.isnan(seconds) or seconds < 0:
        return "—"
    hours, minutes, secs = hours_minutes_seconds(seconds)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_metric(value: float | None, spec: str, *, missing: str = "-", unit: str = "") -> str:
    """`value` in the format spec `spec` followed by `unit`, or `missing` when the value is not known."""
    return missing if value is None else format(value, spec) + unit
