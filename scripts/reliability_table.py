"""Render the reliability results table (docs/reliability.md) from the JSON summary the reliability tests write.

`python scripts/reliability_table.py` rewrites the table between the markers in docs/reliability.md from
build/reliability.json (written at the end of every pytest session that ran the reliability tests);
`--check` only compares and exits 1 when the document is stale. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DOC = REPO_ROOT / "docs" / "reliability.md"
SUMMARY = REPO_ROOT / "build" / "reliability.json"
BEGIN = "<!-- reliability-table:begin (scripts/reliability_table.py writes this table) -->"
END = "<!-- reliability-table:end -->"
HEADER = ("Test family", "Cases run", "Failures", "Data lost")

# Table rows, in order: family key and the title the table shows.
FAMILIES: tuple[tuple[str, str], ...] = (
    ("bad-datasets", "Bad datasets at the training boundary (launch, CLI, trainer, TUI)"),
    ("crash-dataset", "SIGKILL during dataset save (`save_pairs`)"),
    ("crash-checkpoint", "SIGKILL during checkpoint writes (tiny-model trainer), then resume"),
    ("crash-export", "SIGKILL during export (every stage, tiny model)"),
    ("crash-folder", "SIGKILL during a folder replace (`atomic_directory(replace=True)`), then recovery"),
    ("training-faults", "Training faults: resume after kill, changed inputs, OOM, missing model, TUI"),
    ("ssh-drop", "SSH drop: tmux session killed / TUI SIGHUPed while training"),
    ("disk-full", "Disk full on a real tmpfs: dataset save, checkpoint, export"),
    ("safety", "Safety: shell, pickles, remote code, paths outside the workspace"),
)


def row_cells(entry: dict[str, Any]) -> tuple[str, str, str]:
    """Cases, failures and data lost of one family as the table writes them."""
    failures = entry["failed"] + entry["known_bugs"]
    failed_text = str(failures)
    if entry["known_bugs"]:
        failed_text += f" ({entry['known_bugs']} known bug{'s' if entry['known_bugs'] != 1 else ''}, xfail)"
    return str(entry["cases"]), failed_text, str(entry["data_lost"])


def table_rows(summary: dict[str, Any]) -> dict[str, tuple[str, str, str, str]]:
    """Family key → the four cells of its row, for the families the summary measured completely."""
    rows = {}
    for key, title in FAMILIES:
        entry = summary.get("families", {}).get(key)
        if entry and entry["complete"]:
            rows[key] = (title, *row_cells(entry))
    return rows


def render(rows: dict[str, tuple[str, ...]]) -> str:
    """The Markdown table of `rows` in family order."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(["---"] + ["--:"] * (len(HEADER) - 1)) + "|"]
    for key, _ in FAMILIES:
        if key in rows:
            lines.append("| " + " | ".join(rows[key]) + " |")
    return "\n".join(lines)


def parse_doc_rows(text: str) -> dict[str, tuple[str, ...]]:
    """Family key → cells of the table currently in the document (matched by title)."""
    titles = {title: key for key, title in FAMILIES}
    body = text.split(BEGIN, 1)[1].split(END, 1)[0] if BEGIN in text and END in text else ""
    rows = {}
    for line in body.splitlines():
        cells = tuple(cell.strip() for cell in line.strip().strip("|").split("|"))
        if cells and cells[0] in titles:
            rows[titles[cells[0]]] = cells
    return rows


def stale_rows(summary: dict[str, Any], doc_text: str) -> list[str]:
    """Rows whose measured cells differ from the document's (families not measured completely are skipped)."""
    documented = parse_doc_rows(doc_text)
    problems = []
    for key, cells in table_rows(summary).items():
        if documented.get(key) != cells:
            problems.append(
                f"{cells[0]}: measured {cells[1:]}, documented {documented.get(key, ('missing',))[1:]}"
            )
    return problems


def rewrite(doc_text: str, summary: dict[str, Any]) -> str:
    """The document with its table replaced by the measured one (unmeasured rows keep their documented cells)."""
    rows: dict[str, tuple[str, ...]] = dict(parse_doc_rows(doc_text))
    rows.update(table_rows(summary))
    before, rest = doc_text.split(BEGIN, 1)
    _, after = rest.split(END, 1)
    return f"{before}{BEGIN}\n{render(rows)}\n{END}{after}"


def main(argv: list[str] | None = None) -> int:
    """Rewrite (or with --check, compare) the table in docs/reliability.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary", type=Path, default=SUMMARY, help="the JSON the tests wrote")
    parser.add_argument("--doc", type=Path, default=DOC, help="the document holding the table")
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 when the table is stale")
    args = parser.parse_args(argv)
    if not args.summary.is_file():
        print(f"{args.summary} does not exist; run the reliability tests first.", file=sys.stderr)
        return 2
    summary = json.loads(args.summary.read_text(encoding="utf-8"))
    text = args.doc.read_text(encoding="utf-8")
    if args.check:
        problems = stale_rows(summary, text)
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1 if problems else 0
    args.doc.write_text(rewrite(text, summary), encoding="utf-8")
    for key, entry in summary.get("families", {}).items():
        state = "" if entry["complete"] else " (not complete: row left as it was)"
        print(f"{key}: {entry['cases']} cases in {entry['seconds']:.1f} s{state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
