"""Messages that cross tab boundaries; a widget's own messages live on the widget class."""

from __future__ import annotations

from textual.message import Message


class WorkerFailed(Message):
    """A worker of some tab raised; the app's one error handler shows it (EngineError title and cause)."""

    def __init__(self, error: BaseException, worker_name: str = "") -> None:
        super().__init__()
        self.error = error
        self.worker_name = worker_name


class ActiveRunChanged(Message):
    """The Train tab opened another run; the status line follows that one from now on."""

    def __init__(self, run_id: str | None) -> None:
        super().__init__()
        self.run_id = run_id


class RunLaunched(Message):
    """A run was started or resumed; it bubbles to the app, which tells every tab with `RunsChanged`."""

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id


class RunsChanged(Message, bubble=False):
    """Sent by the app to each tab after a launch (Train opens the run, the others refresh their lists)."""

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id


class ChatStatusChanged(Message):
    """The chat engine's state in a few words (loading, ready, generating), for the status line."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
