"""The tunedeck Textual app: four tabs over the engine; this module only routes keys, tabs and failures.

Run it with `tunedeck`, `python -m tui` or `python -m tui.app` (the form that
`textual serve "python -m tui.app"` needs).
"""

from __future__ import annotations

import asyncio
import importlib
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from textual import on
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Container
from textual.screen import Screen
from textual.widgets import ContentSwitcher, Footer
from textual.worker import Worker, WorkerState

from engine.workspace import Workspace
from tui.engine_client import EngineClient
from tui.failures import describe
from tui.messages import ActiveRunChanged, ChatStatusChanged, RunLaunched, RunsChanged, WorkerFailed
from tui.prefs import Prefs
from tui.screens.base import TabView
from tui.widgets.status_line import StatusLine
from tui.widgets.tab_bar import TabBar

# Tab id, title (with its key), and the view class, imported on first show so startup stays fast.
TABS: tuple[tuple[str, str, str], ...] = (
    ("dataset", "1 Dataset", "tui.screens.dataset:DatasetView"),
    ("train", "2 Train", "tui.screens.train:TrainView"),
    ("chat", "3 Chat", "tui.screens.chat:ChatView"),
    ("export", "4 Export", "tui.screens.export:ExportView"),
)

GLOBAL_BINDINGS = [
    Binding("1,f1", "show_tab('dataset')", "Dataset tab", show=False),
    Binding("2,f2", "show_tab('train')", "Train tab", show=False),
    Binding("3,f3", "show_tab('chat')", "Chat tab", show=False),
    Binding("4,f4", "show_tab('export')", "Export tab", show=False),
    Binding("question_mark,f10", "help", "Help"),
    Binding("ctrl+p", "command_palette", "Commands", show=False),
    Binding("ctrl+q", "quit", "Quit", priority=True),
]

HELP_TIPS = """Tips
• Training runs and exports are detached: quit the TUI or drop SSH and they go on; reopen tunedeck to see them.
• Keys 1-4 switch tabs (F1-F4 too); inside a text field, use F1-F4 or escape first.
• ctrl+p opens the command palette: every action of every tab, searchable.
• Everything works at 80×24 over SSH, in tmux and screen, keyboard only."""


def _view_class(path: str) -> type[TabView]:
    module_name, class_name = path.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def view_css_path(path: str) -> Path:
    """The stylesheet beside a view's module (tui/screens/<tab>.tcss), loaded on the tab's first show."""
    return Path(__file__).resolve().parent.joinpath(*path.split(":")[0].split(".")[1:]).with_suffix(".tcss")


class TabPage(Container):
    """The container of one tab; its view is mounted on the tab's first show."""


class TunedeckApp(App[None]):
    """Dataset, Train, Chat and Export tabs over one workspace."""

    CSS_PATH = "app.tcss"
    TITLE = "tunedeck"
    BINDINGS = GLOBAL_BINDINGS

    def __init__(self, engine: EngineClient, *, initial_tab: str = "dataset") -> None:
        super().__init__()
        self.engine = engine
        self.prefs = Prefs(engine.state_dir)
        self.initial_tab = initial_tab
        self.active_tab = initial_tab
        self.shell_ready = False
        self.sub_title = str(engine.workspace.root)
        self._view_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._css_loaded: set[Path] = set()

    @property
    def workspace(self) -> Workspace:
        """The open workspace."""
        return self.engine.workspace

    def compose(self) -> ComposeResult:
        # The first frame is this shell alone: the first tab's view (its imports, widgets and stylesheet) is
        # mounted right after it is on screen.
        yield TabBar([(tab_id, title) for tab_id, title, _ in TABS], self.initial_tab, id="tab-bar")
        with ContentSwitcher(initial=self.initial_tab, id="tabs"):
            for tab_id, _, _ in TABS:
                yield TabPage(id=tab_id)
        yield StatusLine(id="status-line")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one(StatusLine).workspace = self.workspace.root
        self.call_after_refresh(self._show_first_tab)

    async def _show_first_tab(self) -> None:
        if not self.query_one(f"#{self.active_tab}", TabPage).is_attached:
            return  # the app is closing before its first tab was built
        await self.view(self.active_tab)
        self.shell_ready = True
        # A tab key pressed during the first frame may have switched tabs already.
        (await self.view(self.active_tab)).focus_default()

    # Tabs

    def load_view_css(self, path: str) -> None:
        """Add a view's own stylesheet to the app's (once), before its first widget is styled."""
        css_path = view_css_path(path)
        if css_path in self._css_loaded or not css_path.is_file():
            return
        self._css_loaded.add(css_path)
        self.stylesheet.add_source(css_path.read_text(encoding="utf-8"), read_from=(str(css_path), ""))

    async def view(self, tab_id: str) -> TabView:
        """The view of `tab_id`, mounted (and composed) on first use."""
        async with self._view_locks[tab_id]:
            pane = self.query_one(f"#{tab_id}", TabPage)
            existing = pane.query_children(TabView)
            if existing:
                return existing.first()
            path = next(path for tab, _, path in TABS if tab == tab_id)
            view_class = _view_class(path)
            self.load_view_css(path)
            view = view_class(id=f"{tab_id}-view")
            await pane.mount(view)
            return view

    async def open_tab(self, tab_id: str) -> TabView:
        """Show a tab and return its mounted view (for actions that continue in another tab)."""
        self.action_show_tab(tab_id)
        return await self.view(tab_id)

    def action_show_tab(self, tab_id: str) -> None:
        """Switch to a tab (keys 1-4, F1-F4)."""
        if self.active_tab == tab_id:
            return
        # A focused widget left in the hidden pane would pull the tab back when focus moves on.
        self.screen.set_focus(None)
        self.active_tab = tab_id
        self.query_one(TabBar).active = tab_id
        self.query_one(ContentSwitcher).current = tab_id
        self.call_later(self._tab_shown, tab_id)

    async def _tab_shown(self, tab_id: str) -> None:
        view = await self.view(tab_id)
        if self.active_tab == tab_id and self.shell_ready:
            view.focus_default()

    @on(TabBar.Clicked)
    def _tab_clicked(self, event: TabBar.Clicked) -> None:
        self.action_show_tab(event.tab_id)

    # Cross-tab messages

    # Messages can still arrive while the app shuts down, so these handlers query rather than query_one.

    @on(ActiveRunChanged)
    def _active_run(self, event: ActiveRunChanged) -> None:
        for status_line in self.query(StatusLine):
            status_line.follow_run_id = event.run_id

    @on(ChatStatusChanged)
    def _chat_status(self, event: ChatStatusChanged) -> None:
        for status_line in self.query(StatusLine):
            status_line.chat = event.text

    def mounted_views(self) -> list[TabView]:
        """The tab views built so far."""
        return list(self.query(TabView))

    @on(RunLaunched)
    def _run_launched(self, event: RunLaunched) -> None:
        for view in self.mounted_views():
            view.post_message(RunsChanged(event.run_id))

    # Failures: every worker's error reaches this one handler

    @on(WorkerFailed)
    def _worker_failed(self, event: WorkerFailed) -> None:
        self.show_failure(event.error)

    @on(Worker.StateChanged)
    def _app_worker_failed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR and event.worker.error is not None:
            self.show_failure(event.worker.error)

    def show_failure(self, error: BaseException) -> None:
        """An EngineError as a notification titled with its title; anything else as a modal naming the log."""
        failure = describe(error, self.engine.state_dir / "logs")
        if failure.expected:
            self.notify(
                failure.notification(), title=failure.title, severity="error", timeout=12, markup=False
            )
        else:
            from tui.screens.modals import ErrorScreen

            self.push_screen(ErrorScreen(failure))

    async def action_quit(self) -> None:
        """Quit; the chat engine is asked to exit, training runs and exports keep going."""
        for view in self.mounted_views():
            await view.shutdown()
        self.exit()

    # Help and the command palette

    def action_help(self) -> None:
        """Show every key, per tab."""
        from tui.screens.modals import HelpScreen

        sections = [("Everywhere", list(GLOBAL_BINDINGS))]
        for _, title, path in TABS:
            sections.append((title.split(" ", 1)[1], list(_view_class(path).BINDINGS)))
        self.push_screen(HelpScreen(sections, HELP_TIPS))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for tab_id, title, _ in TABS:
            name = title.split(" ", 1)[1]
            yield SystemCommand(
                f"Go to {name}", f"Show the {name} tab", lambda t=tab_id: self.action_show_tab(t)
            )
        yield SystemCommand("Help: keys", "Every key binding, per tab", self.action_help)
        active = self.active_tab
        for tab_id, title, _ in TABS:
            pane = self.query_one(f"#{tab_id}", TabPage)
            for view in pane.query_children(TabView):
                prefix = title.split(" ", 1)[1]
                for command in view.commands():
                    yield SystemCommand(
                        f"{prefix}: {command[0]}", command[1], self._in_tab(tab_id, command[2], active)
                    )

    def _in_tab(self, tab_id: str, callback, active: str):
        def run() -> None:
            if tab_id != active:
                self.action_show_tab(tab_id)
            callback()

        return run


def create_app(
    workspace: Path | Workspace | None = None,
    *,
    engine: EngineClient | None = None,
    initial_tab: str = "dataset",
) -> TunedeckApp:
    """The app for a workspace (default: $TUNEDECK_WORKSPACE or the current folder); shared by the CLI and
    tests."""
    if engine is None:
        opened = workspace if isinstance(workspace, Workspace) else Workspace.open(workspace)
        engine = EngineClient(opened)
    return TunedeckApp(engine, initial_tab=initial_tab)


def main() -> None:
    """Open the TUI on the default workspace (the entry point of `python -m tui.app`)."""
    from engine.cli import report_error
    from engine.errors import EngineError

    try:
        app = create_app()
    except EngineError as exc:
        report_error(exc)
        raise SystemExit(2) from None
    app.run()


if __name__ == "__main__":
    main()
