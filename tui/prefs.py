"""Per-workspace TUI preferences (last dataset, tokenizer, chat settings): reopening lands where you left."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from engine.atomic import atomic_write_text
from engine.errors import EngineError

PREFS_FILE = "tui.json"


class Prefs:
    """A JSON dict in the workspace's .tunedeck folder; an unreadable file is ignored, writes are atomic."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / PREFS_FILE
        self.data: dict[str, Any] = {}
        try:
            loaded = json.loads(self.path.read_text(encoding="utf-8"))
            if isinstance(loaded, dict):
                self.data = loaded
        except (OSError, ValueError):
            self.data = {}

    def get(self, key: str, default: Any = None) -> Any:
        """The stored value of `key`, or `default`."""
        return self.data.get(key, default)

    def set(self, **values: Any) -> None:
        """Store values and write the file; a failed write keeps the old file and is not fatal to the UI."""
        if all(self.data.get(key) == value for key, value in values.items()):
            return
        self.data.update(values)
        # Preferences are a convenience; a read-only workspace must still be usable.
        with contextlib.suppress(EngineError):
            atomic_write_text(self.path, json.dumps(self.data, indent=2, ensure_ascii=False) + "\n")
