"""`tunedeck chat`: a plain terminal chat over the chat engine process, usable over SSH without the TUI."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO, Any

from engine.errors import EngineError, WorkspaceError
from engine.events import AdapterSwapped, ChatReady, Event, Log, ReplyDone, RunFailed, Token, iter_stream
from engine.workspace import MARKER_FILE, Workspace

HELP = "chat with a base model, an adapter or a GGUF file in the terminal"

REPL_HELP = """commands:
  /compare        toggle answering with the base model too (adapter switched off)
  /system TEXT    set the system prompt (/system alone clears it)
  /temp X         set the sampling temperature (0 = greedy)
  /reset          forget the conversation
  /quit           leave (Ctrl-D works too; Ctrl-C stops a reply being written)"""

# Slot names of the engine protocol: "adapter" is the model as loaded and always ends a request.
LAST_SLOT = "adapter"


class ChatClientError(EngineError):
    """The chat engine process could not be started or stopped answering."""

    default_title = "Chat failed"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """What to chat with (a run, an adapter or a GGUF file, plus a base) and how to sample."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--run", metavar="RUN", help="a run id or folder: chat with its newest checkpoint")
    source.add_argument("--adapter", metavar="DIR", help="a LoRA adapter folder")
    source.add_argument("--gguf", metavar="FILE", help="a GGUF file, served by llama.cpp")
    parser.add_argument("--base", metavar="BASE", help="base model: a folder, a hub id or demo")
    parser.add_argument("--compare", action="store_true", help="also answer with the base model, adapter off")
    parser.add_argument("--system", default=None, metavar="TEXT", help="system prompt (default: the run's)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def _workspace(args: argparse.Namespace) -> Workspace | None:
    """The workspace named by --workspace / $TUNEDECK_WORKSPACE / the current folder, if there is one."""
    root = getattr(args, "workspace", None)
    try:
        return Workspace.open(root, create=False)
    except WorkspaceError:
        if root is not None:
            raise
        return None


def engine_command(args: argparse.Namespace, workspace: Workspace | None) -> list[str]:
    """The `python -m engine.chat` command line for these options."""
    # -P keeps the current folder off sys.path, so a stray torch.py or h2.py there cannot shadow a library.
    command = [sys.executable, "-P", "-m", "engine.chat", "--device", args.device]
    if workspace is not None:
        command += ["--workspace", str(workspace.root)]
    run = args.run
    if not (args.run or args.adapter or args.gguf or args.base):
        runs = workspace.list_run_dirs() if workspace is not None else []
        if not runs:
            raise ChatClientError(
                "There is nothing to chat with: no run in this workspace and no model was named.",
                next_step="Pass --run RUN, --adapter DIR, --gguf FILE or --base BASE (e.g. --base demo).",
            )
        run = str(runs[-1])
    if run:
        command += ["--run", run]
    if args.adapter:
        command += ["--adapter", args.adapter]
    if args.gguf:
        command += ["--gguf", args.gguf]
    if args.base:
        command += ["--base", args.base]
    return command


class EngineProcess:
    """A running chat engine: requests go to its stdin; its events arrive on a queue fed by a thread."""

    def __init__(self, command: list[str]) -> None:
        self.log_file = tempfile.NamedTemporaryFile(  # noqa: SIM115 - kept open for the process's lifetime
            "w", prefix="tunedeck-chat-", suffix=".log", delete=False
        )
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log_file,
            text=True,
            encoding="utf-8",
            bufsize=1,
            env=env,
            # Its own session: Ctrl-C reaches only this REPL, which turns it into a stop request.
            start_new_session=True,
        )
        self.events: queue.Queue[Event | None] = queue.Queue()
        threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for event in iter_stream(stream):
            self.events.put(event)
        self.events.put(None)

    def send(self, request: dict[str, Any]) -> None:
        """Write one request line; a dead engine is reported when its events run out."""
        try:
            self.process.stdin.write(json.dumps(request, ensure_ascii=False) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass

    def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event; None once the engine has exited. Raises queue.Empty after `timeout` seconds."""
        event = self.events.get(timeout=timeout)
        if event is None:
            self.events.put(None)
        return event

    def died(self) -> ChatClientError:
        """An error describing an engine that exited early."""
        code = self.process.wait()
        return ChatClientError(
            f"The chat engine exited unexpectedly (exit code {code}).",
            next_step=f"See its log: {self.log_file.name}",
        )

    def close(self, *, keep_log: bool) -> None:
        """Ask the engine to quit and wait for it (killing it if it does not go); drop its log unless kept."""
        self.send({"op": "quit"})
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log_file.close()
        if not keep_log:
            Path(self.log_file.name).unlink(missing_ok=True)


def _say(text: str) -> None:
    print(text, flush=True)


def _notice(event: Event) -> None:
    """Print an event that is not part of a reply."""
    if isinstance(event, AdapterSwapped):
        _say(f"[now chatting with checkpoint step {event.step}: {event.path}]")
    elif isinstance(event, Log) and event.level in ("warning", "error"):
        _say(f"[{event.level}] {event.message}")


def wait_until_ready(engine: EngineProcess) -> ChatReady:
    """Wait for the engine to load its model; raise with the engine's cause when it cannot."""
    while True:
        event = engine.next_event()
        if event is None:
            raise engine.died()
        if isinstance(event, ChatReady):
            return event
        if isinstance(event, RunFailed):
            log_note = f" (engine log: {engine.log_file.name})"
            raise ChatClientError(event.cause, title=event.title, next_step=event.next_step + log_note)
        if isinstance(event, Log):
            _say(f"[{event.message}]" if event.level == "info" else f"[{event.level}] {event.message}")


def stream_reply(engine: EngineProcess, request_id: str, *, compare: bool = False) -> dict[str, ReplyDone]:
    """Print a reply as it streams; Ctrl-C asks the engine to stop. Returns the reply_done of each slot."""
    done: dict[str, ReplyDone] = {}
    slot_shown = ""
    while True:
        try:
            event = engine.next_event(timeout=0.2)
        except queue.Empty:
            continue
        except KeyboardInterrupt:
            engine.send({"op": "stop"})
            continue
        if event is None:
            raise engine.died()
        if isinstance(event, Token) and event.request_id == request_id:
            if event.slot != slot_shown:
                if slot_shown:
                    print()
                print(f"{event.slot if compare else 'model'}> ", end="")
                slot_shown = event.slot
            print(event.text, end="", flush=True)
        elif isinstance(event, ReplyDone) and event.request_id == request_id:
            done[event.slot] = event
            if slot_shown == event.slot or not slot_shown:
                print()
            if event.stop_reason == "stopped":
                _say("[stopped]")
            elif event.stop_reason == "length":
                _say("[cut at the token limit]")
            slot_shown = ""
            if event.slot == LAST_SLOT:
                return done
        else:
            _notice(event)


def repl(engine: EngineProcess, args: argparse.Namespace, lines: IO[str]) -> None:
    """Read the user's lines and send each as a generate request with the conversation so far."""
    history: list[dict[str, str]] = []
    system = args.system
    compare = args.compare
    temperature = args.temperature
    interactive = lines.isatty()
    counter = 0
    while True:
        with contextlib.suppress(queue.Empty):
            _notice_pending(engine)
        try:
            line = input("you> ") if interactive else lines.readline()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not interactive and line == "":
            return
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, rest = text.partition(" ")
            if command in ("/quit", "/exit"):
                return
            if command == "/reset":
                history.clear()
                _say("[conversation cleared]")
            elif command == "/compare":
                compare = not compare
                _say(f"[compare {'on' if compare else 'off'}]")
            elif command == "/system":
                system = rest.strip()
                _say(f"[system prompt {'set' if system else 'cleared'}]")
            elif command == "/temp":
                try:
                    temperature = max(0.0, float(rest))
                    _say(f"[temperature {temperature}]")
                except ValueError:
                    _say("[usage: /temp 0.7]")
            else:
                _say(REPL_HELP)
            continue
        counter += 1
        request_id = f"cli{counter}"
        history.append({"role": "user", "content": text})
        request: dict[str, Any] = {
            "op": "generate",
            "id": request_id,
            "messages": history,
            "max_new_tokens": args.max_new_tokens,
            "temperature": temperature,
            "top_p": args.top_p,
            "compare": compare,
        }
        if system is not None:
            request["system"] = system
        engine.send(request)
        done = stream_reply(engine, request_id, compare=compare)
        reply = done.get(LAST_SLOT)
        if reply is None or reply.stop_reason == "error":
            history.pop()
        else:
            history.append({"role": "assistant", "content": reply.text})


def _notice_pending(engine: EngineProcess) -> None:
    """Print notices (checkpoint switches, warnings) that arrived while the user was typing."""
    while True:
        event = engine.next_event(timeout=0)
        if event is None:
            raise engine.died()
        _notice(event)


def run(args: argparse.Namespace) -> int:
    """Start the engine, wait for the model, then chat until /quit or end of input."""
    workspace = _workspace(args)
    if args.run and workspace is not None and not Path(args.run).is_dir():
        args.run = str(workspace.run_dir(args.run))
    elif args.run and not Path(args.run).is_dir():
        raise ChatClientError(
            f"There is no run folder {args.run} and no workspace to look it up in.",
            next_step=f"Pass a run folder, or --workspace DIR (a folder with {MARKER_FILE}).",
        )
    engine = EngineProcess(engine_command(args, workspace))
    failed = True
    try:
        ready = wait_until_ready(engine)
        adapter = f" + {ready.adapter}" if ready.adapter else ""
        _say(f"[chatting with {ready.model}{adapter} ({ready.backend}); /help lists commands]")
        repl(engine, args, sys.stdin)
        failed = False
    finally:
        engine.close(keep_log=failed)
    return 0
