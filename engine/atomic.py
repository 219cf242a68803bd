"""Atomic file and folder writes: a reader sees the old complete version or the new one, never half of either."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from engine.errors import DiskFullError, EngineError

TEMP_MARK = ".partial-"


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


# Below this much free space, a library's bare "write failed" is taken to mean the disk is full.
NEARLY_FULL_BYTES = 64 * 2**20


def is_disk_full(exc: BaseException, folder: Path) -> bool:
    """ENOSPC however a library reports it: an OSError, safetensors' "os error 28", or a bare write failure on a
    disk with almost no room left (torch and llama.cpp carry no errno)."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    text = str(exc)
    if "os error 28" in text or "No space left on device" in text:
        return True
    if "file write failed" in text or "iostream error" in text or "failed to write" in text:
        with contextlib.suppress(OSError):
            return shutil.disk_usage(folder).free < NEARLY_FULL_BYTES
    return False


def disk_error(exc: OSError, what: str) -> EngineError:
    """Turn an OSError raised while writing `what` into the one-sentence error a user can act on."""
    if exc.errno == errno.ENOSPC:
        return DiskFullError(
            f"The disk filled up while writing {what}; the previous version is untouched.",
            next_step="Free some disk space (or point the workspace at a bigger disk) and try again; "
            "a stopped run resumes from its last checkpoint.",
        )
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


@contextlib.contextmanager
def atomic_directory(final: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temp folder to fill; on success it is renamed to `final`, on failure removed.

    Without `replace`, an existing `final` is never overwritten (a checkpoint is written once).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not replace:
        raise EngineError(
            f"{final} already exists and will not be overwritten.", title="Refusing to overwrite"
        )
    temp = temp_sibling(final)
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    try:
        yield temp
        if replace and final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(temp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temp, final)
        _fsync_dir(final.parent)
    except OSError as exc:
        shutil.rmtree(temp, ignore_errors=True)
        raise disk_error(exc, str(final)) from exc
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def is_partial(path: Path) -> bool:
    """True for temp files and folders that an interrupted write left behind."""
    return TEMP_MARK in Path(path).name
