"""Turn exceptions from workers into what the user sees: a title and one sentence, with the next step."""

from __future__ import annotations

import dataclasses
import time
import traceback
from pathlib import Path

from engine.errors import EngineError


@dataclasses.dataclass(frozen=True)
class Failure:
    """A failure ready to show: `expected` ones (EngineError) become notifications, others a modal."""

    title: str
    message: str
    next_step: str = ""
    expected: bool = True

    def notification(self) -> str:
        """The notification body: the cause, then the next step on its own line."""
        return f"{self.message}\n→ {self.next_step}" if self.next_step else self.message


def describe(error: BaseException, log_dir: Path | None = None) -> Failure:
    """The Failure for `error`; an unexpected one has its traceback written to `log_dir` and named in the
    message."""
    if isinstance(error, EngineError):
        return Failure(error.title, error.message, error.next_step)
    sentence = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    next_step = "This is a bug in tunedeck; please report it."
    if log_dir is not None:
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            path = log_dir / "tui-errors.log"
            with open(path, "a", encoding="utf-8") as log:
                log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
                log.write("".join(traceback.format_exception(error)))
            next_step = f"This is a bug in tunedeck; the traceback is in {path}."
        except OSError:
            pass
    return Failure("Unexpected error", f"{type(error).__name__}: {sentence}", next_step, expected=False)
