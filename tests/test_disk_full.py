"""A full disk, injected where each writer meets it: the trainer's checkpoint save, its failure mapping, the
quantizer and the export's stages all end in DiskFullError (cause and next step) with nothing half-written kept.

tests/test_faults_disk.py fills a real tmpfs for the same paths end to end; these inject the error each library
raises, so they run everywhere in a second.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from engine.errors import DiskFullError, TrainingError
from engine.events import EventWriter, read_events
from engine.train import StopSignal, TrainingJob, checkpoint_path, failure_of
from engine.workspace import CHECKPOINTS_DIR


class SafetensorError(Exception):
    """Stands in for safetensors' exception type: its text is all that names the full disk."""


class FailingSave:
    """The Trainer's save, writing part of checkpoint-<n>/ into the staging folder before the disk fills."""

    def __init__(self, output_dir: Path, step: int, error: BaseException) -> None:
        self.output_dir = str(output_dir)
        self.step = step
        self.error = error

    def __call__(self) -> None:
        folder = Path(self.output_dir) / f"checkpoint-{self.step}"
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"\0" * 1000)
        raise self.error


def _job(run_dir: Path) -> TrainingJob:
    (run_dir / CHECKPOINTS_DIR).mkdir(parents=True)
    return TrainingJob(run_dir, EventWriter(None, run_dir / "events.jsonl"), StopSignal(), resume=False)


@pytest.mark.parametrize(
    "error",
    [
        SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
    ],
    ids=["safetensors", "enospc", "quota"],
)
def test_a_checkpoint_save_on_a_full_disk_says_so_and_keeps_the_earlier_checkpoint(
    tmp_path: Path, error: BaseException
) -> None:
    run_dir = tmp_path / "run"
    job = _job(run_dir)
    earlier = checkpoint_path(run_dir, 1)
    earlier.mkdir()
    (earlier / "adapter_model.safetensors").write_bytes(b"w" * 250_000)
    staging = run_dir / CHECKPOINTS_DIR / ".staging.partial-1"
    with pytest.raises(DiskFullError) as caught:
        job.save_checkpoint(FailingSave(staging, 2, error), 2)
    assert "checkpoint step_2" in caught.value.message and "about 250.0 KB" in caught.value.message
    assert "Free some disk space" in caught.value.next_step
    assert not checkpoint_path(run_dir, 2).exists() and not (staging / "checkpoint-2").exists()
    assert (earlier / "adapter_model.safetensors").read_bytes() == b"w" * 250_000
    assert read_events(run_dir / "events.jsonl") == [], "no checkpoint_saved event for a failed save"


def test_a_checkpoint_save_that_fails_otherwise_is_not_called_a_full_disk(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    job = _job(run_dir)
    staging = run_dir / CHECKPOINTS_DIR / ".staging.partial-1"
    with pytest.raises(ValueError, match="bad tensor"):
        job.save_checkpoint(FailingSave(staging, 1, ValueError("bad tensor")), 1)
    assert not (staging / "checkpoint-1").exists()


def test_the_trainer_reports_a_wrapped_full_disk_as_disk_full(tmp_path: Path) -> None:
    wrapped = RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4096 vs 0")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    error = failure_of(wrapped, tmp_path / "train.log")
    assert isinstance(error, DiskFullError) and "Free some disk space" in error.next_step
    other = failure_of(RuntimeError("shape mismatch"), tmp_path / "train.log")
    assert isinstance(other, TrainingError) and "unexpected RuntimeError" in other.message


def test_the_quantizer_reports_llama_cpp_running_out_of_disk_and_keeps_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    import shutil

    from engine import atomic, quantize

    source = tmp_path / "model-f16.gguf"
    source.write_bytes(b"\0" * 100_000)
    target = tmp_path / "model-q4_0.gguf"

    def quantize_until_the_disk_fills(src: bytes, dst: bytes, params: Any) -> int:
        Path(os.fsdecode(dst)).write_bytes(b"half a file")
        quantize._on_llama_log(
            4, b"llama_model_quantize: failed to quantize: basic_ios::clear: iostream error\n", None
        )
        return 1

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", quantize_until_the_disk_fills)
    real_usage = shutil.disk_usage
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: real_usage(path)._replace(free=4096))
    with pytest.raises(DiskFullError) as caught:
        quantize.quantize_gguf(source, target, "q4_0")
    assert "model-q4_0.gguf" in caught.value.message and "about 28.1 KB" in caught.value.message
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model-f16.gguf"]


def test_the_quantizer_does_not_blame_the_disk_when_it_has_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    from engine import quantize
    from engine.errors import ExportError

    source = tmp_path / "model-f16.gguf"
    source.write_bytes(b"\0" * 1000)

    def fail(src: bytes, dst: bytes, params: Any) -> int:
        quantize._on_llama_log(4, b"llama_model_quantize: failed to quantize: iostream error\n", None)
        return 1

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", fail)
    with pytest.raises(ExportError) as caught:
        quantize.quantize_gguf(source, tmp_path / "model-q4_0.gguf", "q4_0")
    assert not isinstance(caught.value, DiskFullError)


def test_a_quantized_gguf_is_on_disk_before_its_name_is_and_the_name_is_synced_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    from engine import atomic, quantize

    source = tmp_path / "model-f16.gguf"
    source.write_bytes(b"\0" * 1000)
    target = tmp_path / "model-q8_0.gguf"
    calls: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def quantize_whole(src: bytes, dst: bytes, params: Any) -> int:
        Path(os.fsdecode(dst)).write_bytes(b"GGUF and the rest")
        return 0

    def fsync(fd: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(source_path: Any, target_path: Any) -> None:
        calls.append(("rename", f"{Path(source_path).name} -> {Path(target_path).name}"))
        real_replace(source_path, target_path)

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", quantize_whole)
    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    quantize.quantize_gguf(source, target, "q8_0")
    temp = atomic.temp_sibling(target)
    assert calls == [
        ("fsync", str(temp)),
        ("rename", f"{temp.name} -> {target.name}"),
        ("fsync", str(tmp_path)),
    ]
    assert target.read_bytes() == b"GGUF and the rest"


@pytest.mark.parametrize("stage", ["merge", "convert", "quantize:q4_0"])
def test_an_export_stage_that_fills_the_disk_ends_as_disk_full_with_the_room_needed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    import types

    from engine import export
    from engine.events import Progress

    plan = types.SimpleNamespace(export_dir=tmp_path / "export", disk_needed=3_200_000_000)

    def fill_the_disk(plan: Any, options: Any, writer: Any, clock: export.StageClock, started: float) -> None:
        with clock.stage(stage):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(export, "preflight", lambda options, **kwargs: plan)
    monkeypatch.setattr(export, "_export_stages", fill_the_disk)
    writer = EventWriter(None, tmp_path / "events.jsonl")
    with pytest.raises(DiskFullError) as caught:
        export.run_export(export.ExportOptions(run_dir=tmp_path / "run"), writer)
    error = caught.value
    assert f"during the {stage} stage" in error.message and "about 3.2 GB" in error.message
    assert "Free some disk space" in error.next_step and "--out" in error.next_step
    assert [event.stage for event in read_events(tmp_path / "events.jsonl") if isinstance(event, Progress)][
        -1
    ] == stage
    assert not (plan.export_dir / export.PID_FILE).exists()


def test_an_export_stage_that_fails_otherwise_is_not_called_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import types

    from engine import export

    plan = types.SimpleNamespace(export_dir=tmp_path / "export", disk_needed=1)

    def fail(plan: Any, options: Any, writer: Any, clock: export.StageClock, started: float) -> None:
        raise ValueError("tensor shapes differ")

    monkeypatch.setattr(export, "preflight", lambda options, **kwargs: plan)
    monkeypatch.setattr(export, "_export_stages", fail)
    with pytest.raises(ValueError, match="tensor shapes differ"):
        export.run_export(export.ExportOptions(run_dir=tmp_path / "run"))


def test_an_event_the_events_file_cannot_take_still_reaches_the_stream(tmp_path: Path) -> None:
    import io

    from engine.events import RunFailed, parse_event

    stream = io.StringIO()
    writer = EventWriter(stream, Path("/dev/full"))  # every write to it fails with ENOSPC
    failed = RunFailed(title="Disk full", cause="The disk filled up.", next_step="Free some disk space.")
    with pytest.raises(OSError) as caught:
        writer.emit(failed)
    assert caught.value.errno == errno.ENOSPC
    assert parse_event(stream.getvalue()) == failed


def test_the_exports_last_event_reaches_stdout_when_the_disk_cannot_take_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import io

    from engine import export
    from engine.events import RunFailed, parse_event

    stream = io.StringIO()
    failed = RunFailed(title="Disk full", cause="The disk filled up.", next_step="Free some disk space.")
    with caplog.at_level("ERROR", logger=export.log.name):
        export._finish(EventWriter(stream, Path("/dev/full")), failed)
    assert [parse_event(line) for line in stream.getvalue().splitlines()] == [failed]
    assert "reached stdout but not /dev/full" in caplog.text


def test_a_trainer_that_starts_on_a_full_disk_ends_as_one_run_failed_event(tmp_path: Path) -> None:
    import subprocess
    import sys

    from engine.events import RunFailed, parse_event

    # The pid file is the trainer's first write: make it meet a full disk and read the event stream it leaves.
    script = (
        "import errno, sys\n"
        "import engine.train as train\n"
        "def full(*args, **kwargs):\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "train.atomic_write_text = full\n"
        "sys.exit(train.main(['--run-dir', sys.argv[1]]))\n"
    )
    repo = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
        timeout=120,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    events = [parse_event(line) for line in result.stdout.splitlines() if line.strip()]
    assert len(events) == 1 and isinstance(events[0], RunFailed), result.stdout
    assert events[0].title == "Disk full" and "Free some disk space" in events[0].next_step
    assert "Traceback" not in result.stdout
