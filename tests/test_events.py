"""The event protocol: round-trips, tolerance of torn and unknown lines, and incremental tailing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from engine import events
from engine.events import EVENT_TYPES, EventTail, EventWriter, Log, Step, parse_event, read_events


def _example(cls: type[events.Event]) -> events.Event:
    """An instance of `cls` with every required field filled by a value of its type."""
    values = {}
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING:
            continue
        values[field.name] = {"int": 7, "float": 1.5, "str": "x"}.get(str(field.type).split(" ")[0], "x")
    return cls(**values)


@pytest.mark.parametrize("event_type", sorted(EVENT_TYPES))
def test_every_event_type_round_trips_through_one_json_line(event_type: str) -> None:
    original = _example(EVENT_TYPES[event_type])
    line = original.to_json()
    assert "\n" not in line
    data = json.loads(line)
    assert data["v"] == events.SCHEMA_VERSION and data["type"] == event_type
    assert parse_event(line) == original


def test_readers_ignore_unknown_types_unknown_fields_and_garbage() -> None:
    assert parse_event('{"v": 1, "type": "from_the_future", "x": 1}') is None
    assert parse_event("not json") is None
    assert parse_event("[1, 2]") is None
    newer = json.loads(Step(step=3, loss=0.5).to_json()) | {"new_field": [1, 2]}
    parsed = parse_event(json.dumps(newer))
    assert isinstance(parsed, Step) and parsed.step == 3 and parsed.loss == 0.5


def test_read_events_survives_a_last_line_cut_by_a_kill(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    events.write_events(path, [Log(message="a"), Step(step=1, loss=2.0)])
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"v":1,"type":"step","step":2,"lo')
    assert [type(e).__name__ for e in read_events(path)] == ["Log", "Step"]


def test_event_tail_returns_only_new_complete_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    tail = EventTail(path)
    assert tail.poll() == []
    line = Step(step=1).to_json()
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line[:10])
        handle.flush()
        assert tail.poll() == []
        handle.write(line[10:] + "\n" + Step(step=2).to_json() + "\n")
    assert [e.step for e in tail.poll()] == [1, 2]
    assert tail.poll() == []


def test_writer_keeps_writing_the_file_after_its_viewer_goes_away(tmp_path: Path) -> None:
    class GonePipe:
        def write(self, _text: str) -> None:
            raise BrokenPipeError

        def flush(self) -> None:
            raise BrokenPipeError

    writer = EventWriter(stream=GonePipe(), log_path=tmp_path / "events.jsonl")  # type: ignore[arg-type]
    writer.emit(Step(step=1))
    writer.emit(Step(step=2))
    writer.close()
    assert [e.step for e in read_events(tmp_path / "events.jsonl")] == [1, 2]


def test_events_module_imports_only_the_standard_library() -> None:
    source = Path(events.__file__).read_text(encoding="utf-8")
    imported = {
        line.split()[1].split(".")[0] for line in source.splitlines() if line.startswith(("import ", "from "))
    }
    assert imported <= {
        "__future__",
        "dataclasses",
        "json",
        "os",
        "sys",
        "time",
        "collections",
        "pathlib",
        "typing",
    }
