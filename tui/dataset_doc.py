"""An open dataset file with undo/redo and crash-safe autosave, apart from widgets so tests drive it directly.

Every committed change bumps `version`; `save()` writes the newest version atomically (engine.dataset's
save_pairs), so a crash loses at most the row being typed and never leaves a half-written file.
"""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time
from pathlib import Path

from engine.dataset import LineProblem, QAPair, load_dataset, save_pairs
from engine.errors import DatasetError

UNDO_LIMIT = 200


@dataclasses.dataclass(frozen=True)
class Change:
    """One undoable step: the whole list before and after (small, and it keeps undo obviously right)."""

    label: str
    before: tuple[QAPair, ...]
    after: tuple[QAPair, ...]
    focus_row: int


def _file_stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return (stat.st_mtime_ns, stat.st_size)


class DatasetDocument:
    """The pairs of one dataset file, its undo history and what has been saved."""

    def __init__(self, path: Path, pairs: list[QAPair], problems: list[LineProblem] | None = None) -> None:
        self.path = Path(path)
        self.pairs: list[QAPair] = list(pairs)
        self.problems: list[LineProblem] = list(problems or [])
        self.version = 0
        self.saved_version = 0
        self.undo_stack: list[Change] = []
        self.redo_stack: list[Change] = []
        self._save_lock = threading.Lock()
        self._disk_stamp = _file_stamp(self.path)
        self.backup_path: Path | None = None

    @classmethod
    def open(cls, path: Path) -> DatasetDocument:
        """Read `path` leniently: unreadable lines are kept aside as `problems` (and block saving until
        accepted)."""
        path = Path(path)
        if not path.exists():
            save_pairs(path, [])
            return cls(path, [])
        dataset = load_dataset(path)
        problems = [p for p in dataset.problems if not p.is_empty_file]
        return cls(path, dataset.pairs, problems)

    @property
    def dirty(self) -> bool:
        """True when the newest version has not reached the disk yet."""
        return self.version != self.saved_version

    @property
    def name(self) -> str:
        """The file name shown in lists."""
        return self.path.name

    # Editing

    def _commit(self, label: str, after: list[QAPair], focus_row: int) -> int:
        change = Change(label, tuple(self.pairs), tuple(after), focus_row)
        self.pairs = list(after)
        self.undo_stack.append(change)
        del self.undo_stack[:-UNDO_LIMIT]
        self.redo_stack.clear()
        self.version += 1
        return focus_row

    def add(self, pair: QAPair, at: int | None = None) -> int:
        """Insert `pair` at row `at` (default: the end); returns its row."""
        row = len(self.pairs) if at is None else max(0, min(at, len(self.pairs)))
        return self._commit("add", [*self.pairs[:row], pair, *self.pairs[row:]], row)

    def update(self, row: int, pair: QAPair) -> int:
        """Replace row `row`; a no-op edit records nothing."""
        if self.pairs[row] == pair:
            return row
        after = list(self.pairs)
        after[row] = pair
        return self._commit("edit", after, row)

    def delete(self, rows: list[int]) -> int:
        """Delete `rows`; returns the row to focus afterwards."""
        doomed = set(rows)
        after = [pair for index, pair in enumerate(self.pairs) if index not in doomed]
        return self._commit("delete", after, min(min(rows, default=0), max(len(after) - 1, 0)))

    def duplicate(self, row: int) -> int:
        """Insert a copy of `row` below it."""
        copy = dataclasses.replace(self.pairs[row])
        return self._commit("duplicate", [*self.pairs[: row + 1], copy, *self.pairs[row + 1 :]], row + 1)

    def extend(self, pairs: list[QAPair]) -> int:
        """Append imported pairs; returns the first new row."""
        row = len(self.pairs)
        return self._commit(f"import {len(pairs)}", [*self.pairs, *pairs], row)

    def undo(self) -> Change | None:
        """Undo the last change; None when there is nothing to undo."""
        if not self.undo_stack:
            return None
        change = self.undo_stack.pop()
        self.pairs = list(change.before)
        self.redo_stack.append(change)
        self.version += 1
        return change

    def redo(self) -> Change | None:
        """Redo the last undone change."""
        if not self.redo_stack:
            return None
        change = self.redo_stack.pop()
        self.pairs = list(change.after)
        self.undo_stack.append(change)
        self.version += 1
        return change

    # Saving

    def snapshot(self) -> tuple[int, list[QAPair]]:
        """The current version and a copy of its pairs (for a save or lint worker)."""
        return self.version, list(self.pairs)

    def changed_on_disk(self) -> bool:
        """True when another program rewrote the file since we read or saved it."""
        return _file_stamp(self.path) != self._disk_stamp

    def keep_unreadable_lines_aside(self) -> Path:
        """Copy the original file beside itself before the first save drops its unreadable lines; returns the
        copy."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        backup = self.path.with_name(f"{self.path.stem}.unreadable-{stamp}{self.path.suffix}.orig")
        shutil.copy2(self.path, backup)
        self.backup_path = backup
        self.problems = []
        self._disk_stamp = _file_stamp(self.path)
        return backup

    def save(self, version: int, pairs: list[QAPair]) -> bool:
        """Write `pairs` (as of `version`) unless a newer version was written already; True if it wrote.

        Raises DatasetError when the file changed on disk meanwhile or has unreadable lines not set aside,
        so an autosave never destroys work it did not load.
        """
        with self._save_lock:
            if version <= self.saved_version:
                return False
            if self.problems:
                raise DatasetError(
                    f"{self.name} has {len(self.problems)} unreadable line(s), so it was not saved.",
                    next_step="Fix the file by hand, or accept setting them aside when the Dataset tab asks.",
                )
            if self.changed_on_disk():
                raise DatasetError(
                    f"{self.name} was changed by another program, so your edit was not saved over it.",
                    title="Dataset changed on disk",
                    next_step="Press r in the Dataset tab to reload it (your unsaved edit is then lost).",
                )
            save_pairs(self.path, pairs)
            self._disk_stamp = _file_stamp(self.path)
            self.saved_version = version
            return True

    def reload(self) -> None:
        """Re-read the file, dropping history (used after it changed on disk)."""
        fresh = DatasetDocument.open(self.path)
        self.pairs, self.problems = fresh.pairs, fresh.problems
        self.undo_stack.clear()
        self.redo_stack.clear()
        self.version += 1
        self.saved_version = self.version
        self._disk_stamp = fresh._disk_stamp


def new_dataset_path(datasets_dir: Path, name: str) -> Path:
    """A path in datasets/ for a new dataset called `name` (``.jsonl`` added); refuses an existing file."""
    clean = "".join(ch for ch in name.strip() if ch.isalnum() or ch in "-_. ").strip().replace(" ", "-")
    if not clean:
        raise DatasetError("A dataset name needs at least one letter or digit.")
    if not clean.endswith(".jsonl"):
        clean += ".jsonl"
    path = Path(datasets_dir) / clean
    if path.exists():
        raise DatasetError(f"{clean} already exists in {datasets_dir}.", next_step="Choose another name.")
    return path


def one_line(text: str, limit: int = 200) -> str:
    """Text for a single table cell: newlines shown as ⏎, cut at `limit` characters."""
    flat = text.replace("\r\n", "\n").replace("\n", " ⏎ ").replace("\t", " ")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
