"""The Chat tab: talk to a base model, a run's newest checkpoint (swapped in as it trains), adapter or GGUF.

The chat engine is a subprocess (`python -m engine.chat`) started on demand; an async worker reads its event
stream and posts messages, and handlers own every widget change.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.widgets import Input, Static

from engine.errors import EngineError
from engine.events import AdapterSwapped, ChatReady, Event, Log, ReplyDone, RunFailed, Token
from engine.workspace import latest_checkpoint
from tui.engine_client import DEMO_MODEL, ChatSource, EngineProcess
from tui.messages import ChatStatusChanged, RunsChanged
from tui.run_state import RunSnapshot
from tui.screens.base import TabView

SLOT_TITLES = {"base": "base", "adapter": "adapter"}


@dataclasses.dataclass
class Sampling:
    """What each generate request carries besides the messages."""

    system: str = ""
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9

    def describe(self) -> str:
        """A compact line for the chat bar."""
        system = " · system prompt set" if self.system else ""
        return f"T {self.temperature:g} · top-p {self.top_p:g} · max {self.max_new_tokens}{system}"


class ChatMessage(Static):
    """One turn: a user question, a reply (streaming until done) or a note from the engine."""

    def __init__(self, role: str, text: str = "", *, title: str = "") -> None:
        super().__init__(classes=f"chat-{role}", markup=False)
        self.role = role
        self.text = text
        self.title_text = title
        self.footer_text = ""
        self.streaming = role == "assistant"

    def on_mount(self) -> None:
        self._redraw()

    def append(self, piece: str) -> None:
        """Add streamed text."""
        self.text += piece
        self._redraw()

    def finish(self, text: str, footer: str) -> None:
        """Show the final reply text and its statistics."""
        self.text = text or self.text
        self.footer_text = footer
        self.streaming = False
        self._redraw()

    def _redraw(self) -> None:
        body = Text()
        if self.title_text:
            body.append(self.title_text + "\n", style="bold dim")
        body.append(self.text)
        if self.streaming:
            body.append("▌", style="blink")
        if self.footer_text:
            body.append("\n" + self.footer_text, style="dim")
        self.update(body)


class ChatView(TabView):
    """A transcript, one input line and a bar naming the model, its state and the sampling settings."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "stop", "Stop reply"),
        Binding("ctrl+o", "pick_source", "Model"),
        Binding("ctrl+s", "settings", "Settings"),
        Binding("ctrl+t", "toggle_compare", "Compare"),
        Binding("ctrl+l", "clear", "Clear"),
    ]

    class EngineEvent(Message):
        """An event from the chat engine's stdout."""

        def __init__(self, event: Event) -> None:
            super().__init__()
            self.event = event

    class EngineExited(Message):
        """The chat engine process ended."""

        def __init__(self, code: int, cause: str, log_path: Path, process: EngineProcess) -> None:
            super().__init__()
            self.code, self.cause, self.log_path, self.process = code, cause, log_path, process

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.source: ChatSource | None = None
        self.process: EngineProcess | None = None
        self.ready = False
        self.state = "not loaded"
        self.compare = False
        self.sampling = Sampling()
        self.history: list[dict[str, str]] = []
        self.pending: dict | None = None
        self.active_request: str | None = None
        self.replies: dict[tuple[str, str], ChatMessage] = {}
        self.adapter_step: int | None = None
        self._request_ids = itertools.count(1)

    def compose(self) -> ComposeResult:
        yield Static(id="chat-bar")
        yield VerticalScroll(id="chat-log")
        yield Input(
            placeholder="Ask something · enter sends · esc stops · ^o model · ^s settings · ^t compare",
            compact=True,
            id="chat-input",
        )

    def on_mount(self) -> None:
        saved = self.prefs.get("chat_sampling")
        if isinstance(saved, dict):
            known = {f.name for f in dataclasses.fields(Sampling)}
            self.sampling = Sampling(**{k: v for k, v in saved.items() if k in known})
        self.compare = bool(self.prefs.get("chat_compare", False))
        self.source = self._saved_source() or self._default_source()
        self._note(
            "Type a question and press enter; the model loads on the first message. "
            "ctrl+o picks a base model, a run (its newest checkpoint, swapped in as it trains), an adapter "
            "or a GGUF file."
        )
        self._update_bar()

    def focus_default(self) -> None:
        self.query_one("#chat-input", Input).focus()

    # Sources

    def _saved_source(self) -> ChatSource | None:
        saved = self.prefs.get("chat_source")
        if isinstance(saved, dict) and {"kind", "base"} <= set(saved):
            source = ChatSource(str(saved["kind"]), str(saved["base"]), str(saved.get("path", "")))
            if source.kind == "base" or Path(source.path).exists():
                return source
        return None

    def _default_source(self) -> ChatSource:
        """The newest run that has a checkpoint, else the demo base model."""
        for run_dir in reversed(self.workspace.list_run_dirs()):
            if latest_checkpoint(run_dir) is not None:
                return ChatSource("run", self.engine.run_base_model(run_dir), str(run_dir))
        return ChatSource("base", DEMO_MODEL)

    def set_source(self, source: ChatSource) -> None:
        """Switch to another model: the engine restarts on it (the transcript stays)."""
        self.source = source
        self.prefs.set(chat_source=dataclasses.asdict(source))
        self._note(f"Model: {source.label()}.")
        if self.process is not None:
            self._finish_streaming("(model changed)")
            self.active_request, self.pending = None, None
            self._start_engine()
        self._update_bar()

    def use_run(self, snap: RunSnapshot) -> None:
        """Chat with a run's newest checkpoint (called from the Train tab)."""
        base = self.engine.run_base_model(snap.run_dir, snap.base_model)
        self.set_source(ChatSource("run", base, str(snap.run_dir)))
        if self.process is None:
            self._start_engine()

    def use_source(self, source: ChatSource) -> None:
        """Chat with `source` now: the engine starts (or restarts) on it (called from the other tabs)."""
        self.set_source(source)
        if self.process is None:
            self._start_engine()

    def use_gguf(self, path: Path) -> None:
        """Chat with an exported GGUF file through llama.cpp (called from the Export tab)."""
        self.use_source(ChatSource("gguf", "", str(path)))

    def action_pick_source(self) -> None:
        """Choose what to chat with."""
        from tui.screens.modals import PickScreen, PromptScreen

        options: list[tuple[str, str]] = []
        for model in self.engine.list_models():
            options.append((f"base model  {model}", f"base|{model}|"))
        for run_dir in reversed(self.workspace.list_run_dirs()):
            newest = latest_checkpoint(run_dir)
            note = (
                f"newest checkpoint {newest.name}"
                if newest
                else "no checkpoint yet: loads the first one saved"
            )
            options.append(
                (f"run  {run_dir.name}  ({note})", f"run|{self.engine.run_base_model(run_dir)}|{run_dir}")
            )
        if self.workspace.exports_dir.is_dir():
            for gguf in sorted(self.workspace.exports_dir.rglob("*.gguf")):
                options.append((f"GGUF  {gguf.relative_to(self.workspace.exports_dir)}", f"gguf||{gguf}"))
        options.append(("adapter folder…  (type its path)", "adapter-prompt||"))
        current = f"{self.source.kind}|{self.source.base}|{self.source.path}" if self.source else ""

        def picked(value: str | None) -> None:
            if not value:
                return
            kind, base, path = value.split("|", 2)
            if kind == "adapter-prompt":
                self.app.push_screen(
                    PromptScreen(
                        "Adapter folder",
                        "A PEFT adapter folder and the base model it was trained on.",
                        placeholder="runs/<id>/checkpoints/step_100",
                        choices=[(m, m) for m in self.engine.list_models()],
                        choice=DEMO_MODEL,
                    ),
                    lambda answer: (
                        answer
                        and self.set_source(
                            ChatSource(
                                "adapter", answer[1], str(self.workspace.root / Path(answer[0]).expanduser())
                            )
                        )
                    ),
                )
                return
            self.set_source(ChatSource(kind, base or ("" if kind == "gguf" else DEMO_MODEL), path))

        self.app.push_screen(PickScreen("Chat with", options, current), picked)

    # Engine process

    def _start_engine(self) -> None:
        if self.source is None:
            return
        self.ready = False
        self._set_state("loading model…")
        self._engine_worker(self.source)

    @work(exclusive=True, group="chat-engine", exit_on_error=False)
    async def _engine_worker(self, source: ChatSource) -> None:
        process = EngineProcess(
            self.engine.chat_argv(source),
            env=self.engine.subprocess_env(),
            cwd=self.workspace.root,
            log_path=self.engine.log_path("chat"),
        )
        self.process = process
        try:
            try:
                await process.start()
            except EngineError as exc:
                cause = f"{exc.message} {exc.next_step}".strip()
                self.post_message(self.EngineExited(-1, cause, process.log_path, process))
                return
            async for event in process.events():
                self.post_message(self.EngineEvent(event))
            code = await process.wait()
            self.post_message(self.EngineExited(code, process.exit_cause(code), process.log_path, process))
        finally:
            await process.close({"op": "quit"})

    async def shutdown(self) -> None:
        """Ask the engine to quit (the app calls this before exiting)."""
        if self.process is not None:
            await self.process.close({"op": "quit"})

    async def _send(self, request: dict) -> None:
        if self.process is None:
            raise EngineError(
                "The chat engine is not running.", title="Chat", next_step="Send a message to load it."
            )
        await self.process.send(request)

    @on(EngineEvent)
    async def _engine_event(self, message: EngineEvent) -> None:
        event = message.event
        if isinstance(event, ChatReady):
            self.ready = True
            adapter = f" + {Path(event.adapter).name}" if event.adapter else ""
            model = Path(event.model).name if event.backend == "gguf" else event.model
            self._note(f"Ready: {model}{adapter} ({event.backend}).")
            self._set_state("ready")
            if self.pending is not None:
                request, self.pending = self.pending, None
                await self._send(request)
                self._set_state("generating…")
        elif isinstance(event, Token):
            widget = self._reply_widget(event.request_id, event.slot)
            if widget is not None:
                widget.append(event.text)
                self._scroll_end()
        elif isinstance(event, ReplyDone):
            self._reply_done(event)
        elif isinstance(event, AdapterSwapped):
            self.adapter_step = event.step
            self._note(f"Adapter swapped to step {event.step} ({Path(event.path).name}).")
            self._update_bar()
        elif isinstance(event, Log) and event.level in ("warning", "error"):
            self._note(event.message)
        elif isinstance(event, RunFailed):
            # The engine may stay up waiting for another load; a fresh process is started on the next message.
            self.ready = False
            self.pending, self.active_request = None, None
            self._finish_streaming("(the model did not load)")
            self.workers.cancel_group(self, "chat-engine")
            self.process = None
            self._set_state("failed")
            self._note(f"{event.title}: {event.cause}" + (f" → {event.next_step}" if event.next_step else ""))
            self.app.show_failure(EngineError(event.cause, title=event.title, next_step=event.next_step))  # type: ignore[attr-defined]

    @on(EngineExited)
    def _engine_exited(self, event: EngineExited) -> None:
        if event.process is not self.process:
            return  # an engine replaced by a model change; its successor is running
        was_failed = self.state == "failed"
        self.process = None
        self.ready = False
        self.active_request, self.pending = None, None
        self._finish_streaming("(engine stopped)")
        if not was_failed and event.code != 0:
            self._note(f"{event.cause} Log: {event.log_path}")
            self.app.show_failure(
                EngineError(  # type: ignore[attr-defined]
                    event.cause,
                    title="Chat engine stopped",
                    next_step=f"See {event.log_path}; send again to restart.",
                )
            )
        self._set_state("stopped" if not was_failed else "failed")

    # Conversation

    @on(Input.Submitted, "#chat-input")
    async def _submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        if self.active_request is not None:
            self.notify("A reply is still streaming; esc stops it.", severity="warning")
            return
        event.input.value = ""
        self.history.append({"role": "user", "content": text})
        await self._mount_message(ChatMessage("user", text))
        request_id = f"r{next(self._request_ids)}"
        # A GGUF holds its adapter merged in, so there is no base to compare it with.
        compare = self.compare and self.source is not None and self.source.kind in ("run", "adapter")
        request = {
            "op": "generate",
            "id": request_id,
            "messages": list(self.history),
            "max_new_tokens": self.sampling.max_new_tokens,
            "temperature": self.sampling.temperature,
            "top_p": self.sampling.top_p,
            "compare": compare,
        }
        if self.sampling.system:
            # Without one, the engine uses the system prompt the run trained with.
            request["system"] = self.sampling.system
        await self._mount_reply_widgets(request_id, compare)
        self.active_request = request_id
        if self.process is None:
            self.pending = request
            self._start_engine()
        elif not self.ready:
            self.pending = request
        else:
            await self._send(request)
            self._set_state("generating…")

    async def _mount_message(self, widget: ChatMessage) -> None:
        await self.query_one("#chat-log", VerticalScroll).mount(widget)
        self._scroll_end()

    async def _mount_reply_widgets(self, request_id: str, compare: bool) -> None:
        log = self.query_one("#chat-log", VerticalScroll)
        if compare:
            base = ChatMessage("assistant", title="base")
            adapter = ChatMessage("assistant", title=self._adapter_title())
            row = Horizontal(base, adapter, classes="chat-compare")
            await log.mount(row)
            self.replies[(request_id, "base")] = base
            self.replies[(request_id, "adapter")] = adapter
        else:
            reply = ChatMessage(
                "assistant",
                title=self._adapter_title() if self.source and self.source.kind != "base" else "base",
            )
            await log.mount(reply)
            self.replies[(request_id, "adapter")] = reply
            # A base-only engine may label its replies "base"; both map to the one widget.
            self.replies[(request_id, "base")] = reply
        self._scroll_end()

    def _finish_streaming(self, footer: str) -> None:
        for widget in self.replies.values():
            if widget.streaming:
                widget.finish("", footer)

    def _adapter_title(self) -> str:
        if self.source is None:
            return "adapter"
        if self.source.kind == "run":
            step = f" @ step {self.adapter_step}" if self.adapter_step is not None else ""
            return f"adapter ({Path(self.source.path).name}{step})"
        if self.source.kind == "gguf":
            return f"GGUF ({Path(self.source.path).name})"
        return {"adapter": "adapter"}.get(self.source.kind, "model")

    def _reply_widget(self, request_id: str, slot: str) -> ChatMessage | None:
        return self.replies.get((request_id, slot)) or self.replies.get((request_id, "adapter"))

    def _reply_done(self, event: ReplyDone) -> None:
        widget = self._reply_widget(event.request_id, event.slot)
        if widget is None:
            return
        reason = {"eos": "end", "length": "length limit", "stopped": "stopped by you"}.get(
            event.stop_reason, event.stop_reason
        )
        widget.finish(event.text, f"{event.tokens} tokens · {event.tokens_per_s:.1f} tok/s · {reason}")
        done_slots = {
            slot for (rid, slot), w in self.replies.items() if rid == event.request_id and not w.streaming
        }
        still_streaming = any(w.streaming for (rid, _), w in self.replies.items() if rid == event.request_id)
        if event.slot == "adapter" or (
            event.slot == "base" and "adapter" not in done_slots and not still_streaming
        ):
            self.history.append({"role": "assistant", "content": widget.text})
        if not still_streaming:
            self.active_request = None
            self._set_state("ready")
        self._scroll_end()

    async def action_stop(self) -> None:
        """Stop the reply being generated."""
        if self.active_request is None:
            return
        if self.pending is not None:
            self.pending = None
            self.active_request = None
            self._finish_streaming("(cancelled before the model loaded)")
            self._set_state("loading model…")
            return
        await self._send({"op": "stop"})
        self._set_state("stopping…")

    def action_clear(self) -> None:
        """Forget the conversation (the model stays loaded)."""
        if self.active_request is not None:
            self.notify("Stop the reply first (esc).", severity="warning")
            return
        self.history.clear()
        self.replies.clear()
        self.query_one("#chat-log", VerticalScroll).remove_children()
        self._note("Conversation cleared.")

    def action_toggle_compare(self) -> None:
        """Show base and adapter replies side by side."""
        self.compare = not self.compare
        self.prefs.set(chat_compare=self.compare)
        if self.compare and self.source is not None and self.source.kind not in ("run", "adapter"):
            self.notify("Compare needs an adapter: pick a run or an adapter with ctrl+o.", severity="warning")
        self._update_bar()

    def action_settings(self) -> None:
        """Edit the system prompt and sampling settings."""
        from tui.screens.chat_settings import ChatSettingsScreen

        def saved(sampling: Sampling | None) -> None:
            if sampling is not None:
                self.sampling = sampling
                self.prefs.set(chat_sampling=dataclasses.asdict(sampling))
                self._update_bar()

        self.app.push_screen(ChatSettingsScreen(self.sampling), saved)

    @on(RunsChanged)
    def _run_launched(self) -> None:
        self._update_bar()

    # Drawing

    def _note(self, text: str) -> None:
        self.query_one("#chat-log", VerticalScroll).mount(ChatMessage("note", text))
        self._scroll_end()

    def _scroll_end(self) -> None:
        self.query_one("#chat-log", VerticalScroll).scroll_end(animate=False)

    def _set_state(self, state: str) -> None:
        self.state = state
        self.post_message(ChatStatusChanged(state))
        self._update_bar()

    def _update_bar(self) -> None:
        text = Text(no_wrap=True, overflow="ellipsis")
        dot = {"ready": "green", "generating…": "cyan", "failed": "red"}.get(self.state, "yellow")
        text.append("● ", style=dot)
        text.append(self.state, style="bold")
        text.append("  ")
        text.append(self.source.label() if self.source else "no model", style="bold")
        if self.adapter_step is not None and self.source is not None and self.source.kind == "run":
            text.append(f" @ step {self.adapter_step}")
        text.append("\n")
        text.append(self.sampling.describe(), style="dim")
        text.append(" · compare ", style="dim")
        if self.compare and self.source is not None and self.source.kind not in ("run", "adapter"):
            text.append("needs an adapter", style="dim")
        else:
            text.append("on" if self.compare else "off", style="bold" if self.compare else "dim")
        self.query_one("#chat-bar", Static).update(text)
