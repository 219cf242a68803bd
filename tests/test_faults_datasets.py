"""Bad datasets where training meets them: `tunedeck train`, the Train tab's form and the trainer itself.

tests/test_dataset_fuzz.py fuzzes the importers (1,350 generated files: only DatasetError escapes, every problem
names its line and a fix). What it does not reach is the training boundary: that a bad file given to a run is
refused before anything starts, in one sentence naming the line and the fix, from the CLI and from the TUI; that
a file damaged between launch and the trainer's start fails the run the same way; and that a dataset with no row
short enough for data.max_length fails with the setting to change instead of training on nothing.
"""

from __future__ import annotations

import json

import pytest

pytest.register_assert_rewrite("crashkit")

from crashkit.harness import Zygote  # noqa: E402
from crashkit.plugin import Trials, family  # noqa: E402
from tuikit import notifications, run_in_app, start_run_from_form, wait_for  # noqa: E402

from engine.events import RunFailed, read_events  # noqa: E402
from engine.launch import prepare_run  # noqa: E402
from engine.workspace import Workspace, checkpoint_dirs  # noqa: E402

pytest_plugins = ["crashkit.plugin", "crashkit.fixtures"]

GOOD = b'{"question": "What colour is the sky?", "answer": "Blue."}\n'
# File content → what the one-sentence cause must say (the line and the fix).
BAD_FILES: dict[str, tuple[bytes, tuple[str, ...]]] = {
    "cut short by a crash": (
        GOOD + b'{"question": "c?", "answer": "d.\n',
        ("line 2: invalid JSON", "close it"),
    ),
    "misspelt key": (
        GOOD * 2 + b'{"question": "c?", "anwser": "d."}\n',
        ("line 3", "rename 'anwser' to 'answer'"),
    ),
    "a byte that is not UTF-8": (
        GOOD + b'{"question": "c\xff?", "answer": "d."}\n',
        ("line 2", "re-save the file as UTF-8"),
    ),
    "empty": (b"", ("is empty", "add one JSON object per line")),
    "UTF-16": ('{"question": "a?", "answer": "b."}\n'.encode("utf-16"), ("UTF-16", "UTF-8")),
    "a number for an answer": (GOOD + b'{"question": "a?", "answer": 42}\n', ("line 2", "double quotes")),
    "CSV under a .jsonl name": (
        b"question,answer\na?,b.\n",
        ("line 1: invalid JSON", "one complete JSON object"),
    ),
}


@family("bad-datasets")
def test_tunedeck_train_refuses_a_bad_dataset_naming_the_line_and_starts_nothing(
    tiny_workspace: Workspace,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    trials: Trials,
) -> None:
    from engine.cli import main

    monkeypatch.setenv(
        "TUNEDECK_WORKSPACE", str(tiny_workspace.root)
    )  # restored after the in-process CLI runs
    recipe = str(tiny_workspace.root / "recipes" / "tiny.toml")
    for kind, (content, expected) in BAD_FILES.items():
        (tiny_workspace.datasets_dir / "bad.jsonl").write_bytes(content)
        code = main(["--workspace", str(tiny_workspace.root), "train", recipe, "data.dataset=bad.jsonl"])
        out, err = capsys.readouterr()
        assert code == 2 and out == "", kind
        title, _, rest = err.partition(": ")
        cause, _, next_step = rest.partition("\n  → ")
        assert title == "Dataset problem" and "Traceback" not in err, (kind, err)
        assert all(part in cause for part in expected), (kind, cause)
        assert next_step.strip(), (kind, err)
        trials.case()
    assert tiny_workspace.list_run_dirs() == [], "a refused run leaves no run folder"


@family("bad-datasets")
def test_the_train_tab_refuses_a_bad_dataset_with_the_line(tiny_workspace: Workspace, trials: Trials) -> None:
    from tui.engine_client import EngineClient

    recipe = tiny_workspace.root / "recipes" / "tiny.toml"
    (tiny_workspace.datasets_dir / "tiny_qa.jsonl").write_bytes(BAD_FILES["misspelt key"][0])

    async def start_from_the_form(app, pilot, train) -> None:
        await start_run_from_form(app, pilot, recipe, "tiny_qa.jsonl")
        await wait_for(pilot, lambda: notifications(app), what="the refusal")
        shown = notifications(app)[-1]
        assert shown.title == "Dataset problem" and "line 3" in shown.message, shown
        assert "rename 'anwser' to 'answer'" in shown.message and "tunedeck data lint" in shown.message

    run_in_app(EngineClient(tiny_workspace), start_from_the_form, tab="train")
    assert tiny_workspace.list_run_dirs() == []
    trials.case()


@family("bad-datasets")
def test_a_dataset_damaged_after_launch_or_too_long_for_max_length_fails_the_run_with_the_fix(
    tiny_workspace: Workspace, ml_zygote: Zygote, trials: Trials
) -> None:
    recipe = tiny_workspace.root / "recipes" / "tiny.toml"
    damaged = prepare_run(tiny_workspace, recipe, ["train.max_steps=2"])
    with open(tiny_workspace.datasets_dir / "tiny_qa.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"question": "half a line\n')
    result = ml_zygote.trial("engine.train:main", ["--run-dir", str(damaged)])
    failed = read_events(damaged / "events.jsonl")[-1]
    assert result.code == 1 and isinstance(failed, RunFailed), failed
    assert failed.title == "Dataset problem" and "line 7: invalid JSON" in failed.cause
    assert "tunedeck data lint" in failed.next_step and checkpoint_dirs(damaged) == []
    trials.case()

    lines = (tiny_workspace.datasets_dir / "tiny_qa.jsonl").read_text().splitlines()[:6]
    (tiny_workspace.datasets_dir / "tiny_qa.jsonl").write_text("\n".join(lines) + "\n")
    too_long = prepare_run(tiny_workspace, recipe, ["data.max_length=4", "train.max_steps=2"])
    result = ml_zygote.trial("engine.train:main", ["--run-dir", str(too_long)])
    failed = read_events(too_long / "events.jsonl")[-1]
    assert result.code == 1 and isinstance(failed, RunFailed), failed
    assert "data.max_length=4" in failed.cause and "Raise data.max_length" in failed.next_step
    assert json.loads((too_long / "run.json").read_text())["dataset"]["rows"] == 6
    trials.case()
