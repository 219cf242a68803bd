"""The base of the four tab views: access to the engine client and one route for every worker failure."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from textual import on
from textual.binding import Binding
from textual.containers import Container
from textual.worker import Worker, WorkerState

from tui.messages import WorkerFailed

if TYPE_CHECKING:
    from engine.workspace import Workspace
    from tui.engine_client import EngineClient
    from tui.prefs import Prefs


class TabView(Container):
    """A tab's content; failed workers go to the app, which shows the EngineError title and cause."""

    @property
    def engine(self) -> EngineClient:
        """The app's engine client."""
        return self.app.engine  # type: ignore[attr-defined]

    @property
    def workspace(self) -> Workspace:
        """The open workspace."""
        return self.engine.workspace

    @property
    def prefs(self) -> Prefs:
        """The workspace's TUI preferences."""
        return self.app.prefs  # type: ignore[attr-defined]

    @on(Worker.StateChanged)
    def _forward_worker_failure(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR and event.worker.error is not None:
            self.post_message(WorkerFailed(event.worker.error, event.worker.name))

    def commands(self) -> list[tuple[str, str, Callable[[], object]]]:
        """This tab's actions for the command palette: every described binding, runnable from anywhere."""
        found = []
        for binding in self.BINDINGS:
            if isinstance(binding, Binding) and binding.description:
                found.append((binding.description, f"key {binding.key}", self._action_runner(binding.action)))
        return found

    def _action_runner(self, action: str) -> Callable[[], object]:
        return lambda: self.run_action(action)

    async def shutdown(self) -> None:
        """Stop this tab's engine subprocesses before the app exits (training runs are detached and go on)."""

    def focus_default(self) -> None:
        """Put the focus where this tab's work starts (overridden per tab)."""
        self.focus()
