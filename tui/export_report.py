"""Exports on disk for the Export tab: the folders under <workspace>/exports/, their state and report.json.

Pure (stdlib and engine.events/workspace): it reads what `python -m engine.export` wrote, so the tab can list
every earlier export, reopen one, and lay its parity report (engine/parity.py `summarise`) out as tables.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import time
from pathlib import Path
from typing import Any

from engine.errors import ExportError
from engine.events import RunFailed, RunFinished, RunStarted, read_events
from engine.workspace import Workspace, pid_alive

REPORT_JSON = "report.json"
EVENTS_FILE = "events.jsonl"
PID_FILE = "pid"
DEFAULT_QUANTS = ("q4_0", "q5_1", "q8_0")
# File types llama.cpp writes that tunedeck's export takes (engine/quantize.py checks the real list); the
# i-quants below 4 bits need an importance matrix, which the export does not compute.
LLAMA_TYPES = (
    "q4_0",
    "q4_1",
    "q5_0",
    "q5_1",
    "q8_0",
    "q2_k",
    "q3_k_s",
    "q3_k_m",
    "q3_k_l",
    "q4_k_s",
    "q4_k_m",
    "q5_k_s",
    "q5_k_m",
    "q6_k",
    "iq4_nl",
    "iq4_xs",
    "bf16",
    "f32",
)
NEEDS_IMATRIX = ("iq1", "iq2", "iq3_xxs", "iq3_xs", "q2_k_s")


@dataclasses.dataclass(frozen=True)
class ExportRecord:
    """One export folder: finished (its report is there), running, failed or incomplete."""

    folder: Path
    status: str
    time: float
    cause: str = ""
    pid: int = 0

    @property
    def name(self) -> str:
        return self.folder.name

    def label(self) -> str:
        """`20261123-demo-step48 · finished 11-23 10:40` for the list of exports."""
        when = time.strftime("%m-%d %H:%M", time.localtime(self.time)) if self.time else "?"
        return f"{self.name} · {self.status} {when}"


def export_record(folder: Path) -> ExportRecord:
    """The state of one export folder, from its report.json, pid file and events.jsonl."""
    folder = Path(folder)
    report = folder / REPORT_JSON
    if report.is_file():
        return ExportRecord(folder, "finished", report.stat().st_mtime)
    events_path = folder / EVENTS_FILE
    changed = events_path.stat().st_mtime if events_path.is_file() else folder.stat().st_mtime
    try:
        pid = int((folder / PID_FILE).read_text(encoding="ascii").strip() or 0)
    except (OSError, ValueError):
        pid = 0
    # events.jsonl keeps every attempt: the last run_started opens the one that counts.
    last: list = []
    for event in read_events(events_path):
        if isinstance(event, RunStarted):
            last = []
        last.append(event)
    if not pid and last and isinstance(last[0], RunStarted):
        pid = last[0].pid
    end = next((event for event in reversed(last) if isinstance(event, (RunFailed, RunFinished))), None)
    if isinstance(end, RunFailed):
        return ExportRecord(folder, "failed", changed, f"{end.title}: {end.cause}")
    if pid and pid_alive(pid):
        return ExportRecord(folder, "running", changed, pid=pid)
    return ExportRecord(folder, "incomplete", changed, "the export stopped before it wrote its report")


def list_exports(workspace: Workspace, extra: list[Path] | None = None) -> list[ExportRecord]:
    """Every export folder under exports/ (and `extra` ones written elsewhere), newest first."""
    folders: dict[Path, None] = {}
    if workspace.exports_dir.is_dir():
        for folder in workspace.exports_dir.iterdir():
            if folder.is_dir() and not folder.name.startswith("."):
                folders[folder.resolve()] = None
    for folder in extra or []:
        if Path(folder).is_dir():
            folders[Path(folder).resolve()] = None
    records = [export_record(folder) for folder in folders]
    return sorted(records, key=lambda record: (record.time, record.name), reverse=True)


def load_report(folder: Path) -> dict[str, Any]:
    """The export's report.json; ExportError when it is missing or unreadable."""
    path = Path(folder) / REPORT_JSON
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(
            f"{Path(folder).name} has no {REPORT_JSON}: the export did not finish.",
            next_step="Export the run again from the Export tab (x).",
        ) from None
    except (OSError, ValueError) as exc:
        raise ExportError(
            f"{path} cannot be read ({exc}).", next_step="Export the run again with overwrite ticked."
        ) from None
    if not isinstance(report, dict):
        raise ExportError(f"{path} is not an export report.", next_step="Export the run again.")
    return report


def similarity(first: str, second: str) -> float:
    """difflib's ratio of two answers after trimming whitespace: the measure engine/parity.py agrees by."""
    return difflib.SequenceMatcher(None, first.strip(), second.strip(), autojunk=False).ratio()


def percent(value: float | None) -> str:
    """`83%`, or an en dash when unknown."""
    return "–" if value is None else f"{value * 100:.0f}%"


def megabytes(size: Any) -> str:
    """`75.7 MB` for a byte count."""
    return f"{size / 1e6:.1f} MB" if isinstance(size, (int, float)) else "–"


@dataclasses.dataclass(frozen=True)
class FileRow:
    """One line of the per-file table: the adapter (Hugging Face) or one GGUF file."""

    kind: str
    file: str
    agreement_by_split: dict[str, float | None]
    agreement: float | None
    reference_similarity: float | None
    runaway: int | None
    tokens_per_s: float | None
    size_bytes: int | None


@dataclasses.dataclass(frozen=True)
class Cell:
    """One file's answer to one question, with its agreement with the adapter's."""

    kind: str
    text: str
    similarity: float
    agrees: bool
    runaway: bool


@dataclasses.dataclass(frozen=True)
class AnswerRow:
    """One question of the parity check: reference, adapter answer and each GGUF's answer."""

    index: int
    split: str
    question: str
    reference: str
    adapter: str
    adapter_runaway: bool
    cells: tuple[Cell, ...]


def splits(report: dict[str, Any]) -> list[str]:
    """The question splits the parity check covered, training questions first (`train`, `held-out`)."""
    names = list(((report.get("parity") or {}).get("by_split") or {}).keys())
    return sorted(names, key=lambda name: (name != "train", name))


def parity_kinds(report: dict[str, Any]) -> list[str]:
    """The GGUF types the parity check answered with, in the report's order."""
    return list(((report.get("parity") or {}).get("files") or {}).keys())


def file_rows(report: dict[str, Any]) -> list[FileRow]:
    """The adapter, then every GGUF the export wrote, with its parity summary where there is one."""
    parity = report.get("parity") or {}
    names = splits(report)
    rows = []
    if parity.get("questions"):
        adapter = parity.get("adapter") or {}
        rows.append(
            FileRow(
                "adapter",
                "base + adapter (Hugging Face)",
                dict.fromkeys(names),
                None,
                adapter.get("reference_similarity"),
                adapter.get("runaway"),
                adapter.get("tokens_per_s"),
                None,
            )
        )
    checked = report.get("files") or {}
    summaries = parity.get("files") or {}
    for kind in dict.fromkeys([*checked, *summaries]):
        summary = summaries.get(kind) or {}
        check = checked.get(kind) or {}
        rows.append(
            FileRow(
                kind,
                str(check.get("file") or summary.get("file") or ""),
                {split: summary.get(f"agreement_{split}") for split in names},
                summary.get("agreement"),
                summary.get("reference_similarity"),
                summary.get("runaway"),
                summary.get("tokens_per_s"),
                check.get("size_bytes", summary.get("size_bytes")),
            )
        )
    return rows


def answer_rows(report: dict[str, Any]) -> list[AnswerRow]:
    """Every question of the parity check with each file's answer and its agreement with the adapter's."""
    kinds = parity_kinds(report)
    rows = []
    for index, row in enumerate((report.get("parity") or {}).get("rows") or []):
        adapter = str(row.get("adapter", ""))
        cells = tuple(
            Cell(
                kind,
                str(row.get(kind, "")),
                similarity(str(row.get(kind, "")), adapter),
                bool(row.get(f"{kind}_agrees")),
                bool(row.get(f"{kind}_runaway")),
            )
            for kind in kinds
        )
        rows.append(
            AnswerRow(
                index + 1,
                str(row.get("split", "")),
                str(row.get("question", "")),
                str(row.get("reference", "")),
                adapter,
                bool(row.get("adapter_runaway")),
                cells,
            )
        )
    return rows


def summary_line(report: dict[str, Any]) -> str:
    """What was exported and how the check was run, in one short line."""
    architecture = str(report.get("architecture") or "?").removesuffix("ForCausalLM")
    parts = [
        f"{architecture} {float(report.get('parameters') or 0) / 1e6:.0f}M",
        str(report.get("method", "")),
    ]
    parity = report.get("parity") or {}
    if parity.get("questions"):
        by_split = parity.get("by_split") or {}
        counts = ", ".join(f"{by_split[split]} {split}" for split in splits(report))
        parts.append(f"{parity['questions']} questions ({counts})")
        parts.append(f"✓ = ≥{float(parity.get('agreement_threshold', 0.9)) * 100:.0f}% like adapter")
    elif parity:
        parts.append(f"parity check: {parity.get('note', 'skipped')}")
    else:
        parts.append("parity check skipped")
    return " · ".join(part for part in parts if part)


def quant_problem(name: str) -> str:
    """Why `name` cannot be asked for (empty when it looks fine; the engine's pre-flight has the last word)."""
    if not name.replace("_", "").isalnum():
        return f"{name!r} is not a type name (e.g. q4_k_m)"
    if name.startswith(NEEDS_IMATRIX):
        return f"{name} needs an importance matrix, which the export does not compute"
    if name == "f16":
        return "f16 is always written (the other types are made from it)"
    return ""


def parse_quants(text: str) -> list[str]:
    """`q4_k_m, Q6-K` → ['q4_k_m', 'q6_k'] (any case, commas or spaces)."""
    names = [item.strip().lower().replace("-", "_") for item in text.replace(",", " ").split()]
    return list(dict.fromkeys(name for name in names if name))
