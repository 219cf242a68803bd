"""How durations and metrics read in the run log (`tunedeck logs`) and in the TUI's panes."""

from __future__ import annotations

import pytest

from engine.display import (
    LOSS_SPEC,
    TOKENS_PER_S_SPEC,
    clock_duration,
    compact_duration,
    format_metric,
    hours_minutes_seconds,
)


@pytest.mark.parametrize(
    ("seconds", "parts"),
    [(0, (0, 0, 0)), (59.4, (0, 0, 59)), (59.6, (0, 1, 0)), (3661, (1, 1, 1)), (90_000, (25, 0, 0))],
)
def test_a_span_splits_into_whole_hours_minutes_and_seconds(
    seconds: float, parts: tuple[int, int, int]
) -> None:
    assert hours_minutes_seconds(seconds) == parts


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (None, "?"),
        (-3.0, "0:00"),
        (0, "0:00"),
        (7.4, "0:07"),
        (245, "4:05"),
        (3725, "1:02:05"),
        (36_000, "10:00:00"),
    ],
)
def test_clock_duration_for_log_lines(seconds: float | None, shown: str) -> None:
    assert clock_duration(seconds) == shown


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (None, "—"),
        (float("nan"), "—"),
        (-1.0, "—"),
        (0, "0s"),
        (12.4, "12s"),
        (245, "4m05s"),
        (3725, "1h02m"),
        (36_000, "10h00m"),
    ],
)
def test_compact_duration_for_narrow_panes(seconds: float | None, shown: str) -> None:
    assert compact_duration(seconds) == shown


def test_format_metric_shows_the_placeholder_only_for_a_missing_value() -> None:
    assert format_metric(1.234567, LOSS_SPEC) == "1.2346"
    assert format_metric(0.0, LOSS_SPEC) == "0.0000"
    assert format_metric(None, LOSS_SPEC) == "-"
    assert format_metric(12_345.6, TOKENS_PER_S_SPEC, missing="—") == "12,346"
    assert format_metric(7.94, ".1f", unit=" GiB") == "7.9 GiB"
    assert format_metric(None, ".1f", missing="—", unit=" GiB") == "—"
