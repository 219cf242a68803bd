"""Fuzzing every importer: whatever the bytes, only DatasetError escapes, each problem names a line and a fix,
the source file is never modified, and whatever loads survives a save and reload unchanged.

Generated inputs cover truncated and invalid JSON, wrong and missing keys, wrong types, non-UTF-8 bytes, BOMs,
CRLF, empty files, enormous rows and duplicate keys. The runs are derandomized so CI sees the same cases.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.dataset import (
    FORMATS,
    DatasetFileError,
    LineProblem,
    QAPair,
    dumps_pairs,
    import_file,
    read_dataset,
)
from engine.errors import DatasetError

# Examples actually run per test, checked by the last test of the module.
GENERATED: Counter[str] = Counter()
MIN_GENERATED = 1000


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# Building blocks

# Text that stresses quoting and line handling; clean files use only this, damaged ones add a lone surrogate
# (which only a JSON escape can carry).
odd_text = st.sampled_from(
    ["", " ", "\t", "é", "\u2028", "\x00", "\r", "\r\n", "\n", '"', ",", ";", "\\", "日本"]
)
clean_text = st.lists(st.one_of(st.text(max_size=8), odd_text), max_size=3).map("".join)
short_text = st.lists(st.one_of(st.text(max_size=8), odd_text, st.just("\ud800")), max_size=3).map("".join)
wrong_types = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
any_value = st.one_of(short_text, short_text, wrong_types)


def keys_for(required: list[str], optional: list[str]) -> st.SearchStrategy[str]:
    """Right keys, near misses and random names."""
    typos = (
        [key[:-1] for key in required] + [key.capitalize() for key in required] + [k + "s" for k in required]
    )
    return st.one_of(st.sampled_from(required + optional), st.sampled_from(typos), st.text(max_size=8))


@st.composite
def json_document(
    draw: st.DrawFn,
    good: Callable[[st.SearchStrategy[str]], st.SearchStrategy[object]],
    broken: st.SearchStrategy[object],
    expect: Callable[[Any], list[QAPair]],
) -> tuple[bytes, list[QAPair] | None]:
    """A JSONL file or JSON array with the pairs it must give: a third are clean files with known pairs, the
    rest mix in broken records and damage (expected None)."""
    clean = draw(st.integers(0, 2)) == 0
    dirty = st.one_of(good(short_text), good(short_text), broken, wrong_types)
    record = good(clean_text) if clean else dirty
    values = draw(st.lists(record, min_size=1, max_size=8))
    ascii_only = draw(st.booleans())
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    if draw(st.integers(0, 3)) == 0:
        text = json.dumps(values, ensure_ascii=ascii_only, indent=draw(st.sampled_from([None, 2])))
        text = text.replace("\n", newline)
    else:
        lines = [json.dumps(value, ensure_ascii=ascii_only) for value in values]
        if not clean:
            for where, kind in draw(
                st.lists(st.tuples(st.integers(0, 20), st.sampled_from(DAMAGE)), max_size=3)
            ):
                # A repeated key is aimed at an object record, where it is the only thing wrong.
                targets = [i for i, value in enumerate(values) if isinstance(value, dict) and value]
                if kind != "duplicate_key" or not targets:
                    targets = list(range(len(lines)))
                index = targets[where % len(targets)]
                lines[index] = damage_line(lines[index], kind, draw)
        blank = draw(st.sampled_from(["", newline, "  " + newline]))
        text = (newline + blank).join(lines) + draw(st.sampled_from(["", newline]))
    data = text.encode("utf-8", "surrogatepass")
    if clean:
        return draw(clean_bom(data)), [pair for value in values for pair in expect(value)]
    return draw(mutate(data)), None


DAMAGE = ("truncate", "duplicate_key", "duplicate_key", "junk", "join", "pretty", "deep", "digits")


def damage_line(line: str, kind: str, draw: st.DrawFn) -> str:
    if kind == "truncate":
        return line[: draw(st.integers(0, max(len(line) - 1, 0)))]
    if kind == "duplicate_key":
        # Repeat one of the record's own keys, so the record is otherwise fine and only the repeat is wrong.
        try:
            value = json.loads(line)
        except (ValueError, RecursionError):
            return line
        if not isinstance(value, dict) or not value:
            return line
        key = draw(st.sampled_from(sorted(value)))
        return "{" + json.dumps(key) + ': "x", ' + line[1:]
    if kind == "junk":
        return draw(st.text(max_size=15))
    if kind == "join":
        return line + line
    if kind == "deep":
        # Deep enough to exhaust Python's recursion limit inside the JSON decoder.
        return "[" * 50_000 + line
    if kind == "digits":
        # Past Python's limit on converting long digit strings to int.
        return '{"question": ' + "9" * 5000 + ', "answer": "a"}'
    if kind == "pretty":
        try:
            return json.dumps(json.loads(line), indent=1)
        except (ValueError, RecursionError):
            return line
    return line


@st.composite
def clean_bom(draw: st.DrawFn, data: bytes) -> bytes:
    """A clean file, sometimes with the UTF-8 BOM that Windows editors add."""
    return (b"\xef\xbb\xbf" if draw(st.booleans()) else b"") + data


@st.composite
def mutate(draw: st.DrawFn, data: bytes) -> bytes:
    """File-level damage: a BOM, inserted invalid bytes, truncation, or an empty file."""
    if draw(st.integers(0, 4)) == 0:
        data = draw(st.sampled_from([b"\xef\xbb\xbf", b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff"])) + data
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(data)))
        bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xe9", b"\x80\x80", b"\xed\xa0\x80", b"\x00"]))
        data = data[:at] + bad + data[at:]
    if data and draw(st.integers(0, 5)) == 0:
        data = data[: draw(st.integers(1, len(data)))]
    if draw(st.integers(0, 40)) == 0:
        data = b""
    return data


# Well-formed records of each format, built from a text strategy (clean, or with lone surrogates).


def native_good(text: st.SearchStrategy[str]) -> st.SearchStrategy[object]:
    return st.fixed_dictionaries(
        {"question": text, "answer": text}, optional={"system": st.one_of(text, st.none())}
    )


def alpaca_good(text: st.SearchStrategy[str]) -> st.SearchStrategy[object]:
    return st.fixed_dictionaries(
        {"instruction": text, "output": text},
        optional={
            "input": st.one_of(text, st.none()),
            "system": text,
            "history": st.lists(st.lists(text, min_size=2, max_size=2), max_size=2),
        },
    )


@st.composite
def conversation(
    draw: st.DrawFn,
    text: st.SearchStrategy[str],
    role_key: str,
    text_key: str,
    user: list[str],
    assistant: list[str],
) -> list[dict[str, str]]:
    """A well-formed conversation: an optional system turn, then question/answer turns."""
    turns = [{role_key: "system", text_key: draw(text)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        turns.append({role_key: draw(st.sampled_from(user)), text_key: draw(text)})
        turns.append({role_key: draw(st.sampled_from(assistant)), text_key: draw(text)})
    return turns


def sharegpt_good(text: st.SearchStrategy[str]) -> st.SearchStrategy[object]:
    return st.fixed_dictionaries(
        {
            "conversations": conversation(
                text, "from", "value", ["human", "user"], ["gpt", "assistant", "model"]
            )
        },
        optional={"system": text},
    )


def openai_good(text: st.SearchStrategy[str]) -> st.SearchStrategy[object]:
    return st.fixed_dictionaries({"messages": conversation(text, "role", "content", ["user"], ["assistant"])})


sharegpt_turn = st.one_of(
    st.fixed_dictionaries(
        {
            "from": st.sampled_from(["human", "gpt", "system", "observation", "user", "assistant"]),
            "value": short_text,
        }
    ),
    st.dictionaries(st.sampled_from(["from", "value", "role", "content", "x"]), any_value, max_size=3),
    wrong_types,
)
sharegpt_broken = st.one_of(
    st.fixed_dictionaries({"conversations": st.one_of(st.lists(sharegpt_turn, max_size=6), wrong_types)}),
    st.dictionaries(keys_for(["conversations"], ["system"]), any_value, max_size=4),
)
openai_message = st.one_of(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "user", "assistant", "tool", "developer"]),
            "content": st.one_of(
                short_text,
                st.none(),
                st.lists(
                    st.fixed_dictionaries(
                        {"type": st.sampled_from(["text", "image_url"]), "text": short_text}
                    )
                ),
            ),
        },
        optional={"weight": st.sampled_from([0, 1])},
    ),
    st.dictionaries(st.sampled_from(["role", "content", "name"]), any_value, max_size=3),
    wrong_types,
)
openai_broken = st.one_of(
    st.fixed_dictionaries({"messages": st.one_of(st.lists(openai_message, max_size=6), wrong_types)}),
    st.dictionaries(keys_for(["messages"], []), any_value, max_size=3),
)


def broken_records(required: list[str], optional: list[str]) -> st.SearchStrategy[object]:
    return st.dictionaries(keys_for(required, optional), any_value, max_size=5)


# What a clean record must turn into, written out independently of the importers.


def joined(instruction: str, extra_input: str | None) -> str:
    return f"{instruction}\n\n{extra_input}" if extra_input and extra_input.strip() else instruction


def expect_native(record: dict[str, Any]) -> list[QAPair]:
    return [QAPair(record["question"], record["answer"], record.get("system") or "")]


def expect_alpaca(record: dict[str, Any]) -> list[QAPair]:
    system = record.get("system", "")
    earlier = [QAPair(question, answer, system) for question, answer in record.get("history", [])]
    return [*earlier, QAPair(joined(record["instruction"], record.get("input")), record["output"], system)]


def expect_turns(turns: list[dict[str, str]], system: str, role_key: str, text_key: str) -> list[QAPair]:
    pairs, question = [], ""
    for turn in turns:
        role, text = turn[role_key], turn[text_key]
        if role == "system":
            system = text
        elif role in ("human", "user"):
            question = text
        else:
            pairs.append(QAPair(question, text, system))
    return pairs


def expect_sharegpt(record: dict[str, Any]) -> list[QAPair]:
    return expect_turns(record["conversations"], record.get("system", ""), "from", "value")


def expect_openai(record: dict[str, Any]) -> list[QAPair]:
    return expect_turns(record["messages"], "", "role", "content")


FUZZ_FORMATS = {
    "jsonl": json_document(native_good, broken_records(["question", "answer"], ["system"]), expect_native),
    "alpaca": json_document(
        alpaca_good, broken_records(["instruction", "output"], ["input", "system", "history"]), expect_alpaca
    ),
    "sharegpt": json_document(sharegpt_good, sharegpt_broken, expect_sharegpt),
    "openai": json_document(openai_good, openai_broken, expect_openai),
}

CSV_HEADERS = [
    ["question", "answer"],
    ["question", "answer", "system"],
    ["Prompt", "Response"],
    ["instruction", "input", "output"],
    ["id", "question", "answer"],
]


@st.composite
def csv_files(draw: st.DrawFn) -> tuple[bytes, list[QAPair] | None]:
    """CSV: a third clean with real or aliased headers; the rest with misspelt or random headers, ragged rows,
    hand-joined (badly quoted) lines and bad bytes."""
    clean = draw(st.integers(0, 2)) == 0
    delimiter = draw(st.sampled_from([",", ";", "\t"]))
    terminator = draw(st.sampled_from(["\n", "\r\n"]))
    if clean:
        header = draw(st.sampled_from(CSV_HEADERS))
        rows = draw(
            st.lists(st.lists(clean_text, min_size=len(header), max_size=len(header)), min_size=1, max_size=8)
        )
    else:
        columns = [
            "question",
            "answer",
            "system",
            "prompt",
            "response",
            "instruction",
            "input",
            "output",
            "answr",
        ]
        header = draw(st.lists(st.one_of(st.sampled_from(columns), st.text(max_size=6)), max_size=4))
        rows = draw(st.lists(st.lists(short_text, max_size=5), max_size=8))
    if clean or draw(st.booleans()):
        buffer = io.StringIO(newline="")
        # Minimal quoting leaves a bare CR unquoted unless CR is part of the line terminator.
        quoting = csv.QUOTE_MINIMAL if terminator == "\r\n" and draw(st.booleans()) else csv.QUOTE_ALL
        writer = csv.writer(buffer, delimiter=delimiter, lineterminator=terminator, quoting=quoting)
        for row in [header, *rows]:
            writer.writerow(row)
        text = buffer.getvalue()
    else:
        # Hand-joined rows: unbalanced quotes and unquoted delimiters, as a careless export would write them.
        text = terminator.join(delimiter.join(row) for row in [header, *rows])
    data = text.encode("utf-8", "surrogatepass")
    if clean:
        expected = [expect_csv_row(header, row) for row in rows if any(cell.strip() for cell in row)]
        return draw(clean_bom(data)), expected
    return draw(mutate(data)), None


def expect_csv_row(header: list[str], row: list[str]) -> QAPair:
    cells = dict(zip([name.lower() for name in header], row, strict=True))
    if "instruction" in cells:
        return QAPair(joined(cells["instruction"], cells["input"]), cells["output"])
    question = cells.get("question", cells.get("prompt", ""))
    return QAPair(question, cells.get("answer", cells.get("response", "")), cells.get("system", ""))


# The contract


def check_import(
    work_dir: Path,
    data: bytes,
    suffix: str,
    formats: tuple[str, ...],
    expected: list[QAPair] | None = None,
) -> None:
    """Import `data` in each format (and auto) strictly and leniently; assert the contract each time.

    With `expected` (a clean file), the named formats must read exactly those pairs with no problem.
    """
    path = work_dir / f"input{suffix}"
    path.write_bytes(data)
    for fmt in (*formats, "auto"):
        must_read = expected if fmt != "auto" else None
        try:
            pairs = import_file(path, fmt)
        except DatasetError as exc:
            if must_read is not None:
                # A clean file whose rows are all blank holds no records, and says so.
                holds_nothing = [p.is_empty_file for p in getattr(exc, "problems", [])] == [True]
                assert must_read == [] and holds_nothing, f"a clean {fmt} file was refused: {exc}"
            check_error(exc)
        else:
            if must_read is not None:
                assert pairs == must_read
            check_round_trip(work_dir, pairs, fmt)
        try:
            dataset = read_dataset(path, fmt)
        except DatasetError as exc:
            assert isinstance(exc, DatasetFileError)
            assert not exc.problems, "line problems belong in Dataset.problems in lenient mode"
            check_error(exc)
        else:
            assert len(dataset.lines) == len(dataset.pairs)
            for problem in dataset.problems:
                check_problem(problem)
            check_round_trip(work_dir, dataset.pairs, fmt)
            if fmt not in ("csv", "auto"):
                check_duplicate_keys_reported(data, dataset.problems)
        assert path.read_bytes() == data, "reading a dataset must never modify it"


def check_duplicate_keys_reported(data: bytes, problems: list[LineProblem]) -> None:
    """Every JSONL line whose object repeats a key has a problem on that line."""
    body = data.removeprefix(b"\xef\xbb\xbf")
    if body.lstrip(b" \t\r\n").startswith(b"[") or any(
        "spread over several lines" in p.message for p in problems
    ):
        return
    bad_lines = {problem.line for problem in problems}
    for number, raw in enumerate(body.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if repeats_a_key(text):
            assert number in bad_lines, f"line {number} repeats a key but no problem names it"


def repeats_a_key(text: str) -> bool:
    """True when `text` is one JSON object whose own keys (not nested ones) repeat."""
    repeating: set[int] = set()

    def remember(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            repeating.add(id(obj))
        return obj

    try:
        value = json.loads(text, object_pairs_hook=remember)
    except (ValueError, RecursionError):
        return False
    return isinstance(value, dict) and id(value) in repeating


def check_error(exc: DatasetError) -> None:
    assert exc.message and "\n" not in exc.message
    problems = getattr(exc, "problems", [])
    if not problems:
        assert exc.next_step, f"a file-level error needs a next step: {exc.message}"
    for problem in problems:
        check_problem(problem)


def check_problem(problem: object) -> None:
    line = problem.line  # type: ignore[attr-defined]
    text = str(problem)
    assert isinstance(line, int) and line >= 1
    assert text.startswith(f"line {line}"), text
    assert problem.fix.strip(), text  # type: ignore[attr-defined]
    assert problem.message.strip(), text  # type: ignore[attr-defined]
    assert "\n" not in text and "\r" not in text, text
    text.encode("utf-8")  # printable as UTF-8: no raw surrogates from the input leak into messages


def check_round_trip(work_dir: Path, pairs: list[QAPair], fmt: str) -> None:
    """Whatever was read saves (as JSONL and in its own format) and reads back identically."""
    for pair in pairs:
        for text in (pair.question, pair.answer, pair.system):
            assert isinstance(text, str)
            text.encode("utf-8")
    if not pairs:
        return
    target_fmt = "jsonl" if fmt == "auto" else fmt
    for out_fmt in {"jsonl", target_fmt}:
        out = work_dir / ("saved.csv" if out_fmt == "csv" else "saved.jsonl")
        out.write_text(dumps_pairs(pairs, out_fmt), encoding="utf-8")
        expected = [pair for pair in pairs if not blank_row(pair)] if out_fmt == "csv" else pairs
        if not expected:
            continue
        assert import_file(out, out_fmt) == expected


def blank_row(pair: QAPair) -> bool:
    # CSV cannot tell a row of empty cells from a blank line; such rows are skipped on import.
    return not (pair.question.strip() or pair.answer.strip() or pair.system.strip())


# The fuzz tests


@fuzz_settings(300)
@given(sample=FUZZ_FORMATS["jsonl"], suffix=st.sampled_from([".jsonl", ".json", ".txt"]))
def test_fuzz_native_jsonl(work_dir: Path, sample: tuple[bytes, list[QAPair] | None], suffix: str) -> None:
    GENERATED["jsonl"] += 1
    check_import(work_dir, sample[0], suffix, ("jsonl",), sample[1])


@fuzz_settings(200)
@given(sample=FUZZ_FORMATS["alpaca"])
def test_fuzz_alpaca(work_dir: Path, sample: tuple[bytes, list[QAPair] | None]) -> None:
    GENERATED["alpaca"] += 1
    check_import(work_dir, sample[0], ".json", ("alpaca",), sample[1])


@fuzz_settings(200)
@given(sample=FUZZ_FORMATS["sharegpt"])
def test_fuzz_sharegpt(work_dir: Path, sample: tuple[bytes, list[QAPair] | None]) -> None:
    GENERATED["sharegpt"] += 1
    check_import(work_dir, sample[0], ".json", ("sharegpt",), sample[1])


@fuzz_settings(200)
@given(sample=FUZZ_FORMATS["openai"])
def test_fuzz_openai_messages(work_dir: Path, sample: tuple[bytes, list[QAPair] | None]) -> None:
    GENERATED["openai"] += 1
    check_import(work_dir, sample[0], ".jsonl", ("openai",), sample[1])


@fuzz_settings(250)
@given(sample=csv_files(), suffix=st.sampled_from([".csv", ".tsv", ".txt"]))
def test_fuzz_csv(work_dir: Path, sample: tuple[bytes, list[QAPair] | None], suffix: str) -> None:
    GENERATED["csv"] += 1
    check_import(work_dir, sample[0], suffix, ("csv",), sample[1])


@fuzz_settings(100)
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".csv"]))
def test_fuzz_arbitrary_bytes_in_every_format(work_dir: Path, data: bytes, suffix: str) -> None:
    GENERATED["bytes"] += 1
    check_import(work_dir, data, suffix, FORMATS)


@fuzz_settings(20)
@given(
    size=st.integers(min_value=150_000, max_value=400_000),
    fmt=st.sampled_from(FORMATS),
    damage=st.sampled_from(["none", "truncate", "bad_byte"]),
)
def test_fuzz_enormous_rows(work_dir: Path, size: int, fmt: str, damage: str) -> None:
    GENERATED["enormous"] += 1
    pairs = [QAPair("short question", "long answer " * (size // 12)), QAPair("q" * size, "a")]
    data = dumps_pairs(pairs, fmt).encode("utf-8")
    if damage == "truncate":
        data = data[: len(data) * 2 // 3]
    elif damage == "bad_byte":
        data = data[:1000] + b"\xff" + data[1000:]
    expected = pairs if damage == "none" else None
    check_import(work_dir, data, ".csv" if fmt == "csv" else ".jsonl", (fmt,), expected)


@fuzz_settings(80)
@given(
    pairs=st.lists(
        st.builds(QAPair, question=clean_text, answer=clean_text, system=clean_text),
        min_size=1,
        max_size=5,
    ),
    fmt=st.sampled_from(FORMATS),
)
def test_fuzz_export_then_import_round_trips(work_dir: Path, pairs: list[QAPair], fmt: str) -> None:
    GENERATED["round_trip"] += 1
    check_round_trip(work_dir, pairs, fmt)


FUZZ_TESTS = {
    "test_fuzz_native_jsonl",
    "test_fuzz_alpaca",
    "test_fuzz_sharegpt",
    "test_fuzz_openai_messages",
    "test_fuzz_csv",
    "test_fuzz_arbitrary_bytes_in_every_format",
    "test_fuzz_enormous_rows",
    "test_fuzz_export_then_import_round_trips",
}


def test_fuzz_generated_at_least_1000_inputs(request: pytest.FixtureRequest) -> None:
    selected = {item.name for item in request.session.items}
    if not selected >= FUZZ_TESTS:
        pytest.skip("only part of the fuzz suite was selected")
    assert set(GENERATED) == {
        "jsonl",
        "alpaca",
        "sharegpt",
        "openai",
        "csv",
        "bytes",
        "enormous",
        "round_trip",
    }
    assert sum(GENERATED.values()) >= MIN_GENERATED, dict(GENERATED)
