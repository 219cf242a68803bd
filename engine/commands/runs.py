"""`tunedeck runs`: a table of the workspace's runs with status, progress and losses."""

from __future__ import annotations

import argparse
import time

from engine.workspace import RunSummary, Workspace, summarize_run

HELP = "list runs with status, step and loss"
COLUMNS = ("RUN", "STATUS", "STEP", "LOSS", "EVAL LOSS", "METHOD", "STARTED")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options beyond --workspace."""


def row(summary: RunSummary) -> tuple[str, ...]:
    """The table cells of one run."""
    step = f"{summary.step}/{summary.total_steps}" if summary.total_steps else str(summary.step or "-")
    loss = f"{summary.loss:.4f}" if summary.loss is not None else "-"
    eval_loss = f"{summary.eval_loss:.4f}" if summary.eval_loss is not None else "-"
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(summary.started)) if summary.started else "-"
    return (summary.run_id, summary.status, step, loss, eval_loss, summary.method or "-", started)


def format_table(rows: list[tuple[str, ...]]) -> str:
    """Left-aligned columns separated by two spaces."""
    widths = [max(len(cells[i]) for cells in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()
        for cells in rows
    )


def run(args: argparse.Namespace) -> int:
    """Print the runs table, oldest first (the newest is at the bottom, next to the prompt)."""
    workspace = Workspace.open(args.workspace, create=False)
    summaries = [summarize_run(path) for path in workspace.list_run_dirs()]
    if not summaries:
        print(f"No runs yet in {workspace.root}. Start one with `tunedeck train demo-cpu`.")
        return 0
    print(format_table([COLUMNS, *(row(summary) for summary in summaries)]))
    for summary in summaries:
        if summary.status in ("failed", "interrupted") and summary is summaries[-1]:
            print(f"\n{summary.run_id}: {summary.cause or summary.status}. {summary.next_step}".rstrip())
    return 0
