"""The Export tab on a fake export engine: pre-flight, stages, the parity report as tables, past exports, and chat
on an exported GGUF."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures" / "tui"))

from textual.widgets import Checkbox, DataTable, Input, Select
from tui_workspace import FAILED, FAKE_EXPORT, FINISHED, engine_for, make_workspace
from tuikit import run_in_app, screen_text, wait_for

from engine.workspace import Workspace, pid_alive
from tui.export_report import similarity
from tui.screens.chat import ChatMessage, ChatView
from tui.screens.export import ExportView, StageRow
from tui.screens.modals import ConfirmScreen, TextScreen

STAGES = [
    "preflight",
    "merge",
    "convert",
    "quantize:q4_0",
    "quantize:q5_1",
    "quantize:q8_0",
    "verify",
    "parity",
]


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    return make_workspace(tmp_path / "ws", 0, runs=("finished", "failed"))


def past_export(workspace: Workspace, *args: str) -> Path:
    """Run the fake export engine as an earlier session would have, and return its folder."""
    result = subprocess.run(
        [sys.executable, str(FAKE_EXPORT), "--run-dir", str(workspace.runs_dir / FINISHED), *args],
        capture_output=True,
        text=True,
        check=True,
    )
    finished = json.loads(result.stdout.strip().splitlines()[-1])
    return Path(finished["outputs"]["export_dir"])


def run_export(workspace: Workspace, scenario) -> None:
    """Run `scenario(app, pilot, view)` in the Export tab, then quit as ctrl+q does."""
    run_in_app(engine_for(workspace), scenario, tab="export", quit_after=True)


def plain_row(table: DataTable, key: str) -> list[str]:
    return [getattr(cell, "plain", str(cell)) for cell in table.get_row(key)]


def pct(value: float) -> str:
    return f"{value * 100:.0f}%"


def test_choices_list_runs_checkpoints_and_quants(workspace: Workspace) -> None:
    async def scenario(app, pilot, view) -> None:
        run = app.query_one("#export-run", Select)
        assert run.value == FAILED  # newest first
        run.value = FINISHED
        await pilot.pause(0.1)
        checkpoints = app.query_one("#export-checkpoint", Select)
        labels = [str(option[0]) for option in checkpoints._options]
        assert labels == ["newest checkpoint (step_48)", "step_48", "step_36", "step_24", "step_12"]
        # q4_0, q5_1 and q8_0 by default (the engine's defaults); overwrite off.
        assert [box.value for box in app.query(Checkbox)] == [True, True, True, False]
        preflight = str(app.query_one("#export-preflight").render())
        assert f"✔ step 48 → exports/{FINISHED}-step48/" in preflight
        assert "f16 + q4_0, q5_1, q8_0" in preflight

    run_export(workspace, scenario)


def test_export_shows_each_stage_then_the_parity_table_with_the_report_numbers(workspace: Workspace) -> None:
    async def scenario(app, pilot, view) -> None:
        app.query_one("#export-run", Select).value = FINISHED
        await pilot.pause(0.1)
        app.query_one("#export-checkpoint", Select).value = "36"
        await pilot.press("x")
        await wait_for(pilot, lambda: view.finished and view.report is not None)
        assert [row.stage for row in view.query(StageRow)] == STAGES
        assert "✔ passed" in str(app.query_one("#export-preflight").render())
        assert "LlamaForCausalLM, 134.5M parameters, lora" in str(app.query_one("#export-preflight").render())
        folder = workspace.exports_dir / f"{FINISHED}-step36"
        assert view.report_dir == folder.resolve()
        report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
        parity = report["parity"]

        # Per file: agreement by split and overall, similarity to the reference, runaways, tokens/s, size.
        files = app.query_one("#parity-files", DataTable)
        assert [str(key.value) for key in files.rows] == ["adapter", "f16", "q4_0", "q5_1", "q8_0"]
        for kind in ("q4_0", "q5_1", "q8_0"):
            summary = parity["files"][kind]
            assert plain_row(files, kind) == [
                kind,
                pct(summary["agreement_train"]),
                pct(summary["agreement_held-out"]),
                pct(summary["agreement"]),
                pct(summary["reference_similarity"]),
                str(summary["runaway"]),
                f"{summary['tokens_per_s']:.1f}",
                f"{report['files'][kind]['size_bytes'] / 1e6:.1f} MB",
            ]
        adapter = plain_row(files, "adapter")
        assert adapter[4:7] == [
            pct(parity["adapter"]["reference_similarity"]),
            str(parity["adapter"]["runaway"]),
            f"{parity['adapter']['tokens_per_s']:.1f}",
        ]

        # Per question: the texts, then each GGUF's similarity to the adapter's answer, ✓/✗ and R for runaway.
        answers = app.query_one("#parity-answers", DataTable)
        assert answers.row_count == parity["questions"] == len(parity["rows"])
        for index, row in enumerate(parity["rows"], start=1):
            cells = plain_row(answers, str(index))
            assert cells[1].rstrip("…") in row["question"]
            for offset, kind in enumerate(("q4_0", "q5_1", "q8_0")):
                expected = f"{similarity(row[kind], row['adapter']) * 100:3.0f}% " + (
                    "✓" if row[f"{kind}_agrees"] else "✗"
                )
                assert cells[4 + offset] == expected + ("R" if row[f"{kind}_runaway"] else "")
        runaway_rows = [i for i, row in enumerate(parity["rows"], start=1) if row["q4_0_runaway"]]
        assert runaway_rows and plain_row(answers, str(runaway_rows[0]))[4].endswith("✗R")

        # The highlighted question's answers below the table, and in full on enter.
        answers.focus()
        answers.move_cursor(row=runaway_rows[0] - 1)
        await pilot.pause(0.1)
        detail = str(app.query_one("#parity-detail").render())
        assert "runaway" in detail and "c chats with the q4_0 file" in detail
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, TextScreen))
        full = str(app.screen.query_one("#text-body").render())
        assert parity["rows"][runaway_rows[0] - 1]["q4_0"].strip()[-40:] in full.replace("\n", " ")
        await pilot.press("escape")
        assert "Export finished" in str(app.query_one("#export-status").render())
        await wait_for(pilot, lambda: not view.running)

    run_export(workspace, scenario)


def test_past_exports_are_listed_and_reopen_with_their_table(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    older = past_export(workspace, "--checkpoint", "24", "--quant", "q8_0")
    newer = past_export(workspace, "--checkpoint", "48")
    monkeypatch.setenv("FAKE_EXPORT_FAIL", "1")
    past_export_failed = subprocess.run(
        [
            sys.executable,
            str(FAKE_EXPORT),
            "--run-dir",
            str(workspace.runs_dir / FINISHED),
            "--checkpoint",
            "36",
        ],
        capture_output=True,
        text=True,
    )
    assert past_export_failed.returncode == 1

    async def scenario(app, pilot, view) -> None:
        await pilot.press("r")
        await wait_for(pilot, lambda: view.report is not None)
        picker = app.query_one("#report-pick", Select)
        labels = {
            Path(str(value)).name: str(label) for label, value in picker._options if value != Select.NULL
        }
        assert set(labels) == {older.name, newer.name, f"{FINISHED}-step36"}
        assert "finished" in labels[older.name] and "failed" in labels[f"{FINISHED}-step36"]
        files = app.query_one("#parity-files", DataTable)
        shown = [str(key.value) for key in files.rows]
        assert view.report_dir in (older.resolve(), newer.resolve())

        # Reopen the older export: its own table (one GGUF file) replaces the other's.
        picker.value = str(older.resolve())
        await wait_for(pilot, lambda: view.report_dir == older.resolve())
        report = json.loads((older / "report.json").read_text(encoding="utf-8"))
        assert [str(key.value) for key in files.rows] == ["adapter", "f16", "q8_0"] != shown
        assert plain_row(files, "q8_0")[3] == pct(report["parity"]["files"]["q8_0"]["agreement"])
        answers = app.query_one("#parity-answers", DataTable)
        assert answers.row_count == report["parity"]["questions"]
        assert [str(column.label) for column in answers.columns.values()][-1] == "q8_0"
        assert older.name in screen_text(app)

        # A failed export shows why instead of a table.
        picker.value = str((workspace.exports_dir / f"{FINISHED}-step36").resolve())
        await wait_for(pilot, lambda: view.report is None)
        summary = str(app.query_one("#report-summary").render())
        assert "failed" in summary and "does not know the tensor" in summary
        assert not app.query_one("#parity-answers", DataTable).display

    run_export(workspace, scenario)


def test_c_opens_the_chat_tab_on_the_q4_0_gguf_through_llama_cpp(workspace: Workspace) -> None:
    folder = past_export(workspace, "--checkpoint", "48")
    q4_0 = folder / f"{FINISHED}-step48-q4_0.gguf"

    async def scenario(app, pilot, view) -> None:
        await pilot.press("r")
        await wait_for(pilot, lambda: view.report is not None)
        await pilot.press("c")
        await wait_for(pilot, lambda: app.active_tab == "chat" and bool(app.query(ChatView)))
        chat = app.query_one(ChatView)
        await wait_for(pilot, lambda: chat.ready)
        argv = chat.process.argv
        assert argv[argv.index("--gguf") + 1] == str(q4_0)
        assert "--base" not in argv and "--run" not in argv and "--adapter" not in argv
        assert "GGUF" in str(app.query_one("#chat-bar").render()) and q4_0.name in str(
            app.query_one("#chat-bar").render()
        )
        await pilot.press(*"Hello", "enter")
        await wait_for(pilot, lambda: chat.active_request is None and chat.state == "ready")
        [reply] = [w for w in chat.query(ChatMessage) if w.role == "assistant"]
        assert reply.title_text == f"GGUF ({q4_0.name})" and reply.text

        # Back in the Export tab, enter on another file's row chats with that one instead.
        await pilot.press("f4")
        await wait_for(pilot, lambda: app.active_tab == "export")
        files = app.query_one("#parity-files", DataTable)
        files.focus()
        files.move_cursor(row=[str(key.value) for key in files.rows].index("q8_0"))
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.active_tab == "chat" and chat.source.path.endswith("-q8_0.gguf"))
        await wait_for(pilot, lambda: chat.ready and "--gguf" in chat.process.argv)
        assert chat.process.argv[chat.process.argv.index("--gguf") + 1].endswith("-q8_0.gguf")

    run_export(workspace, scenario)


def test_a_finished_export_is_not_overwritten_unless_asked(workspace: Workspace) -> None:
    folder = past_export(workspace, "--checkpoint", "48")
    first_report = (folder / "report.json").stat().st_mtime_ns

    async def scenario(app, pilot, view) -> None:
        app.query_one("#export-run", Select).value = FINISHED
        await pilot.pause(0.1)
        preflight = str(app.query_one("#export-preflight").render())
        assert "✖" in preflight and "already holds a finished export" in preflight
        await pilot.press("x")
        await wait_for(pilot, lambda: bool(app._notifications))
        assert list(app._notifications)[-1].title == "Cannot export" and not view.running
        app.query_one("#export-force", Checkbox).value = True
        await pilot.pause(0.1)
        assert "overwrites the finished export" in str(app.query_one("#export-preflight").render())
        await pilot.press("x")
        await wait_for(pilot, lambda: view.finished and view.report is not None)
        assert (folder / "report.json").stat().st_mtime_ns != first_report

    run_export(workspace, scenario)


def test_typed_types_and_folder_reach_the_engine(workspace: Workspace) -> None:
    async def scenario(app, pilot, view) -> None:
        app.query_one("#export-run", Select).value = FINISHED
        more = app.query_one("#export-more-quants", Input)
        more.value = "iq2_xs"
        await pilot.pause(0.1)
        assert "needs an importance matrix" in str(app.query_one("#export-preflight").render())
        more.value = "Q4-K-M"
        app.query_one("#export-out", Input).value = "elsewhere/demo-gguf"
        await pilot.pause(0.1)
        assert "→ elsewhere/demo-gguf/" in str(app.query_one("#export-preflight").render())
        await pilot.press("x")
        await wait_for(pilot, lambda: view.finished and view.report is not None)
        assert "quantize:q4_k_m" in [row.stage for row in view.query(StageRow)]
        assert view.report_dir == (workspace.root / "elsewhere" / "demo-gguf").resolve()
        assert "q4_k_m" in [str(key.value) for key in app.query_one("#parity-files", DataTable).rows]
        # An export written outside exports/ stays in the list for this session.
        picker = app.query_one("#report-pick", Select)
        assert str(view.report_dir) in [str(value) for _, value in picker._options]

    run_export(workspace, scenario)


def test_a_failed_export_names_its_cause(workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_EXPORT_FAIL", "1")

    async def scenario(app, pilot, view) -> None:
        await pilot.press("x")
        await wait_for(pilot, lambda: view.finished and bool(app._notifications))
        notification = list(app._notifications)[-1]
        assert notification.title == "Export failed"
        assert "does not know the tensor" in notification.message
        assert "✖ Export failed" in str(app.query_one("#export-status").render())
        assert "✔ passed" in str(app.query_one("#export-preflight").render())

    run_export(workspace, scenario)


def test_a_preflight_refusal_shows_as_the_preflight_result(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_EXPORT_FAIL", "preflight")

    async def scenario(app, pilot, view) -> None:
        await pilot.press("x")
        await wait_for(pilot, lambda: view.finished and not view.running)
        preflight = str(app.query_one("#export-preflight").render())
        assert "pre-flight ✖" in preflight and "4-bit weights" in preflight and "→ Pass --base" in preflight
        assert [row.stage for row in view.query(StageRow)] == ["preflight"]

    run_export(workspace, scenario)


def test_export_from_the_train_tab_preselects_the_run(workspace: Workspace) -> None:
    async def scenario(app, pilot, train) -> None:
        await pilot.press("e")
        await wait_for(pilot, lambda: bool(app.query(ExportView)))
        await wait_for(pilot, lambda: app.query_one("#export-run", Select).value == FAILED)

    run_in_app(
        engine_for(workspace),
        scenario,
        tab="train",
        ready=lambda train: train.opened is not None and train.opened.run_id == FAILED,
        quit_after=True,
    )


def test_a_report_without_parity_still_lists_its_files(workspace: Workspace) -> None:
    from tui.export_report import answer_rows, file_rows, load_report, summary_line

    report = load_report(past_export(workspace, "--no-parity", "--quant", "q4_0"))
    assert [(row.kind, row.agreement, row.size_bytes is not None) for row in file_rows(report)] == [
        ("f16", None, True),
        ("q4_0", None, True),
    ]
    assert answer_rows(report) == [] and "parity check skipped" in summary_line(report)


def test_an_export_outlives_the_tui_and_shows_again_when_it_reopens(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_EXPORT_DELAY", "0.15")
    pids: list[int] = []

    async def first(app, pilot, view) -> None:
        app.query_one("#export-run", Select).value = FINISHED
        await pilot.pause(0.1)
        await pilot.press("x")
        await wait_for(pilot, lambda: "merge" in [row.stage for row in view.query(StageRow)])
        pids.append(view.export_pid)

    run_export(workspace, first)
    assert pid_alive(pids[0]), "quitting the TUI stopped the export"

    async def second(app, pilot, view) -> None:
        await wait_for(pilot, lambda: view.running and view.export_pid == pids[0])
        assert "Following the export" in str(app.query_one("#export-status").render())
        await wait_for(pilot, lambda: view.finished and view.report is not None, timeout=20)
        stages = [row.stage for row in view.query(StageRow)]
        assert stages[:2] == ["preflight", "merge"] and stages[-1] == "parity"  # replayed, then followed
        assert view.report_dir == (workspace.exports_dir / f"{FINISHED}-step48").resolve()

    run_export(workspace, second)


def test_escape_stops_a_running_export_after_asking(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_EXPORT_DELAY", "0.3")

    async def scenario(app, pilot, view) -> None:
        await pilot.press("x")
        await wait_for(pilot, lambda: bool(view.query(StageRow)))
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: not view.running)
        assert not view.finished and not pid_alive(view.export_pid)
        assert "Export stopped" in str(app.query_one("#export-status").render())
        assert not app._notifications  # a stop the user asked for is not reported as a failure

    run_export(workspace, scenario)
