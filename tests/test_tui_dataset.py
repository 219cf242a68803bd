"""The Dataset tab: edits reach the file atomically, undo/redo, filter, lints, import/export, crash safety."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures" / "tui"))

from textual.widgets import DataTable, Input, TextArea
from tui_workspace import PAIRS, engine_for, make_workspace
from tuikit import run_in_app, screen_text, wait_for

from engine.dataset import QAPair, load_pairs
from engine.errors import DatasetError
from engine.workspace import Workspace
from tui.dataset_doc import DatasetDocument
from tui.screens.dataset import DatasetView
from tui.screens.edit_pair import EditPairScreen
from tui.screens.modals import ConfirmScreen, PromptScreen

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    """A workspace with demo_qa.jsonl (12 pairs, one empty answer, one repeated question) and no runs."""
    return make_workspace(tmp_path / "ws", 0, runs=())


def dataset_file(workspace: Workspace) -> Path:
    return workspace.datasets_dir / "demo_qa.jsonl"


def run(workspace: Workspace, scenario) -> None:
    """Run `scenario(app, pilot, view)` in the Dataset tab once its file is open and linted."""
    run_in_app(engine_for(workspace), scenario, tab="dataset", ready=document_linted)


def document_linted(view: DatasetView) -> bool:
    """True once the tab's dataset is open and its lints are up to date."""
    return view.document is not None and view.lint_version == view.document.version


async def saved(pilot, view: DatasetView) -> None:
    """Wait until the newest version is on disk."""
    await wait_for(pilot, lambda: not view.document.dirty and not view.save_error)


def test_table_shows_rows_token_counts_and_lint_marks(workspace: Workspace) -> None:
    async def scenario(app, pilot, view) -> None:
        table = app.query_one("#ds-table", DataTable)
        assert table.row_count == len(PAIRS)
        assert str(table.get_row_at(4)[4]) == "E"  # empty answer
        assert str(table.get_row_at(6)[4]) == "D"  # repeats row 1's question
        assert str(table.get_row_at(0)[4]) == ""
        assert all(str(table.get_row_at(i)[3]).isdigit() for i in range(table.row_count))
        text = screen_text(app)
        assert "demo_qa.jsonl · 12 pairs · 2 with lints · saved ✓" in text
        # The detail pane names the lint's line and its fix.
        table.move_cursor(row=6)
        await pilot.pause(0.2)
        assert "line 7: the question repeats the one on line 1" in str(app.query_one("#ds-lints").render())

    run(workspace, scenario)


def test_editing_a_row_saves_the_file(workspace: Workspace) -> None:
    async def scenario(app, pilot, view) -> None:
        await pilot.press("down", "enter")
        await wait_for(pilot, lambda: isinstance(app.screen, EditPairScreen))
        answer = app.screen.query_one("#edit-answer", TextArea)
        answer.text = "Select the run in the Train tab and press r."
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: not isinstance(app.screen, EditPairScreen))
        await saved(pilot, view)
        pairs = load_pairs(dataset_file(workspace))
        assert pairs[1].answer == "Select the run in the Train tab and press r."
        assert [p.question for p in pairs] == [q for q, _ in PAIRS]

    run(workspace, scenario)


def test_adding_by_keyboard_writes_a_new_row_below_the_cursor(workspace: Workspace) -> None:
    async def scenario(app, pilot, view) -> None:
        await pilot.press("a")
        await wait_for(pilot, lambda: isinstance(app.screen, EditPairScreen))
        await pilot.press(*"Is GGUF export checked?")
        assert "the answer is empty" in str(app.screen.query_one("#edit-lints").render())
        await pilot.press("tab")
        await pilot.press(*"Yes, against the adapter.")
        assert "no lints" in str(app.screen.query_one("#edit-lints").render())
        await pilot.press("ctrl+s")
        await saved(pilot, view)
        pairs = load_pairs(dataset_file(workspace))
        assert len(pairs) == len(PAIRS) + 1
        assert pairs[1] == QAPair("Is GGUF export checked?", "Yes, against the adapter.")

    run(workspace, scenario)


def test_escape_in_the_editor_discards_the_edit(workspace: Workspace) -> None:
    before = dataset_file(workspace).read_bytes()

    async def scenario(app, pilot, view) -> None:
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, EditPairScreen))
        await pilot.press(*"typed but not kept")
        await pilot.press("escape")
        await wait_for(pilot, lambda: not isinstance(app.screen, EditPairScreen))
        await pilot.pause(0.3)
        assert view.document.version == 0

    run(workspace, scenario)
    assert dataset_file(workspace).read_bytes() == before


def test_delete_duplicate_undo_and_redo_each_reach_the_disk(workspace: Workspace) -> None:
    original = load_pairs(dataset_file(workspace))

    async def scenario(app, pilot, view) -> None:
        await pilot.press("d")
        await saved(pilot, view)
        assert load_pairs(dataset_file(workspace)) == original[1:]
        await pilot.press("c")
        await saved(pilot, view)
        assert load_pairs(dataset_file(workspace)) == [original[1], original[1], *original[2:]]
        await pilot.press("u")
        await saved(pilot, view)
        assert load_pairs(dataset_file(workspace)) == original[1:]
        await pilot.press("ctrl+z")
        await saved(pilot, view)
        assert load_pairs(dataset_file(workspace)) == original
        await pilot.press("ctrl+y")
        await saved(pilot, view)
        assert load_pairs(dataset_file(workspace)) == original[1:]

    run(workspace, scenario)


def test_filter_narrows_rows_and_escape_clears_it(workspace: Workspace) -> None:
    async def scenario(app, pilot, view) -> None:
        table = app.query_one("#ds-table", DataTable)
        await pilot.press("slash")
        assert app.query_one("#ds-filter", Input).has_focus
        await pilot.press(*"capital")
        await wait_for(pilot, lambda: table.row_count == 2)
        assert view.visible_rows == [0, 6]
        await pilot.press("enter")
        assert table.has_focus
        await pilot.press("escape")
        await wait_for(pilot, lambda: table.row_count == len(PAIRS))

    run(workspace, scenario)


def test_import_appends_alpaca_pairs_and_export_writes_openai(workspace: Workspace, tmp_path: Path) -> None:
    source = tmp_path / "extra.json"
    source.write_text(
        json.dumps(
            [
                {
                    "instruction": "What is tunedeck?",
                    "input": "",
                    "output": "A terminal app for fine-tuning.",
                },
                {"instruction": "Does it need a browser?", "input": "", "output": "No."},
            ]
        )
    )

    async def scenario(app, pilot, view) -> None:
        await pilot.press("i")
        await wait_for(pilot, lambda: isinstance(app.screen, PromptScreen))
        await pilot.press(*str(source))
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(view.document.pairs) == len(PAIRS) + 2)
        await saved(pilot, view)
        pairs = load_pairs(dataset_file(workspace))
        assert pairs[-2:] == [
            QAPair("What is tunedeck?", "A terminal app for fine-tuning."),
            QAPair("Does it need a browser?", "No."),
        ]
        await pilot.press("x")
        await wait_for(pilot, lambda: isinstance(app.screen, PromptScreen))
        await pilot.press("enter")
        exported = workspace.root / "exports" / "demo_qa.openai.jsonl"
        await wait_for(pilot, lambda: exported.exists())
        first = json.loads(exported.read_text().splitlines()[0])
        assert first["messages"][0] == {"role": "user", "content": PAIRS[0][0]}

    run(workspace, scenario)


def test_a_bad_import_file_is_named_in_the_notification(workspace: Workspace, tmp_path: Path) -> None:
    source = tmp_path / "broken.jsonl"
    source.write_text('{"question": "ok", "answer": "fine"}\n{"question": "no answer here"\n')

    async def scenario(app, pilot, view) -> None:
        await pilot.press("i")
        await wait_for(pilot, lambda: isinstance(app.screen, PromptScreen))
        await pilot.press(*str(source), "enter")
        await wait_for(pilot, lambda: bool(app._notifications))
        notification = list(app._notifications)[-1]
        assert notification.title == "Dataset problem"
        assert "line 2" in notification.message and "broken.jsonl" in notification.message
        assert len(view.document.pairs) == len(PAIRS)

    run(workspace, scenario)


def test_new_dataset_is_created_and_opened(workspace: Workspace) -> None:
    async def scenario(app, pilot, view) -> None:
        await pilot.press("n")
        await wait_for(pilot, lambda: isinstance(app.screen, PromptScreen))
        await pilot.press(*"support bot", "enter")
        await wait_for(pilot, lambda: view.document is not None and view.document.name == "support-bot.jsonl")
        assert (workspace.datasets_dir / "support-bot.jsonl").read_text() == ""
        await pilot.press("a", *"Hello?", "tab", *"Hi!", "ctrl+s")
        await saved(pilot, view)
        assert load_pairs(workspace.datasets_dir / "support-bot.jsonl") == [QAPair("Hello?", "Hi!")]

    run(workspace, scenario)


def test_a_failed_save_keeps_the_file_and_says_why(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = dataset_file(workspace).read_bytes()
    import tui.dataset_doc as dataset_doc
    from engine.errors import DiskFullError

    def disk_full(path: Path, pairs: list[QAPair]) -> None:
        raise DiskFullError(
            f"The disk filled up while writing {path}; the previous version is untouched.",
            next_step="Free some disk space and try again.",
        )

    monkeypatch.setattr(dataset_doc, "save_pairs", disk_full)

    async def scenario(app, pilot, view) -> None:
        await pilot.press("d")
        await wait_for(pilot, lambda: bool(view.save_error))
        notification = list(app._notifications)[-1]
        assert notification.title == "Disk full"
        assert "NOT SAVED" in screen_text(app)

    run(workspace, scenario)
    assert dataset_file(workspace).read_bytes() == before


def test_a_file_changed_by_another_program_is_not_overwritten(workspace: Workspace) -> None:
    async def scenario(app, pilot, view) -> None:
        dataset_file(workspace).write_text('{"question": "from elsewhere", "answer": "keep me"}\n')
        await pilot.press("d")
        await wait_for(pilot, lambda: bool(view.save_error))
        assert list(app._notifications)[-1].title == "Dataset changed on disk"
        await pilot.press("r")
        await wait_for(pilot, lambda: len(view.document.pairs) == 1)

    run(workspace, scenario)
    assert load_pairs(dataset_file(workspace)) == [QAPair("from elsewhere", "keep me")]


def test_unreadable_lines_are_set_aside_only_after_asking(workspace: Workspace) -> None:
    path = dataset_file(workspace)
    original = path.read_text() + "{not json\n"
    path.write_text(original)

    async def scenario(app, pilot, view) -> None:
        assert view.document.problems
        await pilot.press("d")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await saved(pilot, view)

    run(workspace, scenario)
    backups = list(workspace.datasets_dir.glob("demo_qa.unreadable-*.jsonl.orig"))
    assert len(backups) == 1 and backups[0].read_text() == original
    assert len(load_pairs(path)) == len(PAIRS) - 1


def test_prompt_pane_renders_the_template_with_the_trained_part_marked(workspace: Workspace) -> None:
    async def scenario(app, pilot, view) -> None:
        await wait_for(pilot, lambda: "<|im_start|>assistant" in str(app.query_one("#ds-prompt").render()))
        rendered = app.query_one("#ds-prompt").render()
        assert "What is the capital of France?" in str(rendered)
        await pilot.press("p")
        assert not app.query_one("#ds-preview").display

    run(workspace, scenario)


def test_token_counts_come_from_the_model_tokenizer_when_a_folder_has_one(workspace: Workspace) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = workspace.models_dir / "tiny"
    folder.mkdir()
    words = sorted({w for q, a in PAIRS for w in (q + " " + a).split()})
    vocab = {"[UNK]": 0, "<|im_start|>": 1, "<|im_end|>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))

    async def scenario(app, pilot, view) -> None:
        estimated = list(view.counts)
        await pilot.press("m")
        await wait_for(pilot, lambda: app.screen.__class__.__name__ == "PickScreen")
        option_list = app.screen.query_one("#pick-list")
        option_list.highlighted = [o.id for o in option_list.options].index("models/tiny")
        await pilot.press("enter")
        await wait_for(pilot, lambda: view.counts_exact)
        assert view.counts != estimated
        from engine.template import PromptRenderer

        renderer = PromptRenderer.from_model_dir(folder)
        assert view.counts[0] == renderer.count(QAPair(*PAIRS[0]))
        await wait_for(
            pilot, lambda: "trained tokens highlighted" in str(app.query_one("#ds-prompt").render())
        )

    run(workspace, scenario)


def test_a_crash_in_the_middle_of_a_save_leaves_the_original_intact(workspace: Workspace) -> None:
    """The process is killed (SIGKILL) after the new file is written and before it is renamed into place."""
    path = dataset_file(workspace)
    before = path.read_bytes()
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from engine.dataset import QAPair
        from tui.dataset_doc import DatasetDocument
        document = DatasetDocument.open({str(path)!r})
        document.update(0, QAPair("half written", "x" * 100000))
        os.replace = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
        document.save(*document.snapshot())
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert result.returncode == -9
    assert path.read_bytes() == before
    assert load_pairs(path)[0].question == PAIRS[0][0]
    # The temp file left behind is hidden and marked partial, so no reader takes it for a dataset.
    assert [p.name for p in workspace.list_datasets()] == ["demo_qa.jsonl", "support_faq.jsonl"]


def test_document_save_ignores_versions_older_than_the_one_on_disk(workspace: Workspace) -> None:
    document = DatasetDocument.open(dataset_file(workspace))
    document.delete([0])
    old = document.snapshot()
    document.delete([0])
    new = document.snapshot()
    assert document.save(*new) is True
    assert document.save(*old) is False
    assert len(load_pairs(dataset_file(workspace))) == len(PAIRS) - 2
    document.problems = [object()]  # type: ignore[list-item]
    document.delete([0])
    with pytest.raises(DatasetError):
        document.save(*document.snapshot())
