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
