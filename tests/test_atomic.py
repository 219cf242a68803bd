"""Atomic writes: the old version survives every failure and nothing half-written looks finished."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from engine import atomic
from engine.errors import DiskFullError, EngineError


def test_write_replaces_the_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "data.jsonl"
    target.write_text("old\n")
    atomic.atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["data.jsonl"]


def test_full_disk_keeps_the_original_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "data.jsonl"
    target.write_bytes(b"original\n")

    def full_disk(_fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(DiskFullError, match="disk filled up"):
        atomic.atomic_write_text(target, "new\n")
    assert target.read_bytes() == b"original\n"
    assert [p.name for p in tmp_path.iterdir()] == ["data.jsonl"]


def test_directory_appears_only_when_complete(tmp_path: Path) -> None:
    final = tmp_path / "step_10"
    with pytest.raises(RuntimeError), atomic.atomic_directory(final) as temp:
        (temp / "weights").write_text("half")
        assert atomic.is_partial(temp)
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic.atomic_directory(final) as temp:
        (temp / "weights").write_text("whole")
    assert (final / "weights").read_text() == "whole"


def test_directory_never_overwrites_an_existing_checkpoint(tmp_path: Path) -> None:
    final = tmp_path / "step_10"
    final.mkdir()
    (final / "weights").write_text("first")
    with pytest.raises(EngineError, match="will not be overwritten"), atomic.atomic_directory(final):
        pass
    assert (final / "weights").read_text() == "first"


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


class SafetensorError(Exception):
    """Stands in for safetensors' own exception type, which carries no errno."""


class ExportErrorLike(Exception):
    """An exception whose text is all that says the disk filled (as llama.cpp's quantizer reports it)."""


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
        RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0"),
    ],
    ids=["enospc", "edquot", "safetensors", "wrapped"],
)
def test_a_full_disk_is_recognised_however_a_library_reports_it(tmp_path: Path, exc: Exception) -> None:
    if isinstance(exc, RuntimeError):
        exc.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert atomic.is_disk_full(exc, tmp_path)


def test_a_bare_write_failure_means_a_full_disk_only_when_the_disk_is_nearly_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    torch_error = RuntimeError(
        "[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
        "data/0: file write failed"
    )
    assert not atomic.is_disk_full(torch_error, tmp_path), "this disk has room"
    assert not atomic.is_disk_full(RuntimeError("shape mismatch"), tmp_path)
    assert not atomic.is_disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path)
    real = shutil.disk_usage

    def nearly_full(path: object) -> object:
        usage = real(path)
        return usage._replace(free=1024)

    monkeypatch.setattr(atomic.shutil, "disk_usage", nearly_full)
    assert atomic.is_disk_full(torch_error, tmp_path)
    assert atomic.is_disk_full(ExportErrorLike("llama.cpp could not quantize: iostream error"), tmp_path)


def test_the_disk_full_error_says_how_much_is_needed_and_what_to_do(tmp_path: Path) -> None:
    error = atomic.disk_full_error("checkpoint step_4", folder=tmp_path, needed_bytes=2_500_000)
    assert error.title == "Disk full"
    assert (
        "checkpoint step_4" in error.message
        and "about 2.5 MB" in error.message
        and "free now" in error.message
    )
    assert "Free some disk space" in error.next_step and "bigger disk" in error.next_step


def test_temp_files_of_killed_writers_are_removed_by_the_next_save_and_load(tmp_path: Path) -> None:
    from engine.dataset import QAPair, load_dataset, save_pairs
    from engine.workspace import Workspace

    workspace = Workspace.init(tmp_path / "ws")
    dataset = workspace.datasets_dir / "qa.jsonl"
    save_pairs(dataset, [QAPair("q?", "a.")])
    dead = dataset.with_name(f".qa.jsonl{atomic.TEMP_MARK}{_dead_pid()}")
    dead.write_text('{"question": "half')
    live = dataset.with_name(f".qa.jsonl{atomic.TEMP_MARK}1")  # pid 1 is always alive
    live.write_text("a save in progress")
    other = dataset.with_name(f".other.jsonl{atomic.TEMP_MARK}{_dead_pid()}")
    other.write_text("another file's temp")
    assert workspace.list_datasets() == [dataset], "a temp file is never listed as a dataset"
    save_pairs(dataset, [QAPair("q?", "a."), QAPair("q2?", "b.")])
    assert not dead.exists() and live.exists() and other.exists()
    dead.write_text("killed again")
    assert [pair.question for pair in load_dataset(dataset).pairs] == ["q?", "q2?"]
    assert not dead.exists() and live.exists()


def _fill(folder: Path, version: str) -> None:
    for index in range(3):
        (folder / f"{version}-{index}.bin").write_text(version * (index + 1))


def _version(folder: Path) -> str | None:
    names = sorted(path.name for path in folder.iterdir())
    for version in ("old", "new"):
        expected = [f"{version}-{index}.bin" for index in range(3)]
        if names == expected and all(
            (folder / name).read_text() == version * (i + 1) for i, name in enumerate(names)
        ):
            return version
    return None


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "aside"])
def test_replacing_a_folder_swaps_in_the_new_version_and_leaves_nothing_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    final = tmp_path / "merged"
    with atomic.atomic_directory(final) as temp:
        _fill(temp, "old")
    if not exchange:
        monkeypatch.setattr(atomic, "exchange_paths", lambda first, second: False)
    with atomic.atomic_directory(final, replace=True) as temp:
        _fill(temp, "new")
    assert _version(final) == "new"
    assert [path.name for path in tmp_path.iterdir()] == ["merged"]


def test_the_system_swaps_two_folders_in_one_step_here(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "from-a").touch()
    assert atomic.exchange_paths(tmp_path / "a", tmp_path / "b"), "renameat2(RENAME_EXCHANGE) is unavailable"
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["from-a"] and not any((tmp_path / "a").iterdir())


def test_a_swap_killed_between_its_renames_is_undone_on_the_next_write(tmp_path: Path) -> None:
    final = tmp_path / "merged"
    aside = tmp_path / f".merged{atomic.ASIDE_MARK}{_dead_pid()}"
    half = tmp_path / f".merged{atomic.TEMP_MARK}{_dead_pid()}"
    aside.mkdir()
    _fill(aside, "old")
    half.mkdir()
    (half / "new-0.bin").write_text("n")
    assert atomic.is_partial(aside) and atomic.is_partial(half)
    restored = atomic.recover_directory(final)
    assert _version(final) == "old", "the complete old version is back under its name"
    assert sorted(restored) == sorted([aside.name, half.name])
    assert [path.name for path in tmp_path.iterdir()] == ["merged"]
    stale = tmp_path / f".merged{atomic.ASIDE_MARK}{_dead_pid()}"
    stale.mkdir()
    with atomic.atomic_directory(final, replace=True) as temp:
        _fill(temp, "new")
    assert _version(final) == "new" and not stale.exists(), "a finished swap's aside folder is removed"


def test_a_failed_second_rename_puts_the_old_folder_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    final = tmp_path / "merged"
    with atomic.atomic_directory(final) as temp:
        _fill(temp, "old")
    monkeypatch.setattr(atomic, "exchange_paths", lambda first, second: False)
    real_replace = os.replace

    def refuse_the_new_folder(source: object, target: object) -> None:
        if atomic.TEMP_MARK in str(source):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(source, target)

    monkeypatch.setattr(atomic.os, "replace", refuse_the_new_folder)
    with pytest.raises(DiskFullError), atomic.atomic_directory(final, replace=True) as temp:
        _fill(temp, "new")
    assert _version(final) == "old"
    assert [path.name for path in tmp_path.iterdir()] == ["merged"]


def test_a_library_error_for_a_full_disk_inside_a_folder_write_becomes_disk_full(tmp_path: Path) -> None:
    final = tmp_path / "merged"
    with pytest.raises(DiskFullError, match="merged"), atomic.atomic_directory(final) as temp:
        (temp / "model.safetensors").write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert list(tmp_path.iterdir()) == []
