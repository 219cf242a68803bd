"""The JSON-lines event protocol every engine process speaks on stdout and appends to its run's events.jsonl.

Standard library only: the TUI, the CLI and any other viewer read events without importing the ML stack.
Readers ignore unknown event types and unknown fields, so older viewers survive newer engines.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any, ClassVar

SCHEMA_VERSION = 1


@dataclasses.dataclass
class Event:
    """Base of every event; `time` is seconds since the epoch when it was emitted."""

    type: ClassVar[str] = "event"
    time: float = dataclasses.field(default_factory=time.time, kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        """The wire form: schema version, type, then the fields."""
        return {"v": SCHEMA_VERSION, "type": self.type, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        """One line of JSON, without the newline."""
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))


EVENT_TYPES: dict[str, type[Event]] = {}


def _register(cls: type[Event]) -> type[Event]:
    EVENT_TYPES[cls.type] = cls
    return cls


@_register
@dataclasses.dataclass
class RunStarted(Event):
    """A training run began (or resumed from `resumed_from_step`)."""

    type: ClassVar[str] = "run_started"
    run_id: str
    recipe: str = ""
    method: str = ""
    base_model: str = ""
    dataset: str = ""
    total_steps: int = 0
    num_train: int = 0
    num_eval: int = 0
    device: str = ""
    pid: int = 0
    resumed_from_step: int | None = None


@_register
@dataclasses.dataclass
class Step(Event):
    """One optimizer step; `tokens` are the trained (non-pad) tokens since the previous step event, summed
    over every process of the run, `tokens_per_s` their rate, `eta_s` the time left."""

    type: ClassVar[str] = "step"
    step: int
    total_steps: int = 0
    epoch: float = 0.0
    loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_s: float | None = None
    gpu_mem_gib: float | None = None
    eta_s: float | None = None
    elapsed_s: float | None = None
    tokens: int | None = None


@_register
@dataclasses.dataclass
class Eval(Event):
    """Loss on the held-out split at `step`."""

    type: ClassVar[str] = "eval"
    step: int
    eval_loss: float


@_register
@dataclasses.dataclass
class CheckpointSaved(Event):
    """A complete checkpoint now exists at `path` (it was renamed into place)."""

    type: ClassVar[str] = "checkpoint"
    step: int
    path: str


@_register
@dataclasses.dataclass
class Log(Event):
    """A human-readable line; `level` is info, warning or error."""

    type: ClassVar[str] = "log"
    message: str
    level: str = "info"


@_register
@dataclasses.dataclass
class Progress(Event):
    """Progress of a long stage that is not a training step (model preparation, export stages, evaluation)."""

    type: ClassVar[str] = "progress"
    stage: str
    current: float = 0.0
    total: float = 0.0
    eta_s: float | None = None
    message: str = ""


@_register
@dataclasses.dataclass
class RunFinished(Event):
    """The process finished its job; `status` is finished or stopped (a stop saved a checkpoint first)."""

    type: ClassVar[str] = "run_finished"
    status: str = "finished"
    step: int = 0
    final_loss: float | None = None
    elapsed_s: float = 0.0
    checkpoint: str = ""
    outputs: dict[str, Any] = dataclasses.field(default_factory=dict)


@_register
@dataclasses.dataclass
class RunFailed(Event):
    """The process failed: `cause` is one sentence, `next_step` what to try."""

    type: ClassVar[str] = "run_failed"
    title: str
    cause: str
    next_step: str = ""
    details_path: str = ""

    @classmethod
    def of(cls, error: Any, details_path: Path | str = "") -> RunFailed:
        """The event that reports an EngineError: its title, one-sentence cause and next step."""
        return cls(
            title=error.title, cause=error.message, next_step=error.next_step, details_path=str(details_path)
        )


@_register
@dataclasses.dataclass
class ChatReady(Event):
    """The chat engine loaded a model (and maybe an adapter) and accepts requests."""

    type: ClassVar[str] = "chat_ready"
    model: str
    adapter: str = ""
    backend: str = "hf"


@_register
@dataclasses.dataclass
class Token(Event):
    """A piece of a streamed reply."""

    type: ClassVar[str] = "token"
    request_id: str
    text: str
    slot: str = "adapter"


@_register
@dataclasses.dataclass
class ReplyDone(Event):
    """A reply ended: `stop_reason` is eos, length, stopped or error."""

    type: ClassVar[str] = "reply_done"
    request_id: str
    text: str = ""
    tokens: int = 0
    tokens_per_s: float = 0.0
    stop_reason: str = "eos"
    slot: str = "adapter"


@_register
@dataclasses.dataclass
class AdapterSwapped(Event):
    """The chat engine switched to a newer checkpoint of a run."""

    type: ClassVar[str] = "adapter_swapped"
    path: str
    step: int = 0


TERMINAL_TYPES = frozenset({RunFinished.type, RunFailed.type})


def event_from_dict(data: dict[str, Any]) -> Event | None:
    """Build the event a dict describes, or None for an unknown type; unknown fields are dropped."""
    cls = EVENT_TYPES.get(str(data.get("type", "")))
    if cls is None:
        return None
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in data.items() if k in known}
    try:
        return cls(**kwargs)
    except TypeError:
        return None


def parse_event(line: str) -> Event | None:
    """Parse one line; None for blank, malformed, truncated or unknown-type lines."""
    line = line.strip()
    if not line:
        return None
    try:
        data = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    return event_from_dict(data)


def read_events(path: Path) -> list[Event]:
    """Every readable event of an events.jsonl, tolerating a last line cut short by a kill."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return [event for event in map(parse_event, handle) if event is not None]
    except FileNotFoundError:
        return []


class EventTail:
    """Incremental reader of a growing events.jsonl: each `poll()` returns the events appended since the last."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._offset = 0
        self._pending = b""

    def poll(self) -> list[Event]:
        """Events written since the previous call; a partial last line waits for its newline."""
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        data = self._pending + chunk
        lines = data.split(b"\n")
        self._pending = lines.pop()
        events = (parse_event(raw.decode("utf-8", errors="replace")) for raw in lines)
        return [event for event in events if event is not None]


def claim_stdout() -> IO[str]:
    """Reserve the real stdout for events and point fd 1 and sys.stdout at stderr.

    Any stray print, from our code or a library's C code, then lands in the log instead of the event stream.
    """
    sys.stdout.flush()
    event_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(event_fd, "w", encoding="utf-8", buffering=1)


class EventWriter:
    """Writes events to a stream (normally the claimed stdout) and appends them to an events.jsonl."""

    def __init__(self, stream: IO[str] | None = None, log_path: Path | None = None) -> None:
        self.stream = stream
        self.log_path = Path(log_path) if log_path else None
        self._log: IO[str] | None = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115 - held open for the run

    def emit(self, event: Event) -> None:
        """Write one event as one line and flush both sinks, so a kill loses at most this line; when the file
        cannot take it (a full disk), the stream still gets it and the file's OSError is raised after."""
        line = event.to_json() + "\n"
        file_error: OSError | None = None
        if self._log is not None:
            try:
                self._log.write(line)
                self._log.flush()
            except OSError as exc:
                file_error = exc
        if self.stream is not None:
            try:
                self.stream.write(line)
                self.stream.flush()
            except (BrokenPipeError, ValueError):
                # The viewer went away (closed TUI, dropped SSH); the run goes on and the file keeps the record.
                self.stream = None
        if file_error is not None:
            raise file_error

    def close(self) -> None:
        """Flush and close the events file."""
        if self._log is not None:
            self._log.flush()
            os.fsync(self._log.fileno())
            self._log.close()
            self._log = None


def write_events(path: Path, events: Iterable[Event]) -> None:
    """Append events to a file (used by tests and replays)."""
    writer = EventWriter(log_path=path)
    for event in events:
        writer.emit(event)
    writer.close()


def iter_stream(stream: IO[str]) -> Iterator[Event]:
    """Events read from a live stream, such as an engine subprocess's stdout."""
    for line in stream:
        event = parse_event(line)
        if event is not None:
            yield event
