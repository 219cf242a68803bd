"""The dataset layer: every bad line is named with its number and a fix, importers agree, saves are atomic."""

from __future__ import annotations

import argparse
import errno
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from engine import dataset as ds
from engine.commands import data as data_command
from engine.dataset import (
    Dataset,
    DatasetFileError,
    LineProblem,
    QAPair,
    detect_format,
    dumps_pairs,
    export_pairs,
    import_file,
    lint_pairs,
    load_dataset,
    load_pairs,
    read_dataset,
    save_pairs,
)
from engine.errors import DatasetError, DiskFullError, EngineError
from engine.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "assets" / "demo_qa.jsonl"


def write(path: Path, data: str | bytes) -> Path:
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


def jsonl(*records: object) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def problems_of(path: Path, fmt: str = "jsonl") -> list[LineProblem]:
    with pytest.raises(DatasetFileError) as caught:
        import_file(path, fmt)
    return caught.value.problems


def only_problem(path: Path, fmt: str = "jsonl") -> LineProblem:
    problems = problems_of(path, fmt)
    assert len(problems) == 1, [str(p) for p in problems]
    return problems[0]


QA = {"question": "What is tunedeck?", "answer": "A terminal app."}


# Native JSONL: what loads


def test_loads_pairs_with_optional_system(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", jsonl(QA, {"question": "q", "answer": "a", "system": "Be brief."}))
    assert load_pairs(path) == [
        QAPair("What is tunedeck?", "A terminal app."),
        QAPair("q", "a", "Be brief."),
    ]


def test_bom_crlf_and_blank_lines_are_accepted_and_lines_counted(tmp_path: Path) -> None:
    text = (
        "\ufeff" + json.dumps(QA) + "\r\n\r\n   \r\n" + json.dumps({"question": "q", "answer": "a"}) + "\r\n"
    )
    path = write(tmp_path / "d.jsonl", text)
    dataset = load_dataset(path)
    assert dataset.ok
    assert [pair.question for pair in dataset.pairs] == ["What is tunedeck?", "q"]
    assert dataset.lines == [1, 4]


def test_null_system_and_extra_keys_are_fine(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", jsonl({**QA, "system": None, "id": 7, "source": "wiki"}))
    assert load_pairs(path) == [QAPair("What is tunedeck?", "A terminal app.")]


def test_a_json_array_of_pairs_also_loads_with_record_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path / "d.json", '[\n  {"question": "a", "answer": "b"},\n  {"question": "c", "answer": "d"}\n]\n'
    )
    dataset = load_dataset(path)
    assert dataset.pairs == [QAPair("a", "b"), QAPair("c", "d")]
    assert dataset.lines == [2, 3]


# Native JSONL: every error class names its line


def test_missing_answer_suggests_the_misspelt_key(tmp_path: Path) -> None:
    lines = [QA] * 211 + [{"question": "q", "respone": "a"}]
    problem = only_problem(write(tmp_path / "d.jsonl", jsonl(*lines)))
    assert problem.line == 212
    assert str(problem) == (
        "line 212: no 'answer' field (found keys: 'question', 'respone') — rename 'respone' to 'answer'"
    )


def test_missing_answer_without_a_near_miss_says_to_add_it(tmp_path: Path) -> None:
    problem = only_problem(write(tmp_path / "d.jsonl", jsonl({"question": "q", "zzz": 1})))
    assert (problem.line, problem.fix) == (1, 'add an "answer" string')


def test_capitalised_keys_are_recognised_as_typos(tmp_path: Path) -> None:
    problem = only_problem(write(tmp_path / "d.jsonl", jsonl(QA, {"Question": "q", "Answer": "a"})))
    assert problem.line == 2
    assert problem.fix == "rename 'Question' to 'question' and 'Answer' to 'answer'"


def test_alpaca_records_in_a_dataset_point_to_the_importer(tmp_path: Path) -> None:
    problem = only_problem(write(tmp_path / "d.jsonl", jsonl({"instruction": "i", "output": "o"})))
    assert "Alpaca" in problem.fix and "tunedeck data import" in problem.fix


def test_invalid_json_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", jsonl(QA, QA) + '{"question": "q", "answer": "a"\n')
    problem = only_problem(path)
    assert problem.line == 3
    assert problem.message.startswith("invalid JSON (")
    assert "column" in problem.message
    assert "close it with '}'" in problem.fix


def test_json_error_wording_reads_as_one_phrase(tmp_path: Path) -> None:
    problem = only_problem(write(tmp_path / "d.jsonl", '{"question": "q, "answer": "a"}\n'))
    assert "at at" not in problem.message
    problem = only_problem(write(tmp_path / "e.jsonl", '{"question": "unterminated\n'))
    assert problem.message == "invalid JSON (unterminated string starting at column 14)"


def test_raw_tabs_inside_strings_are_accepted(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", '{"question": "a\tb", "answer": "c"}\n')
    assert load_pairs(path) == [QAPair("a\tb", "c")]


def test_invalid_json_fix_shows_the_format_being_read(tmp_path: Path) -> None:
    problem = only_problem(write(tmp_path / "a.jsonl", "nope\n"), "alpaca")
    assert '"instruction"' in problem.fix


@pytest.mark.parametrize(
    ("line", "kind"),
    [("[1, 2]", "a list"), ('"just text"', "a string"), ("42", "a number"), ("null", "null")],
)
def test_non_object_lines(tmp_path: Path, line: str, kind: str) -> None:
    problem = only_problem(write(tmp_path / "d.jsonl", jsonl(QA) + line + "\n"))
    assert problem.line == 2
    assert problem.message == f"the record is {kind}, not a JSON object"


@pytest.mark.parametrize(
    ("value", "kind", "fix_word"),
    [
        (42, "a number", "double quotes"),
        (["a", "b"], "a list", "join"),
        (None, "null", "double quotes"),
        ({"t": 1}, "an object", "replace"),
        (True, "true/false", "double quotes"),
    ],
)
def test_wrong_types_name_the_field_and_the_type(
    tmp_path: Path, value: object, kind: str, fix_word: str
) -> None:
    problem = only_problem(write(tmp_path / "d.jsonl", jsonl(QA, {"question": "q", "answer": value})))
    assert problem.line == 2
    assert problem.message == f"the 'answer' field is {kind}, not a string"
    assert fix_word in problem.fix


def test_wrong_system_type_is_reported(tmp_path: Path) -> None:
    problem = only_problem(write(tmp_path / "d.jsonl", jsonl({**QA, "system": 3})))
    assert problem.message == "the 'system' field is a number, not a string"


def test_duplicate_keys_are_reported(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", jsonl(QA) + '{"question": "q", "answer": "a", "answer": "b"}\n')
    problem = only_problem(path)
    assert problem.line == 2
    assert problem.message == "the key 'answer' appears more than once in one object"


def test_non_utf8_bytes_name_line_column_and_file_offset(tmp_path: Path) -> None:
    first = (json.dumps(QA) + "\n").encode()
    path = write(tmp_path / "d.jsonl", first + b'{"question": "caf\xe9", "answer": "a"}\n')
    problem = only_problem(path)
    assert problem.line == 2
    column = len(b'{"question": "caf') + 1
    assert problem.message == (
        f"byte 0xE9 at column {column} (file offset {len(first) + column - 1}) is not valid UTF-8"
    )
    assert "UTF-8" in problem.fix


def test_utf16_files_are_refused_as_a_whole(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", jsonl(QA).encode("utf-16"))
    with pytest.raises(DatasetFileError, match="UTF-16") as caught:
        load_pairs(path)
    assert "UTF-8" in caught.value.next_step


@pytest.mark.parametrize("content", [b"", b"\n\n  \r\n", b"\xef\xbb\xbf"])
def test_empty_files(tmp_path: Path, content: bytes) -> None:
    path = write(tmp_path / "d.jsonl", content)
    with pytest.raises(DatasetFileError, match=r"d\.jsonl is empty") as caught:
        load_pairs(path)
    assert [(p.line, p.is_empty_file) for p in caught.value.problems] == [(1, True)]
    assert load_dataset(path).pairs == []


def test_an_empty_json_array_holds_no_records(tmp_path: Path) -> None:
    problem = only_problem(write(tmp_path / "d.json", "[]"))
    assert problem.is_empty_file and problem.message == "the file holds no records"


def test_nan_is_not_json(tmp_path: Path) -> None:
    problem = only_problem(write(tmp_path / "d.jsonl", '{"question": "q", "answer": NaN}\n'))
    assert problem.message == "invalid JSON (NaN is not a JSON value)"


def test_lone_surrogate_escapes_are_reported(tmp_path: Path) -> None:
    problem = only_problem(write(tmp_path / "d.jsonl", '{"question": "q\\ud800", "answer": "a"}\n'))
    assert problem.line == 1 and "surrogate" in problem.message


def test_deeply_nested_and_huge_numbers_are_problems_not_crashes(tmp_path: Path) -> None:
    path = write(
        tmp_path / "d.jsonl", "[" * 200_000 + "\n" + '{"question": "q", "answer": ' + "9" * 5000 + "}\n"
    )
    problems = problems_of(path)
    assert [p.line for p in problems] == [1, 2]
    assert problems[1].message == "the 'answer' field is a number, not a string"


def test_a_near_miss_of_the_system_key_is_not_dropped_silently(tmp_path: Path) -> None:
    problem = only_problem(write(tmp_path / "d.jsonl", jsonl({**QA, "sytem": "Be brief."})))
    assert str(problem) == "line 1: unknown field 'sytem' — rename it to 'system' or delete it"


def test_a_pretty_printed_object_gets_one_clear_problem(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", json.dumps(QA, indent=2) + "\n")
    problem = only_problem(path)
    assert problem.line == 1 and "spread over several lines" in problem.message


def test_long_keys_and_control_characters_are_quoted_safely(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", jsonl({"question": "q", "x\n" * 100: "a"}))
    problem = only_problem(path)
    assert "\n" not in str(problem)
    assert len(str(problem)) < 200


def test_every_bad_line_is_listed_and_the_message_summarises(tmp_path: Path) -> None:
    lines = [jsonl(QA)] * 3 + ["oops\n", jsonl({"question": 1, "answer": "a"}), jsonl(QA), "[]\n", "{\n"]
    path = write(tmp_path / "demo.jsonl", "".join(lines))
    with pytest.raises(DatasetError) as caught:
        load_pairs(path)
    error = caught.value
    assert isinstance(error, DatasetFileError)
    assert [p.line for p in error.problems] == [4, 5, 7, 8]
    assert error.message.startswith("4 lines of demo.jsonl cannot be read: line 4: invalid JSON")
    assert "; line 5: the 'question' field is a number" in error.message
    assert error.message.endswith("; and 1 more.")
    assert "tunedeck data lint demo.jsonl" in error.next_step
    assert error.title == "Dataset problem"
    for problem in error.problems:
        assert str(problem).startswith(f"line {problem.line}: ")
        assert problem.fix


def test_lenient_load_keeps_good_rows_with_their_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", jsonl(QA) + "bad\n" + jsonl({"question": "q", "answer": "a"}))
    dataset = load_dataset(path)
    assert dataset.pairs == [QAPair("What is tunedeck?", "A terminal app."), QAPair("q", "a")]
    assert dataset.lines == [1, 3]
    assert [p.line for p in dataset.problems] == [2]
    assert not dataset.ok


def test_missing_file_and_folder_are_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetFileError, match="does not exist") as caught:
        load_dataset(tmp_path / "nope.jsonl")
    assert caught.value.problems == []
    with pytest.raises(DatasetFileError, match="is a folder"):
        load_pairs(tmp_path)


def test_unknown_format_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetFileError, match="'yaml' is not a dataset format"):
        import_file(write(tmp_path / "d.jsonl", jsonl(QA)), "yaml")


# Importers


def test_alpaca_json_array_appends_input_after_a_blank_line(tmp_path: Path) -> None:
    records = [
        {"instruction": "Translate to French", "input": "cat", "output": "chat"},
        {"instruction": "Say hi", "input": "  ", "output": "hi", "system": "Be kind."},
        {"instruction": "Name it", "output": "x", "input": None},
    ]
    path = write(tmp_path / "alpaca.json", json.dumps(records, indent=2))
    assert detect_format(path) == "alpaca"
    assert import_file(path) == [
        QAPair("Translate to French\n\ncat", "chat"),
        QAPair("Say hi", "hi", "Be kind."),
        QAPair("Name it", "x"),
    ]


def test_alpaca_jsonl_and_history(tmp_path: Path) -> None:
    path = write(
        tmp_path / "alpaca.jsonl",
        jsonl({"instruction": "q2", "input": "", "output": "a2", "history": [["q1", "a1"]]}),
    )
    assert import_file(path, "alpaca") == [QAPair("q1", "a1"), QAPair("q2", "a2")]


def test_alpaca_array_errors_name_line_and_record(tmp_path: Path) -> None:
    text = (
        "[\n"
        '  {"instruction": "a", "output": "b"},\n'
        '  {"instruction": "c", "outptu": "d"},\n'
        '  {"instruction": "e",\n'
        '   "output": 5}\n'
        "]\n"
    )
    problems = problems_of(write(tmp_path / "a.json", text), "alpaca")
    assert [str(p) for p in problems] == [
        "line 3 (record 2): no 'output' field (found keys: 'instruction', 'outptu') — "
        "rename 'outptu' to 'output'",
        "line 4 (record 3): the 'output' field is a number, not a string — "
        "put the output in double quotes so it is a string",
    ]


def test_a_broken_json_array_names_the_line_of_the_break(tmp_path: Path) -> None:
    text = '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n'
    problem = only_problem(write(tmp_path / "a.json", text), "alpaca")
    assert problem.line == 3 and problem.message.startswith("invalid JSON")


def test_a_trailing_comma_in_an_array_points_at_the_comma(tmp_path: Path) -> None:
    text = '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c", "output": "d"},\n]\n'
    problem = only_problem(write(tmp_path / "a.json", text), "alpaca")
    assert (problem.line, problem.fix) == (3, "delete that trailing comma")


def test_a_truncated_array_says_it_ends_early(tmp_path: Path) -> None:
    text = '[\n  {"instruction": "a", "output": "b"},\n'
    problem = only_problem(write(tmp_path / "a.json", text), "alpaca")
    assert problem.message == "the JSON array ends early"


SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "You are terse."},
        {"from": "human", "value": "q1"},
        {"from": "gpt", "value": "a1"},
        {"from": "human", "value": "q2"},
        {"from": "gpt", "value": "a2"},
    ]
}


def test_sharegpt_multi_turn_gives_one_pair_per_turn(tmp_path: Path) -> None:
    path = write(tmp_path / "sg.json", json.dumps([SHAREGPT]))
    assert detect_format(path) == "sharegpt"
    assert import_file(path) == [QAPair("q1", "a1", "You are terse."), QAPair("q2", "a2", "You are terse.")]


def test_sharegpt_top_level_system_and_role_content_turns(tmp_path: Path) -> None:
    record = {
        "system": "S",
        "conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
    }
    path = write(tmp_path / "sg.jsonl", jsonl(record))
    assert import_file(path, "sharegpt") == [QAPair("q", "a", "S")]


@pytest.mark.parametrize(
    ("turns", "expected"),
    [
        (
            [{"from": "human", "value": "q"}, {"from": "human", "value": "q"}],
            "turns 1 and 2 both come from 'human'",
        ),
        ([{"from": "gpt", "value": "a"}], "turn 1 is a 'gpt' reply with no question before it"),
        ([{"from": "human", "value": "q"}], "the last 'human' turn (turn 1) has no 'gpt' reply"),
        (
            [{"from": "human", "value": "q"}, {"from": "observation", "value": "x"}],
            "turn 2 is from 'observation'",
        ),
        (["hi"], "turn 1 is a string, not an object"),
        ([{"from": "human"}], "turn 1 has no 'value'"),
        ([{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}], "the 'value' of turn 1 is a number"),
        ([], "the conversation has no 'human' turn"),
    ],
)
def test_sharegpt_turn_errors(tmp_path: Path, turns: list[object], expected: str) -> None:
    path = write(tmp_path / "sg.jsonl", jsonl(SHAREGPT, {"conversations": turns}))
    problem = only_problem(path, "sharegpt")
    assert problem.line == 2
    assert problem.message.startswith(expected), problem.message
    assert problem.fix


def test_sharegpt_missing_conversations_points_at_the_right_format(tmp_path: Path) -> None:
    path = write(tmp_path / "sg.jsonl", jsonl({"messages": []}))
    problem = only_problem(path, "sharegpt")
    assert "--format openai" in problem.fix


def test_openai_messages_keep_system_and_read_text_parts(tmp_path: Path) -> None:
    record = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": [{"type": "text", "text": "q"}, {"type": "text", "text": "1"}]},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "skip me", "weight": 0},
        ]
    }
    path = write(
        tmp_path / "oa.jsonl",
        jsonl(
            record,
            {
                "messages": [
                    {"role": "developer", "content": "D"},
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": "y"},
                ]
            },
        ),
    )
    assert detect_format(path) == "openai"
    assert import_file(path) == [QAPair("q1", "a1", "S"), QAPair("x", "y", "D")]


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([{"role": "user", "content": "q"}, {"role": "tool", "content": "t"}], "message 2 has role 'tool'"),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}],
            "message 2 is an assistant",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url"}]}],
            "message 1 has a content part that is not text",
        ),
        ([{"role": "user"}], "message 1 has no 'content'"),
        ("hello", "the 'messages' field is a string, not a list"),
    ],
)
def test_openai_errors(tmp_path: Path, messages: object, expected: str) -> None:
    path = write(tmp_path / "oa.jsonl", "\n" + jsonl({"messages": messages}))
    problem = only_problem(path, "openai")
    assert problem.line == 2
    assert problem.message.startswith(expected), problem.message


def test_csv_aliases_quotes_and_multiline_fields(tmp_path: Path) -> None:
    text = 'Prompt,Response\r\n"What, exactly?","It ""works""."\r\n"two\nlines",ok\r\n\r\nlast,one\r\n'
    path = write(tmp_path / "d.csv", "\ufeff" + text)
    dataset = read_dataset(path)
    assert dataset.format == "csv" and dataset.ok
    assert dataset.pairs == [
        QAPair("What, exactly?", 'It "works".'),
        QAPair("two\nlines", "ok"),
        QAPair("last", "one"),
    ]
    assert dataset.lines == [2, 3, 6]


def test_csv_instruction_input_output_and_system_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "instruction,input,output,system\nTranslate,cat,chat,S\nSay hi,,hi,\n")
    assert import_file(path) == [QAPair("Translate\n\ncat", "chat", "S"), QAPair("Say hi", "hi")]


def test_csv_semicolons_and_tsv(tmp_path: Path) -> None:
    assert import_file(write(tmp_path / "d.csv", "question;answer\nq;a, b\n")) == [QAPair("q", "a, b")]
    assert import_file(write(tmp_path / "d.tsv", "question\tanswer\nq\ta\n")) == [QAPair("q", "a")]


def test_csv_missing_column_is_named_with_a_suggestion(tmp_path: Path) -> None:
    problem = only_problem(write(tmp_path / "d.csv", "question,answr\nq,a\n"), "csv")
    assert str(problem) == (
        "line 1: the header has no answer column (found columns: 'question', 'answr') — "
        "rename the column 'answr' to 'answer'"
    )
    problem = only_problem(write(tmp_path / "e.csv", "\nfoo,bar\nq,a\n"), "csv")
    assert problem.line == 2
    assert problem.message.startswith("the header has no question or answer column")


def test_csv_rows_with_the_wrong_field_count_name_line_and_row(tmp_path: Path) -> None:
    text = 'question,answer\nq1,a1\n"multi\nline",a2\nonly one field\nq,a,extra\n'
    problems = problems_of(write(tmp_path / "d.csv", text), "csv")
    assert [str(p) for p in problems] == [
        "line 5 (row 3): the row has 1 field but the header has 2 — " + ds.CSV_FIX,
        "line 6 (row 4): the row has 3 fields but the header has 2 — " + ds.CSV_FIX,
    ]


def test_csv_rows_padded_with_empty_cells_are_accepted(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "question,answer\nq,a,,\nq2,a2, ,\n")
    assert import_file(path) == [QAPair("q", "a"), QAPair("q2", "a2")]


def test_csv_bad_bytes_and_huge_fields(tmp_path: Path) -> None:
    huge = "x" * 300_000
    path = write(tmp_path / "d.csv", b"question,answer\nq,\xff\n" + f"q,{huge}\n".encode())
    dataset = read_dataset(path)
    assert [p.line for p in dataset.problems] == [2]
    assert dataset.pairs == [QAPair("q", huge)]


def test_csv_header_only_holds_no_records(tmp_path: Path) -> None:
    problem = only_problem(write(tmp_path / "d.csv", "question,answer\n"), "csv")
    assert problem.message == "the file holds no records"


def test_csv_content_with_another_suffix_is_detected(tmp_path: Path) -> None:
    path = write(tmp_path / "d.txt", "question,answer\nq,a\n")
    assert import_file(path) == [QAPair("q", "a")]


def test_undetectable_format_says_what_it_saw(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", jsonl({"foo": 1, "bar": 2}))
    with pytest.raises(DatasetFileError, match="cannot tell which format") as caught:
        import_file(path)
    assert "'foo', 'bar'" in caught.value.message
    assert "--format" in caught.value.next_step


def test_auto_detection_of_misspelt_native_files_gives_line_problems(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", jsonl({"question": "q", "answers": "a"}))
    assert only_problem(path, "auto").fix == "rename 'answers' to 'answer'"


# Export and round trips

ROUND_TRIP = [
    QAPair("What is tunedeck?", "A terminal app."),
    QAPair('Multi\nline, "quoted"', "Ünïcødé — ✓\r\nand\ttabs", "System prompt"),
    QAPair("  spaced  ", "\u2028line separator\u2029"),
]


@pytest.mark.parametrize("fmt", ds.FORMATS)
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_every_format_round_trips(tmp_path: Path, fmt: str, suffix: str) -> None:
    path = tmp_path / f"out{'.csv' if fmt == 'csv' else suffix}"
    export_pairs(path, ROUND_TRIP, fmt)
    assert import_file(path, fmt) == ROUND_TRIP
    assert import_file(path) == ROUND_TRIP
    assert detect_format(path) == fmt


def test_alpaca_export_is_a_json_array_unless_jsonl(tmp_path: Path) -> None:
    export_pairs(tmp_path / "a.json", ROUND_TRIP[:1], "alpaca")
    assert json.loads((tmp_path / "a.json").read_text()) == [
        {"instruction": "What is tunedeck?", "input": "", "output": "A terminal app."}
    ]


def test_jsonl_output_is_one_readable_object_per_line() -> None:
    text = dumps_pairs([QAPair("é", "a"), QAPair("q", "a", "s")])
    assert text == '{"question": "é", "answer": "a"}\n{"question": "q", "answer": "a", "system": "s"}\n'


def test_csv_export_header_has_system_only_when_used() -> None:
    assert dumps_pairs([QAPair("q", "a")], "csv") == "question,answer\r\nq,a\r\n"


# Atomic saves


def original(tmp_path: Path) -> tuple[Path, bytes]:
    path = write(tmp_path / "d.jsonl", jsonl(QA, {"question": "old", "answer": "version"}))
    return path, path.read_bytes()


def test_save_replaces_the_file(tmp_path: Path) -> None:
    path, _ = original(tmp_path)
    save_pairs(path, [QAPair("new", "pair")])
    assert load_pairs(path) == [QAPair("new", "pair")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_disk_full_at_rename_keeps_the_original_byte_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, before = original(tmp_path)

    def full(*_args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(DiskFullError):
        save_pairs(path, [QAPair("new", "pair")])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_fsync_failure_keeps_the_original_byte_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, before = original(tmp_path)

    def broken(_fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(EngineError, match="Input/output error") as caught:
        export_pairs(path, [QAPair("new", "pair")], "jsonl")
    assert not isinstance(caught.value, DiskFullError)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_disk_full_while_writing_keeps_the_original(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, before = original(tmp_path)

    def full(_fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFullError, match="disk filled up"):
        save_pairs(path, [QAPair("x" * 100_000, "y")])
    assert path.read_bytes() == before


def test_unsavable_text_is_refused_before_the_disk_is_touched(tmp_path: Path) -> None:
    path, before = original(tmp_path)
    with pytest.raises(DatasetFileError, match="1 pair cannot be saved") as caught:
        save_pairs(path, [QAPair("ok", "ok"), QAPair("half \ud800", "a")])
    assert [p.line for p in caught.value.problems] == [2]
    assert path.read_bytes() == before
    with pytest.raises(DatasetFileError, match="is a number"):
        save_pairs(path, [QAPair("q", 5)])  # type: ignore[arg-type]
    assert path.read_bytes() == before


# Lints


def test_lints_for_empty_fields_and_duplicates() -> None:
    pairs = [
        QAPair("How do I resume?", "tunedeck train --resume RUN"),
        QAPair("  ", "an answer"),
        QAPair("What is QLoRA?", " \n"),
        QAPair("how  do i RESUME?\t", "something else"),
        QAPair("How do I resume?", "again"),
    ]
    lints = lint_pairs(pairs)
    assert [(lint.row, lint.line, lint.kind) for lint in lints] == [
        (1, 2, "empty_question"),
        (2, 3, "empty_answer"),
        (3, 4, "duplicate_question"),
        (4, 5, "duplicate_question"),
    ]
    assert lints[2].first_row == 0 and lints[3].first_row == 0
    assert str(lints[2]) == (
        "line 4: the question repeats the one on line 1 — delete one of them or merge their answers into one"
    )


def test_too_long_uses_the_injected_counter() -> None:
    pairs = [QAPair("short", "a"), QAPair("long", "b")]
    counts = {"short": 10, "long": 600}
    lints = lint_pairs(pairs, max_tokens=512, count_tokens=lambda pair: counts[pair.question])
    assert [(lint.row, lint.kind) for lint in lints] == [(1, "too_long")]
    assert lints[0].message == "the pair is 600 tokens, over the limit of 512, so training would cut it"
    assert "data.max_length" in lints[0].fix
    assert lint_pairs(pairs, count_tokens=lambda pair: 10**6) == []


def test_too_long_without_a_counter_estimates() -> None:
    lints = lint_pairs([QAPair("q", "word " * 200)], max_tokens=100)
    assert lints[0].kind == "too_long" and "(estimated)" in lints[0].message


def test_dataset_lints_use_source_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", "\n\n" + jsonl(QA) + "oops\n" + jsonl(QA))
    dataset = load_dataset(path)
    lints = dataset.lint()
    assert [(lint.row, lint.line, lint.kind) for lint in lints] == [(1, 5, "duplicate_question")]
    assert lints[0].message == "the question repeats the one on line 3"


def test_dataset_without_lines_numbers_rows_from_one() -> None:
    assert Dataset([QAPair("q", "a"), QAPair("q", "b")]).lines == [1, 2]


# The demo dataset


def test_demo_dataset_is_clean_short_and_about_tunedeck() -> None:
    pairs = load_pairs(DEMO)
    assert len(pairs) >= 45
    assert lint_pairs(pairs) == []
    questions = [ds.normalise_question(pair.question) for pair in pairs]
    assert len(set(questions)) == len(questions)
    for pair in pairs:
        words = len(pair.answer.split())
        assert 12 <= words <= 40, pair.answer
        assert pair.answer.count(". ") <= 1, pair.answer
    assert sum("tunedeck" in pair.answer for pair in pairs) == len(pairs)


# The command


def namespace(**values: object) -> argparse.Namespace:
    defaults: dict[str, object] = {
        "workspace": None,
        "max_tokens": None,
        "model": None,
        "format": "auto",
        "out": None,
        "skip_bad": False,
        "force": False,
    }
    return argparse.Namespace(**{**defaults, **values})


def test_parser_accepts_the_documented_forms() -> None:
    parser = argparse.ArgumentParser()
    data_command.add_arguments(parser)
    args = parser.parse_args(["lint", "d.jsonl", "--max-tokens", "256", "--model", "models/x"])
    assert (args.data_command, args.file, args.max_tokens, args.model) == (
        "lint",
        Path("d.jsonl"),
        256,
        Path("models/x"),
    )
    args = parser.parse_args(["import", "a.json", "--format", "alpaca", "--out", "x.jsonl"])
    assert (args.format, args.out) == ("alpaca", Path("x.jsonl"))
    args = parser.parse_args(["export", "d.jsonl", "--format", "csv", "--out", "d.csv"])
    assert (args.format, args.out) == ("csv", Path("d.csv"))
    with pytest.raises(SystemExit):
        parser.parse_args(["lint", "d.jsonl", "--max-tokens", "0"])


def test_lint_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clean = write(tmp_path / "clean.jsonl", jsonl(QA))
    assert data_command.run(namespace(data_command="lint", file=clean)) == 0
    assert "clean.jsonl: 1 pair; no problems found." in capsys.readouterr().out

    dirty = write(tmp_path / "dirty.jsonl", jsonl(QA, QA) + "oops\n")
    assert data_command.run(namespace(data_command="lint", file=dirty)) == 1
    out = capsys.readouterr().out
    assert "dirty.jsonl: 2 pairs; 1 unreadable line, 1 lint." in out
    assert "  line 2: [duplicate_question] the question repeats the one on line 1" in out
    assert "  line 3: [unreadable] invalid JSON" in out

    assert data_command.run(namespace(data_command="lint", file=tmp_path / "none.jsonl")) == 2
    assert "does not exist" in capsys.readouterr().err


def test_lint_max_tokens_with_estimates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "d.jsonl", jsonl({"question": "q", "answer": "word " * 400}))
    assert data_command.run(namespace(data_command="lint", file=path, max_tokens=64)) == 1
    out = capsys.readouterr().out
    assert "[too_long]" in out and "estimates" in out


def test_lint_with_model_uses_the_renderer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[Path] = []

    class FakeRenderer:
        @classmethod
        def from_model_dir(cls, path: Path) -> FakeRenderer:
            seen.append(path)
            return cls()

        def count(self, pair: QAPair) -> int:
            return 1000 if pair.question == "long" else 5

    module = types.ModuleType("engine.template")
    module.PromptRenderer = FakeRenderer  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "engine.template", module)
    model = tmp_path / "model"
    model.mkdir()
    path = write(tmp_path / "d.jsonl", jsonl(QA, {"question": "long", "answer": "a"}))
    assert data_command.run(namespace(data_command="lint", file=path, model=model, max_tokens=512)) == 1
    out = capsys.readouterr().out
    assert seen == [model]
    assert "line 2: [too_long] the pair is 1,000 tokens, over the limit of 512" in out
    assert "Longest pair: 1,000 tokens (line 2)." in out


def test_lint_with_a_real_tokenizer_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("engine.template")
    tokenizers = pytest.importorskip("tokenizers")
    model = tmp_path / "model"
    model.mkdir()
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|im_start|>", "<|im_end|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(["What is tunedeck? A terminal app."] * 10, trainer=trainer)
    tokenizer.save(str(model / "tokenizer.json"))
    (model / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    path = write(tmp_path / "d.jsonl", jsonl(QA, {"question": "q", "answer": "word " * 300}))

    assert data_command.run(namespace(data_command="lint", file=path, model=model, max_tokens=200)) == 1
    out = capsys.readouterr().out
    assert "line 2: [too_long] the pair is " in out and "(estimated)" not in out
    assert "Longest pair: " in out and "(line 2)" in out
    assert data_command.run(namespace(data_command="lint", file=path, model=model, max_tokens=100_000)) == 0


def test_lint_with_model_when_template_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "engine.template", None)
    path = write(tmp_path / "d.jsonl", jsonl(QA))
    assert data_command.run(namespace(data_command="lint", file=path, model=tmp_path)) == 2
    err = capsys.readouterr().err
    assert "engine.template" in err and "Drop --model" in err


def test_lint_with_model_when_the_tokenizer_package_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class NeedsTokenizers:
        @classmethod
        def from_model_dir(cls, path: Path) -> NeedsTokenizers:
            raise ModuleNotFoundError("No module named 'tokenizers'", name="tokenizers")

    module = types.ModuleType("engine.template")
    module.PromptRenderer = NeedsTokenizers  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "engine.template", module)
    path = write(tmp_path / "d.jsonl", jsonl(QA))
    assert data_command.run(namespace(data_command="lint", file=path, model=tmp_path)) == 2
    assert "needs the package 'tokenizers'" in capsys.readouterr().err


def test_lint_finds_a_dataset_by_name_in_the_workspace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workspace = Workspace.init(tmp_path / "ws")
    write(workspace.datasets_dir / "mine.jsonl", jsonl(QA))
    assert data_command.run(namespace(data_command="lint", file=Path("mine"), workspace=workspace.root)) == 0
    assert "mine.jsonl: 1 pair" in capsys.readouterr().out


def test_import_writes_into_the_workspace_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workspace = Workspace.init(tmp_path / "ws")
    source = write(tmp_path / "alpaca.json", json.dumps([{"instruction": "q", "input": "", "output": "a"}]))
    args = namespace(data_command="import", source=source, workspace=workspace.root)
    assert data_command.run(args) == 0
    dest = workspace.datasets_dir / "alpaca.jsonl"
    assert load_pairs(dest) == [QAPair("q", "a")]
    assert "Imported 1 pair from alpaca.json (Alpaca)" in capsys.readouterr().out

    before = dest.read_bytes()
    assert data_command.run(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert dest.read_bytes() == before
    write(source, json.dumps([{"instruction": "q2", "input": "", "output": "a2"}]))
    assert data_command.run(namespace(**{**vars(args), "force": True})) == 0
    assert load_pairs(dest) == [QAPair("q2", "a2")]


def test_import_outside_a_workspace_needs_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TUNEDECK_WORKSPACE", raising=False)
    source = write(tmp_path / "d.csv", "prompt,response\nq,a\n")
    assert data_command.run(namespace(data_command="import", source=source)) == 2
    assert "--out" in capsys.readouterr().err
    assert not (tmp_path / "tunedeck.toml").exists()
    assert data_command.run(namespace(data_command="import", source=source, out=tmp_path / "o.jsonl")) == 0
    assert load_pairs(tmp_path / "o.jsonl") == [QAPair("q", "a")]


def test_import_with_bad_rows_writes_nothing_unless_skip_bad(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write(tmp_path / "sg.jsonl", jsonl(SHAREGPT, {"conversations": [{"from": "gpt", "value": "a"}]}))
    dest = tmp_path / "out.jsonl"
    args = namespace(data_command="import", source=source, out=dest)
    assert data_command.run(args) == 1
    out = capsys.readouterr().out
    assert "nothing was written" in out and "line 2: [unreadable] turn 1 is a 'gpt' reply" in out
    assert not dest.exists()
    assert data_command.run(namespace(**{**vars(args), "skip_bad": True})) == 1
    assert "Skipped 1 unreadable line" in capsys.readouterr().out
    assert len(load_pairs(dest)) == 2


def test_export_each_format_and_refuse_unreadable_sources(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write(tmp_path / "d.jsonl", jsonl(QA))
    for fmt in ("jsonl", "alpaca", "openai", "csv", "sharegpt"):
        dest = tmp_path / f"out-{fmt}.{'csv' if fmt == 'csv' else 'json'}"
        assert data_command.run(namespace(data_command="export", file=source, format=fmt, out=dest)) == 0
        assert import_file(dest, fmt) == [QAPair(QA["question"], QA["answer"])]
    assert (
        data_command.run(namespace(data_command="export", file=source, format="csv", out=source, force=True))
        == 2
    )
    broken = write(tmp_path / "b.jsonl", "oops\n")
    assert (
        data_command.run(namespace(data_command="export", file=broken, format="csv", out=tmp_path / "b.csv"))
        == 1
    )
    assert "line 1: [unreadable]" in capsys.readouterr().out
    assert not (tmp_path / "b.csv").exists()


def test_the_cli_dispatches_data_commands(tmp_path: Path) -> None:
    if not (REPO / "engine" / "cli.py").exists():
        pytest.skip("engine/cli.py is not there yet")
    path = write(tmp_path / "d.jsonl", jsonl(QA) + jsonl({"question": "q", "respone": "a"}))
    result = subprocess.run(
        [sys.executable, "-m", "engine.cli", "data", "lint", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "line 2: [unreadable] no 'answer' field" in result.stdout
    out = tmp_path / "d.csv"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "data",
            "export",
            str(DEMO),
            "--format",
            "csv",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert import_file(out) == load_pairs(DEMO)


def test_the_dataset_module_imports_no_heavy_or_ui_packages() -> None:
    code = (
        "import sys, engine.dataset, engine.commands.data\n"
        "heavy = {'torch', 'transformers', 'textual', 'tokenizers', 'jinja2', 'numpy'} & set(sys.modules)\n"
        "print(sorted(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
