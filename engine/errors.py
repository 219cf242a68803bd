"""One error base for every expected failure, so the CLI and TUI can show a title, a cause and the next step."""

from __future__ import annotations


class EngineError(Exception):
    """An expected failure the user can act on: `message` is one sentence, `next_step` says what to do."""

    default_title = "tunedeck error"

    def __init__(self, message: str, title: str | None = None, next_step: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.title = title or self.default_title
        self.next_step = next_step

    def __str__(self) -> str:
        return f"{self.message} {self.next_step}".strip()


class DatasetError(EngineError):
    """A dataset file cannot be read or has bad rows."""

    default_title = "Dataset problem"


class RecipeError(EngineError):
    """A recipe file or override is invalid."""

    default_title = "Recipe problem"


class ModelError(EngineError):
    """A base model or tokenizer cannot be found or loaded."""

    default_title = "Model problem"


class ResumeError(EngineError):
    """A run cannot be resumed as asked."""

    default_title = "Cannot resume"


class TrainingError(EngineError):
    """Training failed for a reason the user can fix."""

    default_title = "Training failed"


class OutOfMemoryError(EngineError):
    """The accelerator or host ran out of memory."""

    default_title = "Out of memory"


class DiskFullError(EngineError):
    """A write failed because the disk is full."""

    default_title = "Disk full"


class ExportError(EngineError):
    """Merging, converting or quantizing failed."""

    default_title = "Export failed"


class WorkspaceError(EngineError):
    """The workspace folder is missing, not a workspace, or a path escapes it."""

    default_title = "Workspace problem"
