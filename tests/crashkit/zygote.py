"""A warm child process that forks one trial process per command, so each SIGKILL costs a fork, not a torch import.

Run as `python tests/crashkit/zygote.py MODULE…`: it imports the modules, prints {"ready": true}, then reads one JSON
command per stdin line and answers one JSON line per command. A command names a `target` ("module:function") and
its `args`; the forked trial process runs it in its own process group and is killed with SIGKILL either by itself,
just before its `kill_at_event`-th file-system write under `watch` (counted by an audit hook, so the kill lands
between two writes of the code under test), or by this process `kill_after_s` seconds after the trial's first
write under `watch` (so it can land inside a write done by native code, which raises no audit event). With
`arm_on`, both count from the first write touching a path that matches that regex instead.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
# Audit events that change the file system (the first argument is the path; renames also name the target).
CHANGE_EVENTS = frozenset(
    {
        "os.rename",
        "os.remove",
        "os.mkdir",
        "os.rmdir",
        "os.truncate",
        "os.link",
        "os.symlink",
        "shutil.rmtree",
        "shutil.move",
        "shutil.copyfile",
        "shutil.copytree",
    }
)


def _path_of(value: Any) -> str | None:
    if isinstance(value, (str, bytes, os.PathLike)):
        with contextlib.suppress(TypeError, ValueError):
            return os.path.abspath(os.fsdecode(value))
    return None


def touched_paths(event: str, args: tuple[Any, ...]) -> list[str]:
    """The paths a write-like audit event touches; empty for reads and unrelated events."""
    if event == "open":
        path, mode, flags = (*tuple(args), None, None, 0)[:3]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & WRITE_FLAGS
        )
        found = _path_of(path) if writing else None
        return [found] if found else []
    if event in CHANGE_EVENTS:
        found = [_path_of(arg) for arg in args[:2]]
        return [path for path in found if path]
    return []


def install_kill_hook(
    watch: str, kill_at: int | None, counter: list[int], first_write_fd: int, arm_on: str | None = None
) -> None:
    """Count writes under `watch` in `counter[0]`, tell `first_write_fd` about the first one, and SIGKILL this
    process group just before write number `kill_at`. With `arm_on` (a regex), counting starts only after a write
    that touches a matching path, e.g. the rename that commits the attempt's first checkpoint."""
    prefix = os.path.abspath(watch)
    trigger = re.compile(arm_on) if arm_on else None
    armed = [trigger is None]

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event != "open" and event not in CHANGE_EVENTS:
            return
        paths = touched_paths(event, args)
        if not any(path == prefix or path.startswith(prefix + os.sep) for path in paths):
            return
        if not armed[0]:
            armed[0] = trigger is not None and any(trigger.fullmatch(path) for path in paths)
            return
        counter[0] += 1
        if counter[0] == 1:
            with contextlib.suppress(OSError):
                os.write(first_write_fd, b"1")
        if kill_at is not None and counter[0] >= kill_at:
            os.killpg(0, signal.SIGKILL)

    sys.addaudithook(hook)


def _resolve(target: str) -> Any:
    module_name, _, function = target.partition(":")
    return getattr(importlib.import_module(module_name), function)


def _redirect(fd: int, path: str | None, flags: int) -> None:
    opened = os.open(path or os.devnull, flags, 0o644)
    os.dup2(opened, fd)
    os.close(opened)


def _trial_process(command: dict[str, Any], first_write_fd: int) -> None:
    """The forked trial: new process group, redirected output, the kill hook, then the target. Never returns."""
    code = 97
    try:
        os.setpgid(0, 0)
        _redirect(0, None, os.O_RDONLY)
        _redirect(1, command.get("stdout"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        _redirect(2, command.get("stderr"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.environ.update(command.get("env", {}))
        for name in command.get("unset", []):
            os.environ.pop(name, None)
        if command.get("cwd"):
            os.chdir(command["cwd"])
        counter = [0]
        if command.get("watch"):
            install_kill_hook(
                command["watch"], command.get("kill_at_event"), counter, first_write_fd, command.get("arm_on")
            )
        result = _resolve(command["target"])(*command.get("args", []))
        code = result if isinstance(result, int) else 0
        if command.get("count_file"):
            # Written with os-level calls outside the watched folder, so it is not counted itself.
            fd = os.open(command["count_file"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, str(counter[0]).encode())
            os.close(fd)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 98
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def run_trial(command: dict[str, Any]) -> dict[str, Any]:
    """Fork the trial, kill it `kill_after_s` after its first watched write if asked, reap it and its group."""
    started = time.monotonic()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _trial_process(command, write_fd)
    os.close(write_fd)
    os.set_blocking(read_fd, False)
    kill_after = command.get("kill_after_s")
    deadline = started + float(command.get("timeout_s", 600))
    first_write: float | None = None
    killed_by_timer = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        now = time.monotonic()
        if first_write is None:
            with contextlib.suppress(BlockingIOError):
                if os.read(read_fd, 1):
                    first_write = now
        due = kill_after is not None and first_write is not None and now - first_write >= kill_after
        if due and not killed_by_timer:
            killed_by_timer = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        if now > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        time.sleep(0.002)
    os.close(read_fd)
    # Helpers the trial started (a converter) die with it, as they would with a killed job.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    signalled = os.WIFSIGNALED(status)
    return {
        "pid": pid,
        "killed": signalled and os.WTERMSIG(status) == signal.SIGKILL,
        "code": None if signalled else os.WEXITSTATUS(status),
        "seconds": round(time.monotonic() - started, 3),
        "timer": killed_by_timer,
        "first_write_s": None if first_write is None else round(first_write - started, 3),
    }


def main() -> None:
    """Import the modules named on the command line, then serve trial commands until stdin closes."""
    sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]
    for name in sys.argv[1:]:
        module = importlib.import_module(name)
        if name == "torch":
            # One thread: a forked child must not inherit a half-used OpenMP pool, and trials stay deterministic.
            module.set_num_threads(1)
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(run_trial(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
