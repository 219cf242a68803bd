"""Atomic file and folder writes: a reader sees the old complete version or the new one, never half of either."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.errors import DiskFullError, EngineError

TEMP_MARK = ".partial-"
# The name a replaced folder is moved aside to where the file system cannot swap two folders in one step.
ASIDE_MARK = ".old-"


def temp_sibling(path: Path) -> Path:
    """A hidden name beside `path` that no reader mistakes for a finished file."""
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the folder entry itself is on disk.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a file another writer (a library, a subprocess) wrote, so a rename after it survives a power cut."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def commit_file(temp: Path, final: Path) -> None:
    """Rename a finished temp file onto `final` durably: its bytes are on disk before the name points at it."""
    fsync_file(temp)
    os.replace(temp, final)
    _fsync_dir(Path(final).parent)


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists (and is not a zombie we could see)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


def _leftovers(path: Path, mark: str) -> list[Path]:
    """Hidden siblings `.name<mark><pid>` of `path` whose writing process is gone."""
    prefix = f".{path.name}{mark}"
    found = []
    with contextlib.suppress(OSError):
        for entry in path.parent.iterdir():
            pid = entry.name.removeprefix(prefix)
            if entry.name.startswith(prefix) and pid.isdigit() and not pid_alive(int(pid)):
                found.append(entry)
    return sorted(found)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def remove_stale_temps(path: Path) -> list[str]:
    """Remove the temp files or folders that killed writers of `path` left beside it; returns their names."""
    stale = _leftovers(Path(path), TEMP_MARK)
    for entry in stale:
        _remove(entry)
    return [entry.name for entry in stale]


# Below this much free space, a library's bare "write failed" is taken to mean the disk is full.
NEARLY_FULL_BYTES = 64 * 2**20


def is_disk_full(exc: BaseException, folder: Path) -> bool:
    """ENOSPC or EDQUOT however a library reports it, also when wrapped: an OSError, safetensors' "os error 28",
    or a bare write failure on a disk with almost no room left (torch and llama.cpp carry no errno)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(current)
        if any(sign in text for sign in ("os error 28", "No space left on device", "Disk quota exceeded")):
            return True
        if any(sign in text for sign in ("file write failed", "iostream error", "failed to write")):
            with contextlib.suppress(OSError):
                if shutil.disk_usage(folder).free < NEARLY_FULL_BYTES:
                    return True
        current = current.__cause__
    return False


def tree_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (0 where it cannot be read): what writing it again will need."""
    total = 0
    with contextlib.suppress(OSError):
        for path in Path(folder).rglob("*"):
            with contextlib.suppress(OSError):
                if path.is_file() and not path.is_symlink():
                    total += path.stat().st_size
    return total


def human_size(size: float) -> str:
    """A byte count as people read it (decimal units, as `df -H` prints them)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def disk_full_error(
    what: str, *, folder: Path | None = None, needed_bytes: int | None = None
) -> DiskFullError:
    """The error for a write of `what` that ran out of disk, saying how much it needs where that is known."""
    room = ""
    if needed_bytes:
        room = f" (it needs about {human_size(needed_bytes)}"
        free: int | None = None
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(folder).free if folder is not None else None
        room += f"; {human_size(free)} is free now)" if free is not None else ")"
    return DiskFullError(
        f"The disk filled up while writing {what}{room}; what was saved before is untouched.",
        next_step="Free some disk space (or point the workspace at a bigger disk) and try again; "
        "a stopped run resumes from its last checkpoint.",
    )


def disk_error(exc: OSError, what: str) -> EngineError:
    """Turn an OSError raised while writing `what` into the one-sentence error a user can act on."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return disk_full_error(what)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return EngineError(
            f"tunedeck may not write {what} ({exc.strerror}).",
            title="Permission denied",
            next_step="Check the folder's permissions or choose another workspace.",
        )
    return EngineError(f"Writing {what} failed: {exc.strerror or exc}.", title="Write failed")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a synced temp file and one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    temp = temp_sibling(path)
    try:
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise disk_error(exc, str(path)) from exc
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` as UTF-8 to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


@functools.cache
def _renameat2() -> Any:
    with contextlib.suppress(OSError, AttributeError):
        function = ctypes.CDLL(None, use_errno=True).renameat2
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        function.restype = ctypes.c_int
        return function
    return None


AT_FDCWD = -100
RENAME_EXCHANGE = 2


def exchange_paths(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2); False where the system cannot."""
    function = _renameat2()
    if function is None:
        return False
    if function(AT_FDCWD, os.fsencode(first), AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def recover_directory(final: Path) -> list[str]:
    """Undo what a killed folder swap left: put the old version back if nothing is under `final`, then remove
    dead writers' temp and aside folders; returns the names it restored or removed."""
    final = Path(final)
    done = []
    asides = _leftovers(final, ASIDE_MARK)
    if asides and not final.exists():
        # The aside folder was complete when it was moved; the temp beside it may not have been.
        newest = max(asides, key=lambda entry: entry.stat().st_mtime)
        os.replace(newest, final)
        _fsync_dir(final.parent)
        asides.remove(newest)
        done.append(newest.name)
    for entry in [*asides, *_leftovers(final, TEMP_MARK)]:
        _remove(entry)
        done.append(entry.name)
    return done


def _swap_in(temp: Path, final: Path) -> None:
    """Put the complete folder `temp` under the name `final`, replacing a folder there; a complete version stays
    reachable at every moment (atomically where the system swaps folders, else through a restorable aside)."""
    if exchange_paths(temp, final):
        _fsync_dir(final.parent)
        shutil.rmtree(temp, ignore_errors=True)
        return
    old = final.with_name(f".{final.name}{ASIDE_MARK}{os.getpid()}")
    os.replace(final, old)
    try:
        os.replace(temp, final)
    except OSError:
        os.replace(old, final)
        raise
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(final: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temp folder to fill; on success it is renamed to `final`, on failure removed.

    Without `replace`, an existing `final` is never overwritten (a checkpoint is written once).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(final)
    if final.exists() and not replace:
        raise EngineError(
            f"{final} already exists and will not be overwritten.", title="Refusing to overwrite"
        )
    temp = temp_sibling(final)
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    try:
        yield temp
        _fsync_tree(temp)
        if replace and final.exists():
            _swap_in(temp, final)
        else:
            os.replace(temp, final)
            _fsync_dir(final.parent)
    except Exception as exc:
        # Whether the disk is full is judged before the temp folder's space is given back.
        full = is_disk_full(exc, final.parent)
        shutil.rmtree(temp, ignore_errors=True)
        if isinstance(exc, EngineError):
            raise
        if full:
            raise disk_full_error(str(final)) from exc
        if isinstance(exc, OSError):
            raise disk_error(exc, str(final)) from exc
        raise
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _fsync_tree(folder: Path) -> None:
    # Every file must be on disk before a rename makes the folder look complete.
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            fsync_file(path)
    for path in sorted(path for path in folder.rglob("*") if path.is_dir()):
        _fsync_dir(path)
    _fsync_dir(folder)


def is_partial(path: Path) -> bool:
    """True for temp files and folders (and folders moved aside for a swap) an interrupted write left behind."""
    name = Path(path).name
    return TEMP_MARK in name or (name.startswith(".") and ASIDE_MARK in name)
