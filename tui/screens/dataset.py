"""The Dataset tab: the workspace's datasets, one open in a table with token counts and lints, edited there.

Every committed change is autosaved atomically off the UI thread; lints and token counts (engine.template's
PromptRenderer for the chosen model folder, else an estimate) are computed by a worker after each change.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import DataTable, Input, OptionList, Static
from textual.widgets.option_list import Option

from engine.dataset import FORMATS, Lint, QAPair, estimate_tokens, export_pairs, import_file, lint_pairs
from engine.errors import DatasetError, EngineError
from tui.dataset_doc import DatasetDocument, new_dataset_path, one_line
from tui.screens.base import TabView

DEFAULT_MAX_TOKENS = 512
LINT_MARKS = {"empty_question": "E", "empty_answer": "E", "duplicate_question": "D", "too_long": "L"}
LINT_STYLES = {"E": "bold red", "D": "bold yellow", "L": "bold magenta"}
EXPORT_SUFFIX = {"jsonl": ".jsonl", "alpaca": ".json", "sharegpt": ".json", "openai": ".jsonl", "csv": ".csv"}
NEW_DATASET = "+new"


def masked_prompt_text(tokens: list[tuple[str, bool]]) -> Text:
    """Rendered training text: prompt tokens dim, trained tokens on alternating backgrounds so each is
    visible."""
    text = Text()
    trained_index = 0
    for token_text, trained in tokens:
        if trained:
            style = "bold black on green" if trained_index % 2 == 0 else "bold black on dark_sea_green"
            trained_index += 1
        else:
            style = "dim"
        # A newline inside a highlighted token would paint to the end of the line; show it as ⏎ then break.
        shown = token_text.replace("\n", "⏎\n") if trained else token_text
        text.append(shown, style=style)
    return text


class DatasetView(TabView):
    """Datasets on the left; the open one as a table, its selected row's lints and rendered prompt below."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("a", "add", "Add"),
        Binding("e,enter", "edit", "Edit"),
        Binding("d,delete", "delete", "Delete"),
        Binding("c", "duplicate", "Duplicate", show=False),
        Binding("ctrl+z,u", "undo", "Undo"),
        Binding("ctrl+y", "redo", "Redo", show=False),
        Binding("slash", "filter", "Filter"),
        Binding("i", "import", "Import", show=False),
        Binding("x", "export", "Export data", show=False),
        Binding("n", "new_dataset", "New dataset", show=False),
        Binding("m", "pick_model", "Tokenizer model", show=False),
        Binding("t", "max_tokens", "Max tokens", show=False),
        Binding("p", "toggle_preview", "Prompt pane", show=False),
        Binding("r", "reload", "Reload file", show=False),
    ]

    class Loaded(Message):
        """A dataset file was read (off the UI thread)."""

        def __init__(self, document: DatasetDocument) -> None:
            super().__init__()
            self.document = document

    class LintsReady(Message):
        """Token counts and lints of one version of the open dataset."""

        def __init__(
            self, path: Path, version: int, counts: list[int], lints: list[Lint], exact: bool
        ) -> None:
            super().__init__()
            self.path, self.version, self.counts, self.lints, self.exact = path, version, counts, lints, exact

    class PreviewReady(Message):
        """The rendered training prompt of one row."""

        def __init__(self, key: tuple[str, str, str], text: Text) -> None:
            super().__init__()
            self.key, self.text = key, text

    class Saved(Message):
        """A version reached the disk."""

        def __init__(self, path: Path, version: int) -> None:
            super().__init__()
            self.path, self.version = path, version

    class Imported(Message):
        """Pairs read from an import file, ready to append."""

        def __init__(self, pairs: list[QAPair], source: Path) -> None:
            super().__init__()
            self.pairs, self.source = pairs, source

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.document: DatasetDocument | None = None
        self.visible_rows: list[int] = []
        self.counts: list[int] = []
        self.counts_exact = False
        self.lints_by_row: dict[int, list[Lint]] = defaultdict(list)
        self.lint_version = -1
        self.filter_text = ""
        self.save_error = ""
        self._token_cache: dict[tuple[str, str, str, str], int] = {}

    def compose(self) -> ComposeResult:
        with Horizontal():
            with Vertical(id="ds-side"):
                yield Static("Datasets", id="ds-side-title")
                yield OptionList(id="ds-list")
                yield Static(id="ds-tokenizer")
            with Vertical(id="ds-main"):
                yield Input(
                    placeholder="filter: type to narrow rows, esc clears", compact=True, id="ds-filter"
                )
                table: DataTable[Text | str] = DataTable(cursor_type="row", id="ds-table")
                yield table
                yield Static(id="ds-summary")
                with VerticalScroll(id="ds-preview"):
                    yield Static(id="ds-lints")
                    yield Static(id="ds-prompt")

    def on_mount(self) -> None:
        table = self.query_one("#ds-table", DataTable)
        table.add_column("#", key="row", width=3)
        table.add_column("question", key="question", width=20)
        table.add_column("answer", key="answer", width=20)
        table.add_column("tok", key="tokens", width=4)
        table.add_column("!", key="lint", width=2)
        self.query_one("#ds-filter").display = False
        self._update_tokenizer_label()
        # The file is read by a worker; starting it after the first frame keeps startup quick.
        self.call_after_refresh(self._refresh_dataset_list, self.prefs.get("dataset"))

    def on_resize(self) -> None:
        self._size_columns()

    def _size_columns(self) -> None:
        table = self.query_one("#ds-table", DataTable)
        width = table.size.width or self.size.width - 24
        # Fixed columns (#, tok, !) plus two cells of padding per column and the scrollbar.
        flexible = max(20, width - 3 - 4 - 2 - 10 - 2)
        columns = table.columns
        question, answer = flexible // 2, flexible - flexible // 2
        for key, size in (("question", question), ("answer", answer)):
            column = columns.get(key)  # type: ignore[call-overload]
            if column is not None and column.width != size:
                column.width = size
                column.auto_width = False
        table.refresh()

    def focus_default(self) -> None:
        self.query_one("#ds-table", DataTable).focus()

    # Dataset list

    def _refresh_dataset_list(self, select: str | None = None) -> None:
        options = self.query_one("#ds-list", OptionList)
        datasets = self.workspace.list_datasets()
        options.clear_options()
        options.add_options([Option(path.name, id=path.name) for path in datasets])
        options.add_option(Option(Text("+ new dataset (n)", style="dim"), id=NEW_DATASET))
        names = [path.name for path in datasets]
        chosen = select if select in names else (names[0] if names else None)
        if chosen is not None:
            options.highlighted = names.index(chosen)
            if self.document is None or self.document.name != chosen:
                self._load(self.workspace.datasets_dir / chosen)
        else:
            self._show_empty()

    def _show_empty(self) -> None:
        self.query_one("#ds-summary", Static).update(
            "[dim]No datasets yet: press n to create one or i to import alpaca / ShareGPT / OpenAI / CSV.[/]"
        )

    @on(OptionList.OptionSelected, "#ds-list")
    def _dataset_chosen(self, event: OptionList.OptionSelected) -> None:
        if event.option.id == NEW_DATASET:
            self.action_new_dataset()
        elif event.option.id and (self.document is None or event.option.id != self.document.name):
            self._load(self.workspace.datasets_dir / event.option.id)
            self.query_one("#ds-table").focus()

    @work(thread=True, exclusive=True, group="dataset-load", exit_on_error=False)
    def _load(self, path: Path) -> None:
        self.post_message(self.Loaded(DatasetDocument.open(path)))

    @on(Loaded)
    def _loaded(self, event: Loaded) -> None:
        self.document = event.document
        self.prefs.set(dataset=event.document.name)
        self.counts, self.lints_by_row, self.lint_version = [], defaultdict(list), -1
        self.save_error = ""
        self._rebuild_table(focus_row=0)
        # Token counts and lints (and the tokenizer they may import) start once the rows are on screen.
        self.call_after_refresh(self._relint)
        if event.document.problems:
            first = event.document.problems[0]
            self.notify(
                f"{len(event.document.problems)} line(s) cannot be read; first: {first}. "
                "Editing will ask before setting them aside.",
                title="Unreadable lines",
                severity="warning",
                timeout=10,
                markup=False,
            )

    # Table

    def _matches(self, pair: QAPair) -> bool:
        needle = self.filter_text.casefold()
        return (
            not needle
            or needle in pair.question.casefold()
            or needle in pair.answer.casefold()
            or needle in pair.system.casefold()
        )

    def _row_cells(self, row: int) -> list[Text | str]:
        pair = self.document.pairs[row] if self.document is not None else QAPair("", "")
        count = self.counts[row] if row < len(self.counts) else None
        marks = "".join(dict.fromkeys(LINT_MARKS[lint.kind] for lint in self.lints_by_row.get(row, [])))
        lint_text = Text(marks[:2], style=LINT_STYLES.get(marks[:1], ""))
        tokens = Text("" if count is None else f"{count}", style="" if self.counts_exact else "dim")
        return [
            Text(str(row + 1), style="dim"),
            one_line(pair.question),
            one_line(pair.answer),
            tokens,
            lint_text,
        ]

    def _rebuild_table(self, focus_row: int | None = None) -> None:
        """Redraw every row (after an insert, delete, undo or filter change)."""
        table = self.query_one("#ds-table", DataTable)
        if self.document is None:
            table.clear()
            return
        current = focus_row if focus_row is not None else self.current_row()
        self.visible_rows = [row for row, pair in enumerate(self.document.pairs) if self._matches(pair)]
        table.clear()
        table.add_rows([self._row_cells(row) for row in self.visible_rows])
        self._size_columns()
        if current is not None and self.visible_rows:
            nearest = min(range(len(self.visible_rows)), key=lambda i: abs(self.visible_rows[i] - current))
            table.move_cursor(row=nearest, animate=False)
        self._update_summary()
        self._update_detail()

    def _refresh_row(self, row: int) -> None:
        """Redraw one row in place (after an edit or new lints)."""
        if row not in self.visible_rows:
            return
        table = self.query_one("#ds-table", DataTable)
        index = self.visible_rows.index(row)
        for column, value in zip(
            ("row", "question", "answer", "tokens", "lint"), self._row_cells(row), strict=True
        ):
            table.update_cell_at((index, list(table.columns).index(column)), value)

    def current_row(self) -> int | None:
        """The dataset row under the cursor, or None for an empty table."""
        table = self.query_one("#ds-table", DataTable)
        if not self.visible_rows or table.cursor_row < 0 or table.cursor_row >= len(self.visible_rows):
            return None
        return self.visible_rows[table.cursor_row]

    @on(DataTable.RowHighlighted, "#ds-table")
    def _row_highlighted(self) -> None:
        self._update_detail()

    @on(DataTable.RowSelected, "#ds-table")
    def _row_selected(self) -> None:
        self.action_edit()

    def _update_summary(self) -> None:
        doc = self.document
        if doc is None:
            return
        lint_rows = sum(1 for lints in self.lints_by_row.values() if lints)
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(doc.name, style="bold")
        shown = f"{len(self.visible_rows)}/{len(doc.pairs)}" if self.filter_text else f"{len(doc.pairs)}"
        text.append(f" · {shown} pairs")
        if lint_rows:
            text.append(f" · {lint_rows} with lints", style="yellow")
        if doc.problems:
            text.append(f" · {len(doc.problems)} unreadable lines", style="bold red")
        if self.save_error:
            text.append(" · NOT SAVED", style="bold red")
        elif doc.dirty:
            text.append(" · saving…", style="dim")
        else:
            text.append(" · saved ✓", style="green")
        if doc.undo_stack:
            text.append(f" · u undoes {doc.undo_stack[-1].label}", style="dim")
        self.query_one("#ds-summary", Static).update(text)

    def _update_detail(self) -> None:
        row = self.current_row()
        lints_widget = self.query_one("#ds-lints", Static)
        if self.document is None or row is None:
            lints_widget.update("")
            self.query_one("#ds-prompt", Static).update("")
            return
        lints = self.lints_by_row.get(row, [])
        text = Text()
        for lint in lints:
            text.append(f"line {lint.line}: {lint.message}", style=LINT_STYLES.get(LINT_MARKS[lint.kind], ""))
            text.append(f" — {lint.fix}\n", style="dim")
        lints_widget.update(text)
        lints_widget.display = bool(lints)
        self._render_preview(self.document.pairs[row])

    # Lints and token counts (off the UI thread)

    @property
    def max_tokens(self) -> int:
        """The token limit lints check (the recipe's data.max_length)."""
        return int(self.prefs.get("max_tokens", DEFAULT_MAX_TOKENS))

    @property
    def tokenizer_model(self) -> str:
        """The base model whose tokenizer counts tokens (`demo` by default)."""
        return str(self.prefs.get("tokenizer_model", "demo"))

    def _relint(self) -> None:
        if self.document is None:
            return
        version, pairs = self.document.snapshot()
        self._lint_worker(self.document.path, version, pairs, self.tokenizer_model, self.max_tokens)

    @work(thread=True, exclusive=True, group="dataset-lint", exit_on_error=False)
    def _lint_worker(
        self, path: Path, version: int, pairs: list[QAPair], model: str, max_tokens: int
    ) -> None:
        model_dir = self.engine.model_dir(model)
        renderer = self.engine.renderer(model_dir) if model_dir is not None else None
        cache_tag = str(model_dir or "")
        counts = []
        for pair in pairs:
            key = (cache_tag, pair.system, pair.question, pair.answer)
            count = self._token_cache.get(key)
            if count is None:
                count = renderer.count(pair) if renderer is not None else estimate_tokens(pair)
                self._token_cache[key] = count
            counts.append(count)
        by_pair = dict(zip(((p.system, p.question, p.answer) for p in pairs), counts, strict=True))
        lints = lint_pairs(
            pairs,
            max_tokens=max_tokens,
            count_tokens=(lambda pair: by_pair[(pair.system, pair.question, pair.answer)])
            if renderer
            else None,
        )
        self.post_message(self.LintsReady(path, version, counts, lints, renderer is not None))

    @on(LintsReady)
    def _lints_ready(self, event: LintsReady) -> None:
        doc = self.document
        if doc is None or event.path != doc.path or event.version != doc.version:
            return
        self.counts, self.counts_exact, self.lint_version = event.counts, event.exact, event.version
        self.lints_by_row = defaultdict(list)
        for lint in event.lints:
            self.lints_by_row[lint.row].append(lint)
        table = self.query_one("#ds-table", DataTable)
        if table.row_count != len(self.visible_rows):
            self._rebuild_table()
        else:
            for row in self.visible_rows:
                self._refresh_row(row)
        self._update_summary()
        self._update_detail()

    def _update_tokenizer_label(self) -> None:
        model = self.tokenizer_model
        exact = self.engine.model_dir(model) is not None
        how = "" if exact else " (estimate)"
        self.query_one("#ds-tokenizer", Static).update(
            f"[dim]tokens:[/] {model}{how}\n[dim]max:[/] {self.max_tokens}  [dim]m/t change[/]"
        )

    # Rendered training prompt

    def _render_preview(self, pair: QAPair) -> None:
        if not self.query_one("#ds-preview").display:
            return
        # After the next frame: the worker imports the template engine, which would hold up the rows' frame.
        self.call_after_refresh(self._preview_worker, pair, self.tokenizer_model)

    @work(thread=True, exclusive=True, group="dataset-preview", exit_on_error=False)
    def _preview_worker(self, pair: QAPair, model: str) -> None:
        model_dir = self.engine.model_dir(model)
        if model_dir is not None:
            tokens = [(t.text, t.trained) for t in self.engine.renderer(model_dir).trained_mask(pair)]
            header = Text(f"training prompt for {model}: trained tokens highlighted\n", style="italic dim")
        else:
            from engine.template import DEFAULT_CHAT_TEMPLATE, split_training_text

            prompt, completion = split_training_text(DEFAULT_CHAT_TEMPLATE, pair, eos_token="<|im_end|>")
            tokens = [(prompt, False), (completion, True)]
            header = Text(
                "training prompt (ChatML; pick a model folder with m for its template and tokens): "
                "trained text highlighted\n",
                style="italic dim",
            )
        self.post_message(
            self.PreviewReady((pair.system, pair.question, pair.answer), header + masked_prompt_text(tokens))
        )

    @on(PreviewReady)
    def _preview_ready(self, event: PreviewReady) -> None:
        row = self.current_row()
        if self.document is None or row is None:
            return
        pair = self.document.pairs[row]
        if (pair.system, pair.question, pair.answer) == event.key:
            self.query_one("#ds-prompt", Static).update(event.text)

    # Editing

    def _editable(self, then) -> bool:
        """True when edits may proceed; a file with unreadable lines asks first, then runs `then`."""
        doc = self.document
        if doc is None:
            self.notify("Open or create a dataset first (n creates one).", severity="warning")
            return False
        if not doc.problems:
            return True
        from tui.screens.modals import ConfirmScreen

        def answered(yes: bool | None) -> None:
            if yes and self.document is doc:
                backup = doc.keep_unreadable_lines_aside()
                self.notify(
                    f"The original file was copied to {backup.name}.", title="Unreadable lines set aside"
                )
                self._update_summary()
                then()

        self.app.push_screen(
            ConfirmScreen(
                "Unreadable lines",
                f"{doc.name} has {len(doc.problems)} line(s) tunedeck cannot read "
                f"(first: {doc.problems[0]}). "
                "Saving keeps only the readable pairs; the original file is copied beside it first.",
                "Copy and edit",
            ),
            answered,
        )
        return False

    def _committed(self, focus_row: int, *, structural: bool) -> None:
        """After a change: redraw, autosave, relint."""
        if structural:
            self._rebuild_table(focus_row=focus_row)
        else:
            self._refresh_row(focus_row)
            self._update_summary()
            self._update_detail()
        self._save()
        self._relint()

    def _other_questions(self, skip_row: int | None) -> set[str]:
        from engine.dataset import normalise_question

        if self.document is None:
            return set()
        return {normalise_question(p.question) for i, p in enumerate(self.document.pairs) if i != skip_row}

    def action_add(self) -> None:
        """Add a pair below the cursor."""
        if not self._editable(self.action_add):
            return
        from tui.screens.edit_pair import EditPairScreen

        row = self.current_row()
        at = (row + 1) if row is not None else None

        def done(pair: QAPair | None) -> None:
            if pair is not None and self.document is not None:
                self._committed(self.document.add(pair, at), structural=True)

        self.app.push_screen(
            EditPairScreen(
                QAPair("", ""),
                title="New pair",
                other_questions=self._other_questions(None),
                max_tokens=self.max_tokens,
            ),
            done,
        )

    def action_edit(self) -> None:
        """Edit the pair under the cursor."""
        row = self.current_row()
        if row is None:
            self.action_add()
            return
        if not self._editable(self.action_edit):
            return
        from tui.screens.edit_pair import EditPairScreen

        doc = self.document
        if doc is None:
            return

        def done(pair: QAPair | None) -> None:
            if pair is not None and self.document is doc and row < len(doc.pairs):
                version = doc.version
                doc.update(row, pair)
                if doc.version != version:
                    self._committed(row, structural=not self._matches(pair))

        self.app.push_screen(
            EditPairScreen(
                doc.pairs[row],
                title=f"Edit pair {row + 1}",
                other_questions=self._other_questions(row),
                max_tokens=self.max_tokens,
            ),
            done,
        )

    def action_delete(self) -> None:
        """Delete the pair under the cursor (u brings it back)."""
        row = self.current_row()
        if row is None or self.document is None or not self._editable(self.action_delete):
            return
        self._committed(self.document.delete([row]), structural=True)
        self.notify("Pair deleted; u undoes.", timeout=3)

    def action_duplicate(self) -> None:
        """Copy the pair under the cursor below it."""
        row = self.current_row()
        if row is None or self.document is None or not self._editable(self.action_duplicate):
            return
        self._committed(self.document.duplicate(row), structural=True)

    def action_undo(self) -> None:
        """Undo the last change."""
        if self.document is None or not self._editable(self.action_undo):
            return
        change = self.document.undo()
        if change is None:
            self.notify("Nothing to undo.", timeout=2)
            return
        self._committed(change.focus_row, structural=True)

    def action_redo(self) -> None:
        """Redo the last undone change."""
        if self.document is None or not self._editable(self.action_redo):
            return
        change = self.document.redo()
        if change is None:
            self.notify("Nothing to redo.", timeout=2)
            return
        self._committed(change.focus_row, structural=True)

    # Autosave

    def _save(self) -> None:
        if self.document is not None:
            version, pairs = self.document.snapshot()
            self._save_worker(self.document, version, pairs)

    @work(thread=True, group="dataset-save", exit_on_error=False)
    def _save_worker(self, document: DatasetDocument, version: int, pairs: list[QAPair]) -> None:
        try:
            document.save(version, pairs)
        except EngineError:
            self.post_message(self.Saved(document.path, -1))
            raise
        self.post_message(self.Saved(document.path, version))

    @on(Saved)
    def _saved(self, event: Saved) -> None:
        if self.document is not None and event.path == self.document.path:
            self.save_error = "failed" if event.version < 0 else ""
            self._update_summary()

    def action_reload(self) -> None:
        """Re-read the file from disk (after another program changed it)."""
        if self.document is not None:
            self._load(self.document.path)

    # Filter

    def action_filter(self) -> None:
        """Show the filter field."""
        field = self.query_one("#ds-filter", Input)
        field.display = True
        field.focus()

    @on(Input.Changed, "#ds-filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value.strip()
        self._rebuild_table()

    @on(Input.Submitted, "#ds-filter")
    def _filter_submitted(self) -> None:
        self.query_one("#ds-table").focus()

    def key_escape(self) -> None:
        field = self.query_one("#ds-filter", Input)
        if field.display:
            field.value = ""
            field.display = False
            self.query_one("#ds-table").focus()

    # Files: new, import, export

    def action_new_dataset(self) -> None:
        """Create an empty dataset in datasets/."""
        from tui.screens.modals import PromptScreen

        def named(answer: tuple[str, str] | None) -> None:
            if answer is None:
                return
            try:
                path = new_dataset_path(self.workspace.datasets_dir, answer[0])
                DatasetDocument.open(path)
            except DatasetError as exc:
                self.app.show_failure(exc)  # type: ignore[attr-defined]
                return
            self._refresh_dataset_list(select=path.name)
            self._load(path)

        self.app.push_screen(
            PromptScreen("New dataset", "A file name in datasets/ (.jsonl is added).", placeholder="my_qa"),
            named,
        )

    def action_import(self) -> None:
        """Append pairs from an alpaca, ShareGPT, OpenAI-messages, JSONL or CSV file."""
        from tui.screens.modals import PromptScreen

        def chosen(answer: tuple[str, str] | None) -> None:
            if answer is not None:
                self._import_worker(self.workspace.root / Path(answer[0]).expanduser(), answer[1])

        self.app.push_screen(
            PromptScreen(
                "Import pairs",
                "Path of a file to append to the open dataset (relative to the workspace, or absolute).",
                placeholder="~/data/train.json",
                choices=[("auto-detect format", "auto"), *[(fmt, fmt) for fmt in FORMATS]],
                choice="auto",
            ),
            chosen,
        )

    @work(thread=True, exclusive=True, group="dataset-import", exit_on_error=False)
    def _import_worker(self, path: Path, fmt: str) -> None:
        self.post_message(self.Imported(import_file(path, fmt), path))

    @on(Imported)
    def _imported(self, event: Imported) -> None:
        if self.document is None:
            path = self.workspace.datasets_dir / f"{event.source.stem}.jsonl"
            if path.exists():
                self.app.show_failure(
                    DatasetError(  # type: ignore[attr-defined]
                        f"{path.name} already exists.", next_step="Open it first, then import into it."
                    )
                )
                return
            self.document = DatasetDocument.open(path)
            self._refresh_dataset_list(select=path.name)
        if not self._editable(lambda: self.post_message(self.Imported(event.pairs, event.source))):
            return
        first = self.document.extend(event.pairs)
        self._committed(first, structural=True)
        self.notify(
            f"Imported {len(event.pairs)} pairs from {event.source.name}; u undoes.", title="Imported"
        )

    def action_export(self) -> None:
        """Write the open dataset in another format (alpaca, ShareGPT, OpenAI messages, CSV)."""
        if self.document is None:
            self.notify("Open a dataset first.", severity="warning")
            return
        from tui.screens.modals import PromptScreen

        doc = self.document
        default = f"exports/{doc.path.stem}.openai.jsonl"

        def chosen(answer: tuple[str, str] | None) -> None:
            if answer is not None:
                path = Path(answer[0]).expanduser()
                fmt = answer[1]
                if path.suffix == "" and fmt in EXPORT_SUFFIX:
                    path = path.with_suffix(EXPORT_SUFFIX[fmt])
                try:
                    target = self.workspace.inside(path)
                except EngineError as exc:
                    self.app.show_failure(exc)  # type: ignore[attr-defined]
                    return
                if target.exists():
                    self.app.show_failure(  # type: ignore[attr-defined]
                        EngineError(
                            f"{target.name} already exists and was left as it is.",
                            title="Refusing to overwrite",
                            next_step="Choose another file name, or delete the old file first.",
                        )
                    )
                    return
                self._export_worker(target, list(doc.pairs), fmt)

        self.app.push_screen(
            PromptScreen(
                "Export dataset",
                "Where to write it (relative to the workspace) and in which format.",
                value=default,
                choices=[(fmt, fmt) for fmt in FORMATS if fmt != "jsonl"] + [("jsonl", "jsonl")],
                choice="openai",
            ),
            chosen,
        )

    @work(thread=True, exclusive=True, group="dataset-export", exit_on_error=False)
    def _export_worker(self, path: Path, pairs: list[QAPair], fmt: str) -> None:
        export_pairs(path, pairs, fmt)
        self.app.call_from_thread(self.notify, f"Wrote {len(pairs)} pairs to {path}.", title="Exported")

    # Tokenizer and limit

    def action_pick_model(self) -> None:
        """Choose the base model whose tokenizer and chat template count and render rows."""
        from tui.screens.modals import PickScreen

        options = []
        for model in self.engine.list_models():
            exact = self.engine.model_dir(model) is not None
            options.append((f"{model}{'' if exact else '  (no tokenizer.json: estimates)'}", model))

        def picked(model: str | None) -> None:
            if model:
                self.prefs.set(tokenizer_model=model)
                self._update_tokenizer_label()
                self._relint()
                self._update_detail()

        self.app.push_screen(PickScreen("Count tokens with", options, self.tokenizer_model), picked)

    def action_max_tokens(self) -> None:
        """Set the token limit lints check (use the recipe's data.max_length)."""
        from tui.screens.modals import PromptScreen

        def chosen(answer: tuple[str, str] | None) -> None:
            if answer is None:
                return
            try:
                limit = int(answer[0])
                if limit <= 0:
                    raise ValueError
            except ValueError:
                self.notify(f"{answer[0]!r} is not a positive whole number.", severity="error")
                return
            self.prefs.set(max_tokens=limit)
            self._update_tokenizer_label()
            self._relint()

        self.app.push_screen(
            PromptScreen(
                "Max tokens per pair", "Rows longer than this are flagged (L).", value=str(self.max_tokens)
            ),
            chosen,
        )

    def action_toggle_preview(self) -> None:
        """Show or hide the rendered-prompt pane (more rows for the table)."""
        preview = self.query_one("#ds-preview")
        preview.display = not preview.display
        self._update_detail()
