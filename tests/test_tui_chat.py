"""The Chat tab on a fake chat engine speaking the real protocol: stream, stop, compare, swaps, failures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures" / "tui"))

from textual.containers import Horizontal
from textual.widgets import Input, TextArea
from tui_workspace import FINISHED, engine_for, make_workspace
from tuikit import notifications, run_in_app, screen_text, wait_for

from engine.workspace import Workspace
from tui.engine_client import ChatSource
from tui.screens.chat import ChatMessage, ChatView, Sampling
from tui.screens.chat_settings import ChatSettingsScreen, parse_sampling
from tui.screens.modals import PickScreen

ADAPTER_REPLY = "Paris is the capital of France."
BASE_REPLY = "The capital of France is Paris, a city on the Seine known for many things."


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    """A workspace whose only run (finished) has checkpoints, so chat defaults to it."""
    return make_workspace(tmp_path / "ws", 0, runs=("finished",))


def run_chat(
    workspace: Workspace,
    scenario,
    *,
    env: dict[str, str] | None = None,
    monkeypatch: pytest.MonkeyPatch | None = None,
) -> None:
    """Run `scenario(app, pilot, view)` in the Chat tab, then quit as ctrl+q does."""
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    run_in_app(engine_for(workspace), scenario, tab="chat", quit_after=True)


def replies(view: ChatView) -> list[ChatMessage]:
    return [widget for widget in view.query(ChatMessage) if widget.role == "assistant"]


async def ask(pilot, text: str) -> None:
    await pilot.press(*text)
    await pilot.press("enter")


def test_a_question_streams_the_reply_from_the_run_adapter(workspace: Workspace) -> None:
    async def scenario(app, pilot, view) -> None:
        assert view.source.kind == "run" and view.source.path.endswith(FINISHED)
        assert view.process is None  # the engine starts on the first message, not before
        await ask(pilot, "What is the capital of France?")
        await wait_for(pilot, lambda: view.state == "ready" and view.active_request is None)
        [reply] = replies(view)
        assert reply.text == ADAPTER_REPLY
        assert "6 tokens · 42.0 tok/s · end" in reply.footer_text
        assert view.history == [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": ADAPTER_REPLY},
        ]
        # The run's newest checkpoint was swapped in by the engine; the transcript and bar say so.
        await wait_for(pilot, lambda: view.adapter_step == 36)
        assert any("Adapter swapped to step 36" in w.text for w in view.query(ChatMessage))
        assert "ready" in screen_text(app)
        assert "chat: ready" in str(app.query_one("#status-line").render())
        # A second question carries the whole conversation.
        await ask(pilot, "And of Italy?")
        await wait_for(pilot, lambda: len(view.history) == 4)
        assert view.history[2] == {"role": "user", "content": "And of Italy?"}

    run_chat(workspace, scenario)


def test_escape_stops_a_reply(workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(app, pilot, view) -> None:
        await ask(pilot, "Tell me everything")
        await wait_for(pilot, lambda: bool(replies(view)) and replies(view)[0].text)
        await pilot.press("escape")
        await wait_for(pilot, lambda: view.active_request is None, timeout=5)
        [reply] = replies(view)
        assert "stopped by you" in reply.footer_text
        assert len(reply.text) < len(ADAPTER_REPLY)

    run_chat(workspace, scenario, env={"FAKE_CHAT_WORD_DELAY": "0.3"}, monkeypatch=monkeypatch)


def test_compare_shows_base_and_adapter_side_by_side(workspace: Workspace) -> None:
    async def scenario(app, pilot, view) -> None:
        await pilot.press("ctrl+t")
        assert view.compare
        await ask(pilot, "What is the capital of France?")
        await wait_for(pilot, lambda: view.active_request is None and view.state == "ready")
        [row] = view.query(".chat-compare").results(Horizontal)
        base, adapter = row.query(ChatMessage)
        assert (base.title_text, base.text) == ("base", BASE_REPLY)
        assert adapter.title_text.startswith("adapter") and adapter.text == ADAPTER_REPLY
        assert view.history[-1] == {"role": "assistant", "content": ADAPTER_REPLY}

    run_chat(workspace, scenario)


def test_clear_forgets_the_conversation(workspace: Workspace) -> None:
    async def scenario(app, pilot, view) -> None:
        await ask(pilot, "Hello")
        await wait_for(pilot, lambda: view.active_request is None and view.state == "ready")
        await pilot.press("ctrl+l")
        assert view.history == [] and replies(view) == []

    run_chat(workspace, scenario)


def test_an_engine_failure_is_shown_with_its_title(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(app, pilot, view) -> None:
        await ask(pilot, "Hello")
        await wait_for(pilot, lambda: view.state == "failed")
        await wait_for(pilot, lambda: bool(app._notifications))
        notification = list(app._notifications)[-1]
        assert notification.title == "Model problem"
        assert "has no config.json" in notification.message and "tunedeck demo" in notification.message
        assert view.active_request is None

    run_chat(workspace, scenario, env={"FAKE_CHAT_FAIL": "1"}, monkeypatch=monkeypatch)


def test_picking_a_base_model_restarts_the_engine_on_it(workspace: Workspace) -> None:
    async def scenario(app, pilot, view) -> None:
        await ask(pilot, "Hi")
        await wait_for(pilot, lambda: view.state == "ready" and view.active_request is None)
        first = view.process
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: isinstance(app.screen, PickScreen))
        app.screen.query_one("#pick-list").highlighted = 0  # base model demo
        await pilot.press("enter")
        await wait_for(pilot, lambda: view.source == ChatSource("base", "demo"))
        await wait_for(pilot, lambda: view.process is not None and view.process is not first and view.ready)
        assert first.process.returncode is not None  # the old engine was asked to quit
        await ask(pilot, "Hi again")
        await wait_for(pilot, lambda: view.active_request is None and len(replies(view)) == 2)
        assert replies(view)[-1].text == ADAPTER_REPLY.replace(ADAPTER_REPLY, BASE_REPLY)
        assert view.prefs.get("chat_source") == {"kind": "base", "base": "demo", "path": ""}

    run_chat(workspace, scenario)


def test_settings_are_validated_and_sent_with_requests(workspace: Workspace) -> None:
    async def scenario(app, pilot, view) -> None:
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, ChatSettingsScreen))
        screen = app.screen
        screen.query_one("#set-system", TextArea).text = "Answer in one sentence."
        screen.query_one("#set-temperature", Input).value = "9"
        await pilot.pause(0.1)
        assert screen.query_one("#keep").disabled
        assert "temperature must be between" in str(screen.query_one("#chat-settings-error").render())
        screen.query_one("#set-temperature", Input).value = "0.2"
        await pilot.pause(0.1)
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: not isinstance(app.screen, ChatSettingsScreen))
        assert view.sampling == Sampling(system="Answer in one sentence.", temperature=0.2)
        assert "T 0.2" in screen_text(app)

    run_chat(workspace, scenario)


def test_sampling_parser_names_the_bad_field() -> None:
    assert parse_sampling("", "256", "0.7", "0.9") == (Sampling(), "")
    assert parse_sampling("", "many", "0.7", "0.9")[1].startswith("max new tokens must be a whole number")
    assert parse_sampling("", "256", "0.7", "0")[1] == "top-p must be above 0 and at most 1."


def test_chat_with_run_from_the_train_tab(workspace: Workspace) -> None:
    async def scenario(app, pilot, train) -> None:
        await pilot.press("c")
        await wait_for(pilot, lambda: bool(app.query(ChatView)))
        chat = app.query_one(ChatView)
        await wait_for(pilot, lambda: chat.ready)
        assert chat.source.kind == "run" and chat.source.path.endswith(FINISHED)

    run_in_app(
        engine_for(workspace),
        scenario,
        tab="train",
        ready=lambda train: train.opened is not None,
        quit_after=True,
    )


def test_quitting_ends_the_chat_engine(workspace: Workspace) -> None:
    seen: list = []

    async def scenario(app, pilot, view) -> None:
        await ask(pilot, "Hi")
        await wait_for(pilot, lambda: view.ready)
        seen.append(view.process.process)

    run_chat(workspace, scenario)
    process = seen[0]
    assert process.returncode is not None
    assert subprocess.run(["kill", "-0", str(process.pid)], capture_output=True).returncode != 0


def test_an_engine_that_cannot_start_is_reported_and_the_question_is_not_lost(workspace: Workspace) -> None:
    engine = engine_for(workspace)
    engine.module_commands["engine.chat"] = [str(workspace.root / "no-such-python")]

    async def scenario(app, pilot, view) -> None:
        await ask(pilot, "Hello?")
        await wait_for(pilot, lambda: view.state == "stopped")
        notification = notifications(app)[-1]
        assert notification.title == "Chat engine stopped"
        assert "could not be started" in notification.message
        assert view.active_request is None and view.pending is None
        assert view.history[0] == {"role": "user", "content": "Hello?"}

    run_in_app(engine, scenario, tab="chat")
