"""Question/answer datasets: the JSONL model, strict and lenient loaders, importers, exporters and lints.

Standard library only, so the TUI can load, lint and save datasets without the ML stack. Every unreadable line
is reported with its line number, what is wrong and how to fix it, instead of failing later at tokenization.
"""

from __future__ import annotations

import bisect
import csv
import dataclasses
import difflib
import io
import json
import math
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from engine.atomic import atomic_write_text, remove_stale_temps
from engine.errors import DatasetError

QUESTION_KEY = "question"
ANSWER_KEY = "answer"
SYSTEM_KEY = "system"

# "jsonl" is tunedeck's own question/answer format; the others are what `tunedeck data import` understands.
FORMATS: tuple[str, ...] = ("jsonl", "alpaca", "sharegpt", "openai", "csv")
FORMAT_NAMES = {
    "jsonl": "tunedeck JSONL",
    "alpaca": "Alpaca",
    "sharegpt": "ShareGPT",
    "openai": "OpenAI messages",
    "csv": "CSV",
}

EMPTY_FILE_MESSAGE = "the file is empty"
NO_RECORDS_MESSAGE = "the file holds no records"

# How many problems the one-sentence summary of a DatasetFileError spells out; `.problems` keeps them all.
SUMMARY_PROBLEMS = 3
# Keys and values quoted in messages are shortened so one message stays one readable line.
QUOTE_LIMIT = 40
# A rough tokens-per-byte ratio for English text, used only when no tokenizer-based counter is given.
ESTIMATED_BYTES_PER_TOKEN = 4

CSV_QUESTION_COLUMNS = ("question", "prompt", "instruction", "query", "q", "user", "input")
CSV_ANSWER_COLUMNS = ("answer", "response", "output", "completion", "a", "reply", "assistant", "target")
CSV_SYSTEM_COLUMNS = ("system", "system_prompt", "system_message")
CSV_DELIMITERS = (",", ";", "\t", "|")

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "system": "system",
}
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

# Keys that betray which format a JSON record is in, used by format sniffing and by hints in messages.
FORMAT_MARKERS: tuple[tuple[str, frozenset[str]], ...] = (
    ("jsonl", frozenset({QUESTION_KEY, ANSWER_KEY})),
    ("sharegpt", frozenset({"conversations"})),
    ("openai", frozenset({"messages"})),
    ("alpaca", frozenset({"instruction", "output"})),
)


@dataclasses.dataclass
class QAPair:
    """One training example: a question, the answer the model should learn, and an optional system prompt."""

    question: str
    answer: str
    system: str = ""


@dataclasses.dataclass(frozen=True)
class LineProblem:
    """One unreadable line, record or row: where it starts, what is wrong (`message`) and the `fix`."""

    line: int
    message: str
    fix: str
    record: int | None = None
    unit: str = "record"

    @property
    def is_empty_file(self) -> bool:
        """True for the problem of a file with no records at all (which a new, blank dataset also is)."""
        return self.message in (EMPTY_FILE_MESSAGE, NO_RECORDS_MESSAGE)

    @property
    def location(self) -> str:
        """Where the problem is, e.g. `line 12` or `line 12 (row 11)`."""
        if self.record is None:
            return f"line {self.line}"
        return f"line {self.line} ({self.unit} {self.record})"

    def __str__(self) -> str:
        return f"{self.location}: {self.message} — {self.fix}"


class DatasetFileError(DatasetError):
    """A dataset file cannot be read or has bad lines; `.problems` lists each one (none if file-level)."""

    def __init__(
        self,
        message: str,
        *,
        path: Path | None = None,
        problems: Sequence[LineProblem] = (),
        next_step: str = "",
        title: str | None = None,
    ) -> None:
        super().__init__(message, title=title, next_step=next_step)
        self.path = path
        self.problems = list(problems)


@dataclasses.dataclass
class Dataset:
    """A loaded dataset: the readable `pairs`, the source line of each, and the `problems` of bad lines."""

    pairs: list[QAPair]
    path: Path | None = None
    problems: list[LineProblem] = dataclasses.field(default_factory=list)
    lines: list[int] = dataclasses.field(default_factory=list)
    # The format the file was read as (one of FORMATS), useful after format sniffing.
    format: str = "jsonl"

    def __post_init__(self) -> None:
        if len(self.lines) != len(self.pairs):
            # Without recorded source lines, pair i sits on line i + 1 as it would after saving.
            self.lines = list(range(1, len(self.pairs) + 1))

    @property
    def ok(self) -> bool:
        """True when every line of the file was read."""
        return not self.problems

    def lint(
        self, *, max_tokens: int | None = None, count_tokens: Callable[[QAPair], int] | None = None
    ) -> list[Lint]:
        """Lints of the readable pairs, located at their source lines."""
        return lint_pairs(self.pairs, max_tokens=max_tokens, count_tokens=count_tokens, lines=self.lines)


LintKind = Literal["empty_question", "empty_answer", "duplicate_question", "too_long"]


@dataclasses.dataclass(frozen=True)
class Lint:
    """A pair that will train badly: its 0-based `row`, 1-based source `line`, `kind`, message and fix."""

    row: int
    line: int
    kind: LintKind
    message: str
    fix: str
    first_row: int | None = None

    def __str__(self) -> str:
        return f"line {self.line}: {self.message} — {self.fix}"


class _RecordError(Exception):
    """Raised inside a record converter; becomes a LineProblem at the record's line."""

    def __init__(self, message: str, fix: str) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix


# ------------------------------------------------------------------------------------------------------------
# Small helpers for messages


def _shorten(text: str) -> str:
    return text if len(text) <= QUOTE_LIMIT else text[: QUOTE_LIMIT - 1] + "…"


def _quote(text: str) -> str:
    """A key or value as a message shows it: quoted, shortened, control characters and surrogates escaped."""
    return repr(_shorten(text))


def _quote_list(keys: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(_quote(key) for key in keys[:limit])
    if len(keys) > limit:
        shown += f" and {len(keys) - limit} more"
    return shown or "none"


def _printable(text: str) -> str:
    # A path with undecodable bytes (kept as surrogates) would make print() itself fail.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _display_name(path: Path) -> str:
    return _printable(path.name)


def _plural(count: int, word: str) -> str:
    return f"{count:,} {word}" if count == 1 else f"{count:,} {word}s"


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, str):
        return "a string"
    return type(value).__name__


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _closest(name: str, candidates: Sequence[str], cutoff: float = 0.6) -> str | None:
    """The candidate that `name` is most likely a misspelling of, compared case-insensitively."""
    lowered = {candidate.lower(): candidate for candidate in candidates}
    match = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=cutoff)
    return lowered[match[0]] if match else None


def _format_hint(keys: Sequence[str], expected: str) -> str | None:
    """A sentence fragment naming the import format that `keys` belong to, when it is not `expected`."""
    present = set(keys)
    for fmt, markers in FORMAT_MARKERS:
        if fmt != expected and markers <= present:
            if expected == "jsonl":
                name = FORMAT_NAMES[fmt]
                return f"this looks like {name} data, so convert it with `tunedeck data import FILE`"
            return f"this looks like {FORMAT_NAMES[fmt]} data, so import it with --format {fmt}"
    return None


# ------------------------------------------------------------------------------------------------------------
# Reading bytes and lines


@dataclasses.dataclass
class _Line:
    number: int
    offset: int
    text: str
    # The line ended in CRLF; CSV needs it to keep a CR that sits inside a quoted field.
    crlf: bool = False


@dataclasses.dataclass
class _Parsed:
    pairs: list[QAPair]
    lines: list[int]
    problems: list[LineProblem]
    fmt: str


def _read_bytes(path: Path) -> bytes:
    name = _display_name(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DatasetFileError(
            f"The dataset file {_printable(str(path))} does not exist.",
            path=path,
            next_step="Check the path (datasets live in the workspace's datasets/ folder).",
        ) from None
    except IsADirectoryError:
        raise DatasetFileError(
            f"{_printable(str(path))} is a folder, not a dataset file.",
            path=path,
            next_step="Pass the .jsonl file inside it.",
        ) from None
    except PermissionError:
        raise DatasetFileError(
            f"tunedeck may not read {name} (permission denied).",
            path=path,
            next_step="Check the file's permissions.",
        ) from None
    except OSError as exc:
        raise DatasetFileError(
            f"Reading {name} failed: {exc.strerror or exc}.",
            path=path,
            next_step="Check the file and try again.",
        ) from None


def _check_encoding(data: bytes, path: Path) -> None:
    """Refuse UTF-16/UTF-32 files as a whole, which would otherwise show up as a bad byte on every line."""
    for bom, encoding in (
        (b"\xff\xfe\x00\x00", "UTF-32"),
        (b"\x00\x00\xfe\xff", "UTF-32"),
        (b"\xff\xfe", "UTF-16"),
        (b"\xfe\xff", "UTF-16"),
    ):
        if data.startswith(bom):
            raise DatasetFileError(
                f"{_display_name(path)} is saved as {encoding}, but tunedeck reads UTF-8 only.",
                path=path,
                next_step="Re-save the file as UTF-8 (most editors offer it under 'Save with encoding').",
            )


def _split_lines(data: bytes) -> tuple[list[_Line], list[LineProblem]]:
    """Decode `data` line by line: a UTF-8 BOM and CRLF endings are accepted, each bad byte is a problem."""
    lines: list[_Line] = []
    problems: list[LineProblem] = []
    offset = 0
    start = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    for number, raw in enumerate(data[start:].split(b"\n"), start=1):
        line_offset = offset + start
        offset += len(raw) + 1
        crlf = raw.endswith(b"\r")
        if crlf:
            raw = raw[:-1]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad_byte = raw[exc.start]
            problems.append(
                LineProblem(
                    number,
                    f"byte 0x{bad_byte:02X} at column {exc.start + 1} "
                    f"(file offset {line_offset + exc.start:,}) is not valid UTF-8",
                    "re-save the file as UTF-8 or retype the characters around that column",
                )
            )
            continue
        lines.append(_Line(number, line_offset, text, crlf))
    return lines, problems


EXAMPLE_RECORDS = {
    "jsonl": '{"question": "…", "answer": "…"}',
    "alpaca": '{"instruction": "…", "input": "", "output": "…"}',
    "sharegpt": '{"conversations": [{"from": "human", "value": "…"}, {"from": "gpt", "value": "…"}]}',
    "openai": '{"messages": [{"role": "user", "content": "…"}, {"role": "assistant", "content": "…"}]}',
}


def _empty_problem(fmt: str) -> LineProblem:
    if fmt == "csv":
        return LineProblem(
            1, EMPTY_FILE_MESSAGE, "add a header line such as question,answer and one row per pair"
        )
    return LineProblem(1, EMPTY_FILE_MESSAGE, f"add one JSON object per line, like {EXAMPLE_RECORDS[fmt]}")


# ------------------------------------------------------------------------------------------------------------
# JSON parsing that remembers where each record starts


class _JsonObject(dict):  # type: ignore[type-arg]
    """A decoded JSON object that remembers the keys it held more than once."""

    duplicate_keys: tuple[str, ...] = ()


def _object_pairs(pairs: list[tuple[str, Any]]) -> _JsonObject:
    obj = _JsonObject()
    duplicates: list[str] = []
    for key, value in pairs:
        if key in obj and key not in duplicates:
            duplicates.append(key)
        obj[key] = value
    if duplicates:
        obj.duplicate_keys = tuple(duplicates)
    return obj


class _NotJsonConstant(ValueError):
    """NaN and Infinity, which Python's json accepts but JSON (and every other tool) does not."""


def _reject_constant(name: str) -> Any:
    raise _NotJsonConstant(name)


def _parse_int(text: str) -> int | float:
    # Python refuses to convert integers of more than ~4,300 digits; no field we read is a number anyway.
    return int(text) if len(text) <= 4000 else float("inf")


# strict=False accepts a raw tab (or other control character) inside a string: its meaning is unambiguous.
_DECODER = json.JSONDecoder(
    object_pairs_hook=_object_pairs, parse_constant=_reject_constant, parse_int=_parse_int, strict=False
)
_JSON_WHITESPACE = " \t\n\r"


def _json_error(exc: Exception) -> str:
    """The what-is-wrong part of a problem for a value that is not valid JSON."""
    if isinstance(exc, json.JSONDecodeError):
        # json's messages such as "Unterminated string starting at" expect a position after them.
        what = exc.msg[0].lower() + exc.msg[1:]
        return f"invalid JSON ({what.removesuffix(' at')} at column {exc.colno})"
    if isinstance(exc, _NotJsonConstant):
        return f"invalid JSON ({exc} is not a JSON value)"
    if isinstance(exc, RecursionError):
        return "invalid JSON (nested too deeply to read)"
    return f"invalid JSON ({exc})"


def _decode_line(text: str) -> Any:
    """Decode one JSONL line; raises ValueError or RecursionError for text that is not one JSON value."""
    return _DECODER.decode(text)


def _skip_whitespace(text: str, index: int) -> int:
    while index < len(text) and text[index] in _JSON_WHITESPACE:
        index += 1
    return index


class _ArrayError(Exception):
    def __init__(self, offset: int, message: str, fix: str) -> None:
        super().__init__(message)
        self.offset = offset
        self.message = message
        self.fix = fix


def _scan_array(text: str, start: int) -> list[tuple[int, Any]]:
    """Decode the JSON array at `start`, returning each element with the offset where it begins."""
    items: list[tuple[int, Any]] = []
    index = _skip_whitespace(text, start + 1)
    comma = index
    if index < len(text) and text[index] == "]":
        index += 1
    else:
        while True:
            if index < len(text) and text[index] == "]" and items:
                raise _ArrayError(comma, "a comma before the closing ']'", "delete that trailing comma")
            try:
                value, end = _DECODER.raw_decode(text, index)
            except (ValueError, RecursionError) as exc:
                position = exc.pos if isinstance(exc, json.JSONDecodeError) else index
                if index >= len(text):
                    raise _ArrayError(
                        len(text),
                        "the JSON array ends early",
                        "complete the last record and close it with ']'",
                    ) from None
                raise _ArrayError(position, _json_error(exc), "correct the JSON at that point") from None
            items.append((index, value))
            index = _skip_whitespace(text, end)
            if index >= len(text):
                raise _ArrayError(
                    len(text), "the JSON array ends early", "complete the last record and close it with ']'"
                )
            if text[index] == ",":
                comma = index
                index = _skip_whitespace(text, index + 1)
                continue
            if text[index] == "]":
                index += 1
                break
            raise _ArrayError(index, "records are not separated by a comma", "put a ',' between the records")
    index = _skip_whitespace(text, index)
    if index < len(text):
        raise _ArrayError(
            index, "there is more text after the closing ']'", "delete it or move it into the array"
        )
    return items


@dataclasses.dataclass
class _Record:
    line: int
    number: int | None
    value: Any


def _json_records(lines: list[_Line], problems: list[LineProblem], fmt: str) -> list[_Record]:
    """Every JSON value in the file, from one JSON array or one per line; unreadable ones become problems."""
    content = [line for line in lines if line.text.strip()]
    if not content:
        return []
    if content[0].text.lstrip().startswith("[") and not _reads_as_jsonl(content):
        if problems:
            # An array with undecodable bytes cannot be parsed around them; the bytes are reported already.
            return []
        return _array_records(lines, problems)
    records = []
    for line in content:
        try:
            value = _decode_line(line.text)
        except (ValueError, RecursionError) as exc:
            problems.append(LineProblem(line.number, _json_error(exc), _line_fix(line.text, fmt)))
            continue
        records.append(_Record(line.number, None, value))
    _explain_pretty_printed(content, problems)
    return records


# How many lines after the first decide whether a file that opens with '[' is JSONL after all.
JSONL_SNIFF_LINES = 50


def _reads_as_jsonl(content: list[_Line]) -> bool:
    """True for a JSONL file whose first line happens to open with '[' (a stray array, or a broken line).

    Inside a pretty-printed JSON array most lines are fragments (trailing commas, lone braces), while in JSONL
    every line stands alone, so more than half of the following lines decoding on their own means JSONL.
    """
    if len(content) < 2:
        return False
    if _decodes(content[0].text):
        return True
    following = content[1 : 1 + JSONL_SNIFF_LINES]
    return sum(_decodes(line.text) for line in following) * 2 > len(following)


def _line_fix(text: str, fmt: str) -> str:
    stripped = text.strip()
    if stripped.startswith("{") and not stripped.endswith("}"):
        return "complete the object and close it with '}' on the same line (one object per line)"
    return (
        f"make the line one complete JSON object, like {EXAMPLE_RECORDS.get(fmt, EXAMPLE_RECORDS['jsonl'])}"
    )


def _explain_pretty_printed(content: list[_Line], problems: list[LineProblem]) -> None:
    """Replace a flood of per-line errors by one problem when the file is one object over several lines."""
    if (
        len(problems) < 2
        or problems[0].line != content[0].number
        or not content[0].text.lstrip().startswith("{")
    ):
        return
    try:
        _decode_line("\n".join(line.text for line in content))
    except (ValueError, RecursionError):
        return
    problems[:] = [
        LineProblem(
            content[0].number,
            "the file holds one JSON object spread over several lines, but each line must be a whole record",
            "put each record on its own line (JSONL), or wrap the records in a JSON array",
        )
    ]


def _array_records(lines: list[_Line], problems: list[LineProblem]) -> list[_Record]:
    """The elements of a file that is one JSON array, each with the line where it starts."""
    text = "\n".join(line.text for line in lines)
    line_starts: list[int] = []
    position = 0
    for line in lines:
        line_starts.append(position)
        position += len(line.text) + 1

    def line_at(offset: int) -> int:
        return lines[max(0, bisect.bisect_right(line_starts, offset) - 1)].number

    try:
        items = _scan_array(text, text.index("["))
    except _ArrayError as exc:
        problems.append(LineProblem(line_at(exc.offset), exc.message, exc.fix))
        return []
    return [_Record(line_at(offset), number, value) for number, (offset, value) in enumerate(items, start=1)]


def _decodes(text: str) -> bool:
    try:
        _decode_line(text)
    except (ValueError, RecursionError):
        return False
    return True


# ------------------------------------------------------------------------------------------------------------
# Record converters: one JSON value in, pairs out, or a _RecordError naming what is wrong


def _require_object(value: Any, fmt: str) -> _JsonObject:
    if not isinstance(value, dict):
        raise _RecordError(
            f"the record is {_type_name(value)}, not a JSON object",
            f"write each record as an object, like {EXAMPLE_RECORDS[fmt]}",
        )
    duplicates = getattr(value, "duplicate_keys", ())
    if duplicates:
        raise _RecordError(
            f"the key {_quote(duplicates[0])} appears more than once in one object",
            f"keep one {_quote(duplicates[0])} and delete the others",
        )
    return value  # type: ignore[return-value]


# Other names for a field, so a misspelt alias ('respone') still leads to the right suggestion.
FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    QUESTION_KEY: ("prompt", "query", "instruction"),
    ANSWER_KEY: ("response", "completion", "reply", "output"),
    "instruction": ("question", "prompt"),
    "output": ("answer", "response", "completion"),
}


def _misspelling_of(field: str, keys: Sequence[str]) -> str | None:
    """The key among `keys` that was most likely meant to be `field`."""
    direct = _closest(field, keys)
    if direct is not None:
        return direct
    for key in keys:
        if _closest(key, FIELD_ALIASES.get(field, ()), cutoff=0.75) is not None:
            return key
    return None


def _missing_field(record: dict[str, Any], field: str, known: Sequence[str], fmt: str) -> _RecordError:
    keys = list(record)
    message = f"no {_quote(field)} field (found keys: {_quote_list(keys)})"
    hint = _format_hint(keys, fmt)
    if hint is not None:
        return _RecordError(message, hint)
    typo = _misspelling_of(field, [key for key in keys if key not in known])
    if typo is not None:
        return _RecordError(message, f"rename {_quote(typo)} to {_quote(field)}")
    kind = "list" if field in ("conversations", "messages") else "string"
    article = "an" if field[:1] in "aeiou" else "a"
    return _RecordError(message, f'add {article} "{field}" {kind}')


def _text_field(record: dict[str, Any], field: str, *, required: bool, known: Sequence[str], fmt: str) -> str:
    if field not in record:
        if required:
            raise _missing_field(record, field, known, fmt)
        return ""
    value = record[field]
    if value is None and not required:
        return ""
    return _checked_text(value, f"the {_quote(field)} field", field)


def _checked_text(value: Any, what: str, field: str) -> str:
    if not isinstance(value, str):
        fix = {
            "null": f"write the {field} text in double quotes, or delete the record",
            "a list": f"join the parts into one {field} string",
            "an object": f"replace it with the {field} text in double quotes",
        }.get(_type_name(value), f"put the {field} in double quotes so it is a string")
        raise _RecordError(f"{what} is {_type_name(value)}, not a string", fix)
    if _has_surrogate(value):
        raise _RecordError(
            f"{what} contains an escape for half a character (a lone \\ud800-\\udfff surrogate)",
            "remove that \\u escape or write the character itself",
        )
    return value


def _check_unknown_keys(record: dict[str, Any], optional: Sequence[str], known: Sequence[str]) -> None:
    """Reject a near-miss of an optional field the record lacks, which would otherwise be lost silently."""
    for key in record:
        if key in known:
            continue
        target = _closest(key, [name for name in optional if name not in record], cutoff=0.75)
        if target is not None:
            raise _RecordError(f"unknown field {_quote(key)}", f"rename it to {_quote(target)} or delete it")


NATIVE_KEYS = (QUESTION_KEY, ANSWER_KEY, SYSTEM_KEY)


def _convert_native(value: Any) -> list[QAPair]:
    record = _require_object(value, "jsonl")
    present = [key for key in (QUESTION_KEY, ANSWER_KEY) if key in record]
    if not present:
        keys = list(record)
        hint = _format_hint(keys, "jsonl")
        typo_q = _closest(QUESTION_KEY, keys)
        typo_a = _closest(ANSWER_KEY, keys)
        if hint is None and typo_q and typo_a and typo_q != typo_a:
            fix = f"rename {_quote(typo_q)} to 'question' and {_quote(typo_a)} to 'answer'"
        else:
            fix = hint or 'add "question" and "answer" strings'
        raise _RecordError(f"no 'question' or 'answer' field (found keys: {_quote_list(keys)})", fix)
    question = _text_field(record, QUESTION_KEY, required=True, known=NATIVE_KEYS, fmt="jsonl")
    answer = _text_field(record, ANSWER_KEY, required=True, known=NATIVE_KEYS, fmt="jsonl")
    system = _text_field(record, SYSTEM_KEY, required=False, known=NATIVE_KEYS, fmt="jsonl")
    _check_unknown_keys(record, (SYSTEM_KEY,), NATIVE_KEYS)
    return [QAPair(question, answer, system)]


ALPACA_KEYS = ("instruction", "input", "output", "system", "history")


def _join_question(instruction: str, extra_input: str) -> str:
    return f"{instruction}\n\n{extra_input}" if extra_input.strip() else instruction


def _convert_alpaca(value: Any) -> list[QAPair]:
    record = _require_object(value, "alpaca")
    instruction = _text_field(record, "instruction", required=True, known=ALPACA_KEYS, fmt="alpaca")
    output = _text_field(record, "output", required=True, known=ALPACA_KEYS, fmt="alpaca")
    extra_input = _text_field(record, "input", required=False, known=ALPACA_KEYS, fmt="alpaca")
    system = _text_field(record, "system", required=False, known=ALPACA_KEYS, fmt="alpaca")
    _check_unknown_keys(record, ("input", "system"), ALPACA_KEYS)
    pairs = [QAPair(q, a, system) for q, a in _alpaca_history(record.get("history"))]
    pairs.append(QAPair(_join_question(instruction, extra_input), output, system))
    return pairs


def _alpaca_history(history: Any) -> list[tuple[str, str]]:
    """LLaMA-Factory's optional `history`: earlier [question, answer] turns, each kept as its own pair."""
    if history is None:
        return []
    fix = 'write it as a list of ["question", "answer"] pairs, or delete it'
    if not isinstance(history, list):
        raise _RecordError(f"the 'history' field is {_type_name(history)}, not a list", fix)
    turns = []
    for index, turn in enumerate(history, start=1):
        if not (isinstance(turn, list) and len(turn) == 2):
            raise _RecordError(f"entry {index} of 'history' is not a [question, answer] pair", fix)
        question = _checked_text(turn[0], f"the question of 'history' entry {index}", "question")
        answer = _checked_text(turn[1], f"the answer of 'history' entry {index}", "answer")
        turns.append((question, answer))
    return turns


def _pair_turns(turns: list[tuple[str, str]], system: str, user: str, assistant: str) -> list[QAPair]:
    """One pair per user turn and the assistant turn that answers it; system turns set the system prompt."""
    pairs: list[QAPair] = []
    pending: tuple[int, str] | None = None
    for number, (role, text) in enumerate(turns, start=1):
        if role == "system":
            system = text
        elif role == "user":
            if pending is not None:
                raise _RecordError(
                    f"turns {pending[0]} and {number} both come from {_quote(user)} with no reply between",
                    f"merge them or add the {_quote(assistant)} reply between them",
                )
            pending = (number, text)
        else:
            if pending is None:
                raise _RecordError(
                    f"turn {number} is a {_quote(assistant)} reply with no question before it",
                    f"add the {_quote(user)} turn it answers, or delete it",
                )
            pairs.append(QAPair(pending[1], text, system))
            pending = None
    if pending is not None:
        raise _RecordError(
            f"the last {_quote(user)} turn (turn {pending[0]}) has no {_quote(assistant)} reply",
            "add the reply or delete that turn",
        )
    if not pairs:
        raise _RecordError(
            f"the conversation has no {_quote(user)} turn followed by a {_quote(assistant)} reply",
            "add a question and its answer, or delete the record",
        )
    return pairs


SHAREGPT_KEYS = ("conversations", "system", "tools", "id")


def _convert_sharegpt(value: Any) -> list[QAPair]:
    record = _require_object(value, "sharegpt")
    if "conversations" not in record:
        raise _missing_field(record, "conversations", SHAREGPT_KEYS, "sharegpt")
    conversation = record["conversations"]
    if not isinstance(conversation, list):
        raise _RecordError(
            f"the 'conversations' field is {_type_name(conversation)}, not a list",
            'make it a list of turns like {"from": "human", "value": "…"}',
        )
    system = _text_field(record, "system", required=False, known=SHAREGPT_KEYS, fmt="sharegpt")
    turns: list[tuple[str, str]] = []
    for number, turn in enumerate(conversation, start=1):
        if not isinstance(turn, dict):
            raise _RecordError(
                f"turn {number} is {_type_name(turn)}, not an object",
                'write each turn as {"from": "human" or "gpt", "value": "…"}',
            )
        role_key, text_key = (
            ("role", "content") if "from" not in turn and "role" in turn else ("from", "value")
        )
        if role_key not in turn or text_key not in turn:
            missing = role_key if role_key not in turn else text_key
            raise _RecordError(
                f"turn {number} has no {_quote(missing)} (found keys: {_quote_list(list(turn))})",
                'write each turn as {"from": "human" or "gpt", "value": "…"}',
            )
        speaker = turn[role_key]
        if not isinstance(speaker, str) or speaker.strip().lower() not in SHAREGPT_ROLES:
            shown = _quote(speaker) if isinstance(speaker, str) else _type_name(speaker)
            raise _RecordError(
                f"turn {number} is from {shown}, which tunedeck cannot train on",
                "use 'human', 'gpt' or 'system' (tool and function turns are not supported; delete them)",
            )
        text = _checked_text(turn[text_key], f"the {_quote(text_key)} of turn {number}", "turn")
        turns.append((SHAREGPT_ROLES[speaker.strip().lower()], text))
    return _pair_turns(turns, system, "human", "gpt")


OPENAI_KEYS = ("messages", "tools", "parallel_tool_calls", "id")


def _openai_content(content: Any, number: int) -> str:
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                raise _RecordError(
                    f"message {number} has a content part that is not text",
                    'keep only {"type": "text", "text": "…"} parts (images and audio are not supported)',
                )
            parts.append(part["text"])
        content = "".join(parts)
    return _checked_text(content, f"the 'content' of message {number}", "message")


def _convert_openai(value: Any) -> list[QAPair]:
    record = _require_object(value, "openai")
    if "messages" not in record:
        raise _missing_field(record, "messages", OPENAI_KEYS, "openai")
    messages = record["messages"]
    if not isinstance(messages, list):
        raise _RecordError(
            f"the 'messages' field is {_type_name(messages)}, not a list",
            'make it a list like [{"role": "user", "content": "…"}, {"role": "assistant", "content": "…"}]',
        )
    turns: list[tuple[str, str]] = []
    skip_reply_of: set[int] = set()
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise _RecordError(
                f"message {number} is {_type_name(message)}, not an object",
                'write each message as {"role": "user" or "assistant", "content": "…"}',
            )
        if "role" not in message or "content" not in message:
            missing = "role" if "role" not in message else "content"
            raise _RecordError(
                f"message {number} has no {_quote(missing)} (found keys: {_quote_list(list(message))})",
                'write each message as {"role": "user" or "assistant", "content": "…"}',
            )
        role = message["role"]
        if not isinstance(role, str) or role not in OPENAI_ROLES:
            shown = _quote(role) if isinstance(role, str) else _type_name(role)
            raise _RecordError(
                f"message {number} has role {shown}, which tunedeck cannot train on",
                "use 'system', 'user' or 'assistant' (tool messages are not supported; delete them)",
            )
        if role == "assistant" and message["content"] is None:
            raise _RecordError(
                f"message {number} is an assistant message without text (a tool call)",
                "delete tool calls and their results from the conversation",
            )
        turns.append((OPENAI_ROLES[role], _openai_content(message["content"], number)))
        # OpenAI's fine-tuning format marks replies not to learn with "weight": 0.
        if role == "assistant" and message.get("weight") == 0:
            skip_reply_of.add(len(turns) - 1)
    pairs = _pair_turns(turns, "", "user", "assistant")
    if skip_reply_of:
        replies = [index for index, (role, _) in enumerate(turns) if role == "assistant"]
        pairs = [pair for pair, index in zip(pairs, replies, strict=True) if index not in skip_reply_of]
    return pairs


CONVERTERS: dict[str, Callable[[Any], list[QAPair]]] = {
    "jsonl": _convert_native,
    "alpaca": _convert_alpaca,
    "sharegpt": _convert_sharegpt,
    "openai": _convert_openai,
}


def _sniff_records(records: list[_Record]) -> str | None:
    """The JSON format of the first record with all of a format's marker keys, else of the first with one."""
    objects = [set(record.value) for record in records[:50] if isinstance(record.value, dict)]
    for keys in objects:
        for fmt, markers in FORMAT_MARKERS:
            if markers <= keys:
                return fmt
    # Records that all misspell a field still get per-line did-you-mean problems rather than "unknown format".
    for keys in objects:
        for fmt, markers in FORMAT_MARKERS:
            if markers & keys:
                return fmt
    return None


def _convert_records(records: list[_Record], fmt: str, problems: list[LineProblem]) -> _Parsed:
    convert = CONVERTERS[fmt]
    pairs: list[QAPair] = []
    lines: list[int] = []
    for record in records:
        try:
            converted = convert(record.value)
        except _RecordError as exc:
            problems.append(LineProblem(record.line, exc.message, exc.fix, record.number))
            continue
        pairs.extend(converted)
        lines.extend([record.line] * len(converted))
    problems.sort(key=lambda problem: problem.line)
    return _Parsed(pairs, lines, problems, fmt)


# ------------------------------------------------------------------------------------------------------------
# CSV


def _normalise_column(name: str) -> str:
    return name.strip().lstrip("\ufeff").lower().replace(" ", "_").replace("-", "_")


def _pick_delimiter(header: str, path: Path) -> str:
    """The delimiter the header line uses most (a .tsv file's tab first), defaulting to a comma."""
    if path.suffix.lower() == ".tsv" and "\t" in header:
        return "\t"
    counts = {delimiter: header.count(delimiter) for delimiter in CSV_DELIMITERS}
    best = max(CSV_DELIMITERS, key=lambda delimiter: counts[delimiter])
    return best if counts[best] else ","


def _find_column(columns: list[str], aliases: Sequence[str]) -> int | None:
    for alias in aliases:
        if alias in columns:
            return columns.index(alias)
    return None


def _parse_csv(lines: list[_Line], problems: list[LineProblem], path: Path) -> _Parsed:
    pairs: list[QAPair] = []
    pair_lines: list[int] = []
    if not any(line.text.strip() for line in lines):
        return _Parsed(pairs, pair_lines, problems, "csv")
    # Lines that were not UTF-8 stay as blank lines, so the reader's line numbers still match the file.
    by_number = {line.number: line.text + ("\r" if line.crlf else "") for line in lines}
    text = "\n".join(by_number.get(number, "") for number in range(1, max(by_number) + 1))
    header_text = next(line.text for line in lines if line.text.strip())
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_pick_delimiter(header_text, path))
    # The default field limit (128 KiB) would reject one long answer; the file is in memory already anyway.
    # The limit is process-wide, so concurrent loads (TUI workers) take turns raising and restoring it.
    with _CSV_LIMIT_LOCK:
        old_limit = csv.field_size_limit()
        csv.field_size_limit(2**31 - 1)
        try:
            _read_csv_rows(reader, pairs, pair_lines, problems)
        except csv.Error as exc:
            problems.append(
                LineProblem(reader.line_num, f"the CSV cannot be read past this line ({exc})", CSV_FIX)
            )
        finally:
            csv.field_size_limit(old_limit)
    problems.sort(key=lambda problem: problem.line)
    return _Parsed(pairs, pair_lines, problems, "csv")


CSV_FIX = "put double quotes around fields that contain the delimiter, quotes or line breaks"
_CSV_LIMIT_LOCK = threading.Lock()


def _read_csv_rows(
    reader: Any, pairs: list[QAPair], pair_lines: list[int], problems: list[LineProblem]
) -> None:
    header: list[str] = []
    for row in reader:
        if any(cell.strip() for cell in row):
            header = row
            break
    try:
        question_at, answer_at, system_at, input_at = _csv_columns(header)
    except _RecordError as exc:
        problems.append(LineProblem(reader.line_num, exc.message, exc.fix))
        return
    row_number = 0
    while True:
        start_line = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        if not any(cell.strip() for cell in row):
            continue
        row_number += 1
        if len(row) > len(header) and not any(cell.strip() for cell in row[len(header) :]):
            # Spreadsheets often pad rows with empty cells past the last column.
            row = row[: len(header)]
        if len(row) != len(header):
            message = f"the row has {_plural(len(row), 'field')} but the header has {len(header)}"
            problems.append(LineProblem(start_line, message, CSV_FIX, row_number, "row"))
            continue
        question = row[question_at]
        if input_at is not None:
            question = _join_question(question, row[input_at])
        system = row[system_at] if system_at is not None else ""
        pairs.append(QAPair(question, row[answer_at], system))
        pair_lines.append(start_line)


def _csv_columns(header: list[str]) -> tuple[int, int, int | None, int | None]:
    """Positions of the question, answer, system and (Alpaca) input columns; raises naming a missing one."""
    columns = [_normalise_column(name) for name in header]
    answer_at = _find_column(columns, CSV_ANSWER_COLUMNS)
    # The answer column is taken first so that a header like input,output reads input as the question.
    question_at = _find_column(
        [name if index != answer_at else "" for index, name in enumerate(columns)], CSV_QUESTION_COLUMNS
    )
    if question_at is None or answer_at is None:
        raise _missing_columns(header, question_at, answer_at)
    input_at = None
    if columns[question_at] == "instruction" and "input" in columns:
        input_at = columns.index("input")
    return question_at, answer_at, _find_column(columns, CSV_SYSTEM_COLUMNS), input_at


def _missing_columns(header: list[str], question_at: int | None, answer_at: int | None) -> _RecordError:
    missing = [
        (role, aliases)
        for role, found, aliases in (
            (QUESTION_KEY, question_at, CSV_QUESTION_COLUMNS),
            (ANSWER_KEY, answer_at, CSV_ANSWER_COLUMNS),
        )
        if found is None
    ]
    roles = " or ".join(role for role, _ in missing)
    message = f"the header has no {roles} column (found columns: {_quote_list(header)})"
    spare = [name for index, name in enumerate(header) if index not in (question_at, answer_at)]
    fixes = []
    for role, aliases in missing:
        typo = next((name for name in spare if _closest(_normalise_column(name), aliases, cutoff=0.75)), None)
        if typo is not None:
            spare.remove(typo)
            fixes.append(f"rename the column {_quote(typo)} to {_quote(role)}")
        else:
            fixes.append(f"name a column {_quote(role)} (or {', '.join(aliases[1:4])})")
    return _RecordError(message, " and ".join(fixes))


# ------------------------------------------------------------------------------------------------------------
# Reading files


def _parse_bytes(data: bytes, path: Path, fmt: str) -> _Parsed:
    parsed = _parse_content(data, path, fmt)
    if not parsed.pairs and not parsed.problems:
        # An empty JSON array, or a CSV header with no rows.
        fix = (
            "add one row per pair below the header" if parsed.fmt == "csv" else _empty_problem(parsed.fmt).fix
        )
        parsed.problems.append(LineProblem(1, NO_RECORDS_MESSAGE, fix))
    return parsed


def _parse_content(data: bytes, path: Path, fmt: str) -> _Parsed:
    _check_encoding(data, path)
    lines, problems = _split_lines(data)
    if not any(line.text.strip() for line in lines) and not problems:
        concrete = "jsonl" if fmt == "auto" else fmt
        return _Parsed([], [], [_empty_problem(concrete)], concrete)
    if fmt == "csv" or (fmt == "auto" and path.suffix.lower() in (".csv", ".tsv")):
        return _parse_csv(lines, problems, path)
    records = _json_records(lines, problems, fmt)
    if fmt == "auto":
        sniffed = _sniff_records(records)
        if sniffed is None:
            if not records and problems:
                # Nothing parsed as JSON: maybe a CSV file with a .json or .txt name.
                if _looks_like_csv(lines):
                    return _parse_csv(*_split_lines(data), path)
                return _Parsed([], [], problems, "jsonl")
            if not records:
                return _Parsed([], [], problems, "jsonl")
            raise _undetectable(path, records)
        fmt = sniffed
    return _convert_records(records, fmt, problems)


def _looks_like_csv(lines: list[_Line]) -> bool:
    first = next((line.text for line in lines if line.text.strip()), "")
    delimiter = _pick_delimiter(first, Path("x.csv"))
    columns = {_normalise_column(name) for name in first.split(delimiter)}
    return bool(columns & set(CSV_QUESTION_COLUMNS)) and bool(columns & set(CSV_ANSWER_COLUMNS))


def _undetectable(path: Path, records: list[_Record]) -> DatasetFileError:
    first = next((record for record in records if isinstance(record.value, dict)), None)
    if first is not None:
        detail = f"its first record (line {first.line}) has keys {_quote_list(list(first.value))}"
    elif records:
        detail = f"its first record (line {records[0].line}) is {_type_name(records[0].value)}, not an object"
    else:
        detail = "it holds no records"
    return DatasetFileError(
        f"tunedeck cannot tell which format {_display_name(path)} is in: {detail}.",
        path=path,
        next_step="Pass --format jsonl, alpaca, sharegpt, openai or csv.",
        title="Unknown dataset format",
    )


def _problems_error(path: Path, problems: list[LineProblem], fmt: str) -> DatasetFileError:
    name = _display_name(path)
    shown = "; ".join(str(problem) for problem in problems[:SUMMARY_PROBLEMS])
    more = len(problems) - SUMMARY_PROBLEMS
    if more > 0:
        shown += f"; and {more:,} more"
    if len(problems) == 1 and problems[0].is_empty_file:
        message = f"{name} is empty: {problems[0]}."
    else:
        unit = next((problem.unit for problem in problems if problem.record is not None), "line")
        message = f"{_plural(len(problems), unit)} of {name} cannot be read: {shown}."
    if fmt == "jsonl":
        next_step = f"Fix those lines; `tunedeck data lint {name}` lists every one."
    else:
        next_step = "Fix those lines in the source file and import it again."
    return DatasetFileError(message, path=path, problems=problems, next_step=next_step)


def _check_format(fmt: str) -> None:
    if fmt != "auto" and fmt not in FORMATS:
        raise DatasetFileError(
            f"{fmt!r} is not a dataset format tunedeck knows.",
            next_step=f"Use one of: auto, {', '.join(FORMATS)}.",
        )


def read_dataset(path: Path | str, fmt: str = "auto") -> Dataset:
    """Read a dataset file in any supported format leniently: bad lines become `problems`, good ones are kept.

    Raises DatasetFileError only when the file as a whole cannot be read (missing, UTF-16, unknown format).
    """
    _check_format(fmt)
    path = Path(path)
    parsed = _parse_bytes(_read_bytes(path), path, fmt)
    return Dataset(
        pairs=parsed.pairs, path=path, problems=parsed.problems, lines=parsed.lines, format=parsed.fmt
    )


def load_dataset(path: Path | str) -> Dataset:
    """Read a tunedeck JSONL dataset leniently: good rows kept, bad lines listed (what the TUI shows); temp files
    that killed saves left beside it are removed, as the next save would."""
    remove_stale_temps(Path(path))
    return read_dataset(path, "jsonl")


def load_pairs(path: Path | str) -> list[QAPair]:
    """Read a tunedeck JSONL dataset strictly; raises DatasetFileError listing every bad line."""
    return _strict(Path(path), "jsonl")


def import_file(path: Path | str, fmt: str = "auto") -> list[QAPair]:
    """Read a JSONL, Alpaca, ShareGPT, OpenAI-messages or CSV file strictly; raises listing every bad line."""
    _check_format(fmt)
    return _strict(Path(path), fmt)


def detect_format(path: Path | str) -> str:
    """The format of a dataset file, from its name and first records; raises when it cannot tell."""
    path = Path(path)
    parsed = _parse_bytes(_read_bytes(path), path, "auto")
    if not parsed.pairs and parsed.problems:
        raise _problems_error(path, parsed.problems, parsed.fmt)
    return parsed.fmt


def _strict(path: Path, fmt: str) -> list[QAPair]:
    parsed = _parse_bytes(_read_bytes(path), path, fmt)
    if parsed.problems:
        raise _problems_error(path, parsed.problems, parsed.fmt)
    return parsed.pairs


# ------------------------------------------------------------------------------------------------------------
# Writing


def _checked_pairs(pairs: Sequence[QAPair]) -> list[QAPair]:
    """Refuse pairs whose text cannot be written as UTF-8, naming the row, before anything touches disk."""
    problems = []
    for row, pair in enumerate(pairs):
        for field in (QUESTION_KEY, ANSWER_KEY, SYSTEM_KEY):
            value = getattr(pair, field, None)
            if not isinstance(value, str):
                problems.append(
                    LineProblem(
                        row + 1, f"the {field} of pair {row + 1} is {_type_name(value)}", "make it text"
                    )
                )
                break
            if _has_surrogate(value):
                problems.append(
                    LineProblem(
                        row + 1,
                        f"the {field} of pair {row + 1} holds half a character (a lone surrogate)",
                        "retype the text around it",
                    )
                )
                break
    if problems:
        shown = "; ".join(str(problem) for problem in problems[:SUMMARY_PROBLEMS])
        raise DatasetFileError(
            f"{_plural(len(problems), 'pair')} cannot be saved: {shown}.",
            problems=problems,
            next_step="Fix those pairs and save again.",
        )
    return list(pairs)


def _json_line(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _native_record(pair: QAPair) -> dict[str, Any]:
    record: dict[str, Any] = {QUESTION_KEY: pair.question, ANSWER_KEY: pair.answer}
    if pair.system:
        record[SYSTEM_KEY] = pair.system
    return record


def _alpaca_record(pair: QAPair) -> dict[str, Any]:
    record: dict[str, Any] = {"instruction": pair.question, "input": "", "output": pair.answer}
    if pair.system:
        record["system"] = pair.system
    return record


def _sharegpt_record(pair: QAPair) -> dict[str, Any]:
    turns = [{"from": "system", "value": pair.system}] if pair.system else []
    turns += [{"from": "human", "value": pair.question}, {"from": "gpt", "value": pair.answer}]
    return {"conversations": turns}


def _openai_record(pair: QAPair) -> dict[str, Any]:
    messages = [{"role": "system", "content": pair.system}] if pair.system else []
    messages += [{"role": "user", "content": pair.question}, {"role": "assistant", "content": pair.answer}]
    return {"messages": messages}


RECORD_WRITERS: dict[str, Callable[[QAPair], dict[str, Any]]] = {
    "jsonl": _native_record,
    "alpaca": _alpaca_record,
    "sharegpt": _sharegpt_record,
    "openai": _openai_record,
}


def dumps_pairs(pairs: Sequence[QAPair], fmt: str = "jsonl", *, json_array: bool = False) -> str:
    """The text of `pairs` in `fmt`; Alpaca and ShareGPT may be one JSON array (their usual shape)."""
    _check_format(fmt)
    if fmt == "auto":
        fmt = "jsonl"
    pairs = _checked_pairs(pairs)
    if fmt == "csv":
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer, lineterminator="\r\n")
        with_system = any(pair.system for pair in pairs)
        writer.writerow([QUESTION_KEY, ANSWER_KEY, SYSTEM_KEY] if with_system else [QUESTION_KEY, ANSWER_KEY])
        for pair in pairs:
            writer.writerow(
                [pair.question, pair.answer, pair.system] if with_system else [pair.question, pair.answer]
            )
        return buffer.getvalue()
    records = [RECORD_WRITERS[fmt](pair) for pair in pairs]
    if json_array:
        return json.dumps(records, ensure_ascii=False, indent=2) + "\n"
    return "".join(_json_line(record) + "\n" for record in records)


def save_pairs(path: Path | str, pairs: Sequence[QAPair]) -> None:
    """Write `pairs` as tunedeck JSONL atomically: on any failure the previous file stays byte-identical."""
    atomic_write_text(Path(path), dumps_pairs(pairs, "jsonl"))


def export_pairs(path: Path | str, pairs: Sequence[QAPair], fmt: str) -> None:
    """Write `pairs` in `fmt` atomically; Alpaca and ShareGPT become a JSON array unless `path` is .jsonl."""
    path = Path(path)
    json_array = fmt in ("alpaca", "sharegpt") and path.suffix.lower() != ".jsonl"
    atomic_write_text(path, dumps_pairs(pairs, fmt, json_array=json_array))


# ------------------------------------------------------------------------------------------------------------
# Lints


def estimate_tokens(pair: QAPair) -> int:
    """A tokenizer-free guess of a pair's token count (about four bytes of English per token)."""
    size = sum(
        len(text.encode("utf-8", "surrogatepass")) for text in (pair.system, pair.question, pair.answer)
    )
    return math.ceil(size / ESTIMATED_BYTES_PER_TOKEN)


def normalise_question(question: str) -> str:
    """The form in which two questions count as duplicates: case-folded, whitespace collapsed."""
    return " ".join(question.casefold().split())


def lint_pairs(
    pairs: Sequence[QAPair],
    *,
    max_tokens: int | None = None,
    count_tokens: Callable[[QAPair], int] | None = None,
    lines: Sequence[int] | None = None,
) -> list[Lint]:
    """Readable pairs that will train badly: empty questions or answers, repeated questions, over-long pairs.

    `lines` maps each row to its source line (default: row + 1). Without `count_tokens`, `max_tokens` is
    checked against an estimate. Lints come in row order.
    """
    if lines is None or len(lines) != len(pairs):
        lines = range(1, len(pairs) + 1)
    counter = count_tokens or estimate_tokens
    estimated = count_tokens is None
    first_seen: dict[str, int] = {}
    lints: list[Lint] = []
    for row, pair in enumerate(pairs):
        line = lines[row]
        if not pair.question.strip():
            lints.append(
                Lint(
                    row,
                    line,
                    "empty_question",
                    "the question is empty",
                    "write the question or delete the pair",
                )
            )
        else:
            key = normalise_question(pair.question)
            first = first_seen.setdefault(key, row)
            if first != row:
                lints.append(
                    Lint(
                        row,
                        line,
                        "duplicate_question",
                        f"the question repeats the one on line {lines[first]}",
                        "delete one of them or merge their answers into one",
                        first_row=first,
                    )
                )
        if not pair.answer.strip():
            lints.append(
                Lint(row, line, "empty_answer", "the answer is empty", "write the answer or delete the pair")
            )
        if max_tokens is not None:
            count = counter(pair)
            if count > max_tokens:
                size = f"about {count:,} tokens (estimated)" if estimated else f"{count:,} tokens"
                lints.append(
                    Lint(
                        row,
                        line,
                        "too_long",
                        f"the pair is {size}, over the limit of {max_tokens:,}, so training would cut it",
                        "shorten the answer, split the pair, or raise data.max_length in the recipe",
                    )
                )
    return lints


def dataset_summary(dataset: Dataset, lints: Sequence[Lint] = ()) -> str:
    """One line describing a dataset's size and health, for the CLI and the TUI's status bar."""
    parts = [_plural(len(dataset.pairs), "pair")]
    if dataset.problems:
        parts.append(f"{_plural(len(dataset.problems), 'unreadable line')}")
    if lints:
        parts.append(_plural(len(lints), "lint"))
    name = _display_name(dataset.path) if dataset.path is not None else "dataset"
    return f"{name}: " + ", ".join(parts)


__all__ = [
    "FORMATS",
    "Dataset",
    "DatasetFileError",
    "LineProblem",
    "Lint",
    "QAPair",
    "dataset_summary",
    "detect_format",
    "dumps_pairs",
    "estimate_tokens",
    "export_pairs",
    "import_file",
    "lint_pairs",
    "load_dataset",
    "load_pairs",
    "normalise_question",
    "read_dataset",
    "save_pairs",
]
