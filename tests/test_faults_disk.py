"""Disk full, for real: datasets, checkpoints and exports written to a small tmpfs until it has no room left.

A write that hits ENOSPC must end in a clear failure (DiskFullError, or run_failed whose cause says the disk is
full and whose next step says what to free), must leave every earlier file complete, and must be recoverable:
once there is room, the save, the resume or the export succeeds. Mounting needs root (or CAP_SYS_ADMIN); where it
is refused, these tests skip and say so.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.register_assert_rewrite("crashkit")

from crashkit.harness import Zygote, checkpoint_problems, export_problems, tree_digest  # noqa: E402
from crashkit.plugin import Trials, family  # noqa: E402

from engine.dataset import QAPair, dumps_pairs, save_pairs  # noqa: E402
from engine.errors import DiskFullError  # noqa: E402
from engine.events import Event, Progress, RunFailed, RunFinished, parse_event, read_events  # noqa: E402
from engine.launch import prepare_run  # noqa: E402
from engine.workspace import Workspace, checkpoint_dirs, latest_checkpoint  # noqa: E402

pytest_plugins = ["crashkit.plugin", "crashkit.fixtures"]


def _mount(point: Path, size: str) -> None:
    point.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root; disk-full tests run where the CI user may mount")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(point)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"mounting a tmpfs was refused here ({result.stderr.strip()}); disk-full tests need it")


def _unmount(point: Path) -> None:
    subprocess.run(["umount", "-l", str(point)], capture_output=True)


def _resize(point: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(point)], check=True, capture_output=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """mount(size) → a fresh tmpfs of that size (e.g. '256k'), unmounted after the test."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        point = tmp_path / f"tmpfs-{len(mounted)}"
        _mount(point, size)
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        _unmount(point)


def _fill(folder: Path) -> None:
    """Write filler until the disk holding `folder` is full."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def _says_disk_full(title: str, cause: str, next_step: str) -> bool:
    """The failure names the full disk, how much room the write needs, and that freeing space is the fix."""
    return title == "Disk full" and "needs about" in cause and "free" in next_step.lower()


@family("disk-full")
def test_dataset_save_on_a_full_disk_fails_clearly_and_keeps_the_old_file(
    tmpfs: Callable[[str], Path], trials: Trials
) -> None:
    folder = tmpfs("256k")
    dataset = folder / "qa.jsonl"
    old = [QAPair(f"question {i}?", f"answer {i}. " * 5) for i in range(200)]
    save_pairs(dataset, old)
    old_bytes = dataset.read_bytes()
    _fill(folder)
    bigger = old + [QAPair(f"new question {i}?", "a longer answer " * 20) for i in range(200)]
    with pytest.raises(DiskFullError) as caught:
        save_pairs(dataset, bigger)
    assert "disk" in caught.value.message and "Free some disk space" in caught.value.next_step
    assert dataset.read_bytes() == old_bytes
    assert sorted(path.name for path in folder.iterdir()) == ["filler", "qa.jsonl"], "no temp file is left"
    (folder / "filler").unlink()
    save_pairs(dataset, bigger)
    assert dataset.read_bytes() == dumps_pairs(bigger).encode()
    trials.case()


@dataclasses.dataclass
class FullRun:
    """A training run whose checkpoints filled its disk."""

    mount: Path
    run_dir: Path
    failed: RunFailed
    digests: dict[str, str]
    problems: list[str]


# Room for the workspace and about three checkpoints of the tiny run (each is ~0.5 MB).
CHECKPOINT_TMPFS = "1600k"
ROOMY = "32m"


@pytest.fixture(scope="module")
def full_run(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_qa_path: Path, ml_zygote: Zygote
) -> Iterator[FullRun]:
    from conftest import TINY_RECIPE

    mount = tmp_path_factory.mktemp("disk") / "tmpfs"
    _mount(mount, CHECKPOINT_TMPFS)
    try:
        workspace = Workspace.init(mount / "workspace")
        shutil.copyfile(tiny_qa_path, workspace.datasets_dir / "tiny_qa.jsonl")
        (workspace.root / "recipes").mkdir()
        recipe = workspace.root / "recipes" / "tiny.toml"
        recipe.write_text(TINY_RECIPE.format(model=tiny_model_dir))
        run_dir = prepare_run(workspace, recipe, ["train.save_steps=1", "train.max_steps=20"])
        result = ml_zygote.trial("engine.train:main", ["--run-dir", str(run_dir)])
        assert result.code == 1, "the run must fail: the disk is too small for all its checkpoints"
        events = read_events(run_dir / "events.jsonl")
        assert isinstance(events[-1], RunFailed), events[-3:]
        problems = [p for path in checkpoint_dirs(run_dir) for p in checkpoint_problems(path)]
        digests = {path.name: tree_digest(path) for path in checkpoint_dirs(run_dir)}
        yield FullRun(mount, run_dir, events[-1], digests, problems)
    finally:
        _unmount(mount)


@family("disk-full")
def test_checkpoint_on_a_full_disk_keeps_earlier_checkpoints_and_resumes_once_there_is_room(
    full_run: FullRun, ml_zygote: Zygote, trials: Trials
) -> None:
    run_dir = full_run.run_dir
    assert len(full_run.digests) >= 2, "the disk held some checkpoints before it filled up"
    assert full_run.problems == [], "every checkpoint that has a final name is complete"
    assert full_run.failed.next_step and full_run.failed.details_path
    names = sorted(int(name.removeprefix("step_")) for name in full_run.digests)
    assert names == list(range(1, len(names) + 1))
    _resize(full_run.mount, ROOMY)
    resumed = ml_zygote.trial("engine.train:main", ["--run-dir", str(run_dir), "--resume"])
    assert resumed.code == 0
    events = read_events(run_dir / "events.jsonl")
    assert isinstance(events[-1], RunFinished) and events[-1].step == 20
    assert {
        name: tree_digest(run_dir / "checkpoints" / name) for name in full_run.digests
    } == full_run.digests
    assert latest_checkpoint(run_dir).name == "step_20"
    trials.note(
        f"{len(full_run.digests)} checkpoints before the disk filled; reported as {full_run.failed.title}: "
        f"{full_run.failed.cause}"
    )
    trials.case()


@family("disk-full")
def test_checkpoint_on_a_full_disk_says_the_disk_is_full(full_run: FullRun, trials: Trials) -> None:
    failed = full_run.failed
    assert _says_disk_full(failed.title, failed.cause, failed.next_step), failed


@dataclasses.dataclass
class FullExport:
    """An export that ran out of disk at some stage."""

    stage: str
    failed: RunFailed | None
    problems: list[str]


def _export(ml_zygote: Zygote, run_dir: Path, out: Path, log: Path, **env: str) -> tuple[int, list[Event]]:
    argv = ["--run-dir", str(run_dir), "--out", str(out), "--no-parity", "--quant", "q4_0,q8_0"]
    log.unlink(missing_ok=True)
    result = ml_zygote.trial("engine.export:main", argv, env=env, stdout=log)
    events = [parse_event(line) for line in log.read_text().splitlines()]
    return result.code, [event for event in events if event is not None]


def _used(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


@pytest.fixture(scope="module")
def full_exports(
    tiny_run_dir: Path, tmp_path_factory: pytest.TempPathFactory, ml_zygote: Zygote
) -> Iterator[list[FullExport]]:
    """Exports of the tiny run into tmpfs folders that fill up in merge, convert and quantize (sizes are fractions
    of what a complete export took), each then given room and exported again."""
    base = tmp_path_factory.mktemp("disk-export")
    log = base / "events.out"
    points: list[Path] = []
    try:
        points.append(base / "roomy")
        _mount(points[-1], ROOMY)
        code, _ = _export(ml_zygote, tiny_run_dir, points[-1] / "export", log)
        assert code == 0
        total = _used(points[-1] / "export")
        found = []
        for fraction in (0.2, 0.48, 0.76):
            points.append(base / f"small-{fraction}")
            _mount(points[-1], f"{int(total * fraction) // 4096 * 4}k")
            out = points[-1] / "export"
            # Pre-flight would refuse a disk this small; the disk filling during the export is what is tested.
            code, events = _export(ml_zygote, tiny_run_dir, out, log, TUNEDECK_FREE_DISK_BYTES=str(10**12))
            stages = [event.stage for event in events if isinstance(event, Progress)]
            failed = events[-1] if events and isinstance(events[-1], RunFailed) else None
            found.append(
                FullExport(
                    stages[-1] if stages else "", failed, export_problems(out) if code else ["it finished"]
                )
            )
            _resize(points[-1], ROOMY)
            again, _ = _export(ml_zygote, tiny_run_dir, out, log)
            assert again == 0 and (out / "report.json").is_file(), "with room again, the export finishes"
            assert export_problems(out) == []
        yield found
    finally:
        for point in reversed(points):
            _unmount(point)


@family("disk-full")
@pytest.mark.slow
def test_export_on_a_full_disk_fails_with_run_failed_and_nothing_broken_under_a_final_name(
    full_exports: list[FullExport], trials: Trials
) -> None:
    assert [(e.stage, e.problems) for e in full_exports if e.problems] == []
    assert all(e.failed is not None and e.failed.next_step for e in full_exports), full_exports
    assert {"merge", "convert"} <= {e.stage for e in full_exports}, [e.stage for e in full_exports]
    for export in full_exports:
        trials.note(f"disk full in {export.stage}: {export.failed.title}: {export.failed.cause}")
    trials.case(len(full_exports))


@family("disk-full")
@pytest.mark.slow
def test_export_on_a_full_disk_says_the_disk_is_full(full_exports: list[FullExport], trials: Trials) -> None:
    trials.case(len(full_exports))
    wrong = [
        (e.stage, e.failed)
        for e in full_exports
        if not _says_disk_full(e.failed.title, e.failed.cause, e.failed.next_step)
    ]
    assert wrong == []
