"""The TUI over real engine processes on the tiny model: train from the form, watch events arrive, chat."""

from __future__ import annotations

from pathlib import Path

import pytest
from tuikit import run_in_app, start_run_from_form, wait_for

from engine.launch import stop_run
from engine.workspace import Workspace
from tui.engine_client import EngineClient
from tui.screens.chat import ChatMessage, ChatView

pytestmark = pytest.mark.slow


def test_train_from_the_form_then_chat_through_the_adapter(tiny_workspace: Workspace) -> None:
    recipe = tiny_workspace.root / "recipes" / "tiny.toml"
    # Greedy decoding, so the memorised answer comes back word for word.
    (tiny_workspace.root / ".tunedeck").mkdir(exist_ok=True)
    (tiny_workspace.root / ".tunedeck" / "tui.json").write_text(
        '{"chat_sampling": {"temperature": 0.0, "max_new_tokens": 24}}'
    )
    started: list[Path] = []

    async def scenario(app, pilot, train) -> None:
        await start_run_from_form(app, pilot, recipe, "tiny_qa.jsonl")
        await wait_for(pilot, lambda: train.opened is not None and train.opened.run_id.endswith("tiny"), 30)
        started.append(train.opened.run_dir)
        # Events of the detached trainer reach the tab: steps with loss, then the end.
        await wait_for(pilot, lambda: train.opened.step > 0 and train.opened.loss is not None, 240)
        await wait_for(pilot, lambda: train.opened.status == "finished", 300)
        snap = train.opened
        assert snap.total_steps == snap.step > 0
        assert snap.checkpoints and len(snap.loss_points) > 1
        assert snap.loss_points[-1][1] < snap.loss_points[0][1]

        await pilot.press("c")
        await wait_for(pilot, lambda: bool(app.query(ChatView)))
        chat = app.query_one(ChatView)
        assert chat.source.kind == "run"
        await pilot.press(*"What is the capital of France?", "enter")
        await wait_for(pilot, lambda: chat.history and chat.history[-1]["role"] == "assistant", 240)
        reply = [w for w in chat.query(ChatMessage) if w.role == "assistant"][-1]
        assert "tokens" in reply.footer_text
        assert "Paris" in reply.text, reply.text

    try:
        run_in_app(EngineClient(tiny_workspace), scenario, tab="train", quit_after=True)
    finally:
        for run_dir in started:
            stop_run(run_dir)
