"""`tunedeck data`: lint a dataset, import one from Alpaca/ShareGPT/OpenAI/CSV, or export it to them."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from engine.dataset import (
    FORMAT_NAMES,
    FORMATS,
    Dataset,
    DatasetFileError,
    LineProblem,
    Lint,
    QAPair,
    export_pairs,
    lint_pairs,
    load_dataset,
    load_pairs,
    read_dataset,
    save_pairs,
)
from engine.errors import EngineError, ModelError, WorkspaceError
from engine.workspace import Workspace

HELP = "lint, import or export Q/A datasets"

EXIT_CLEAN = 0
EXIT_FOUND = 1
EXIT_ERROR = 2

IMPORT_FORMATS = ("auto", *FORMATS)
# Lints listed after `data import`; `data lint` lists every one.
IMPORT_LISTED_LINES = 20


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not above 0")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `lint`, `import` and `export` actions."""
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    lint = actions.add_parser(
        "lint",
        help="list unreadable lines, empty or repeated questions and over-long pairs",
        description="List every unreadable line and every pair that will train badly. "
        "Exit status: 0 clean, 1 problems found, 2 the file could not be read.",
    )
    lint.add_argument(
        "file", type=Path, metavar="FILE", help="a .jsonl file (or a name in the workspace's datasets/)"
    )
    lint.add_argument(
        "--max-tokens",
        type=_positive_int,
        metavar="N",
        help="flag pairs longer than N tokens (use the recipe's data.max_length)",
    )
    lint.add_argument(
        "--model", type=Path, metavar="DIR", help="count tokens with this model's tokenizer and chat template"
    )

    imp = actions.add_parser(
        "import",
        help="convert an Alpaca, ShareGPT, OpenAI-messages or CSV file into a tunedeck dataset",
        description="Convert a dataset into tunedeck's question/answer JSONL. Nothing is written while any "
        "line is unreadable, unless --skip-bad is given.",
    )
    imp.add_argument("source", type=Path, metavar="SRC", help="the file to import")
    imp.add_argument(
        "--format", choices=IMPORT_FORMATS, default="auto", help="the source format (default: auto)"
    )
    imp.add_argument(
        "--out",
        type=Path,
        metavar="DEST",
        help="where to write (default: the workspace's datasets/<name>.jsonl)",
    )
    imp.add_argument(
        "--skip-bad", action="store_true", help="import the readable records and skip the bad ones"
    )
    imp.add_argument("--force", action="store_true", help="replace DEST if it exists")

    exp = actions.add_parser(
        "export",
        help="write a tunedeck dataset as JSONL, Alpaca, ShareGPT, OpenAI messages or CSV",
        description="Write a tunedeck dataset in another format.",
    )
    exp.add_argument(
        "file", type=Path, metavar="FILE", help="a .jsonl file (or a name in the workspace's datasets/)"
    )
    exp.add_argument("--format", choices=FORMATS, required=True, help="the format to write")
    exp.add_argument("--out", type=Path, metavar="DEST", required=True, help="the file to write")
    exp.add_argument("--force", action="store_true", help="replace DEST if it exists")
    for action in (lint, imp, exp):
        # Also accepted after the action (`tunedeck data import SRC -w DIR`), not only before `data`.
        action.add_argument(
            "--workspace",
            "-w",
            type=Path,
            default=argparse.SUPPRESS,
            help="workspace folder (default: $TUNEDECK_WORKSPACE or the current folder)",
        )


def run(args: argparse.Namespace) -> int:
    """Run one `data` action; 0 clean, 1 problems or lints found, 2 the action could not be done."""
    actions: dict[str, Callable[[argparse.Namespace], int]] = {
        "lint": _lint,
        "import": _import,
        "export": _export,
    }
    try:
        return actions[args.data_command](args)
    except EngineError as exc:
        _report_error(exc)
        return EXIT_ERROR


def _report_error(exc: EngineError) -> None:
    print(f"{exc.title}: {exc.message}", file=sys.stderr)
    if exc.next_step:
        print(f"  → {exc.next_step}", file=sys.stderr)


def _workspace(args: argparse.Namespace) -> Workspace:
    return Workspace.open(getattr(args, "workspace", None), create=False)


def _dataset_path(given: Path, args: argparse.Namespace) -> Path:
    """`given` as typed, else the file of that name (with or without .jsonl) in the workspace's datasets/."""
    path = given.expanduser()
    if path.exists() or path.is_absolute() or len(path.parts) > 1:
        return path
    try:
        datasets = _workspace(args).datasets_dir
    except WorkspaceError:
        return path
    for candidate in (datasets / path.name, datasets / f"{path.name}.jsonl"):
        if candidate.is_file():
            return candidate
    return path


def _entries(problems: Sequence[LineProblem], lints: Sequence[Lint]) -> list[tuple[int, str]]:
    """Problems and lints as (line, text) rows, in file order."""
    rows = [
        (problem.line, f"{problem.location}: [unreadable] {problem.message} — {problem.fix}")
        for problem in problems
    ]
    rows += [(lint.line, f"line {lint.line}: [{lint.kind}] {lint.message} — {lint.fix}") for lint in lints]
    return sorted(rows, key=lambda row: row[0])


def _count(count: int, word: str) -> str:
    return f"{count:,} {word}" if count == 1 else f"{count:,} {word}s"


def _unreadable(problems: Sequence[LineProblem]) -> str:
    """`3 unreadable lines`, or records/rows when the file holds a JSON array or CSV rows."""
    unit = next((problem.unit for problem in problems if problem.record is not None), "line")
    return _count(len(problems), f"unreadable {unit}")


def _model_token_counter(model_dir: Path) -> Callable[[QAPair], int]:
    """Count a pair's tokens as training will see them: the model's tokenizer over its chat template."""
    try:
        from engine.template import PromptRenderer
    except ModuleNotFoundError as exc:
        if exc.name in ("engine", "engine.template"):
            raise EngineError(
                "Exact token counts need engine.template, which this tunedeck install lacks.",
                title="Cannot count tokens",
                next_step="Drop --model to lint with estimated token counts.",
            ) from None
        raise _missing_package(exc.name) from None
    if not model_dir.is_dir():
        raise ModelError(
            f"The model folder {model_dir} does not exist.",
            next_step="Pass the folder holding the model's tokenizer and config, e.g. one under models/.",
        )
    try:
        renderer = PromptRenderer.from_model_dir(model_dir)
    except ModuleNotFoundError as exc:
        raise _missing_package(exc.name) from None
    return renderer.count


def _missing_package(name: str | None) -> EngineError:
    return EngineError(
        f"Counting tokens with a model's tokenizer needs the package {name!r}, which is missing.",
        title="Cannot count tokens",
        next_step="Run scripts/setup.sh again, or drop --model to use estimated token counts.",
    )


def _lint(args: argparse.Namespace) -> int:
    path = _dataset_path(args.file, args)
    dataset = load_dataset(path)
    counts: list[int] = []
    count_tokens = None
    if args.model is not None:
        # Tokenize each pair once; the lints and the longest-pair line share the counts.
        counter = _model_token_counter(args.model)
        counts = [counter(pair) for pair in dataset.pairs]
        by_pair = {id(pair): count for pair, count in zip(dataset.pairs, counts, strict=True)}

        def count_tokens(pair: QAPair) -> int:
            return by_pair[id(pair)]

    lints = dataset.lint(max_tokens=args.max_tokens, count_tokens=count_tokens)
    print(_headline(dataset, lints))
    for _, text in _entries(dataset.problems, lints):
        print(f"  {text}")
    if counts:
        longest = max(range(len(counts)), key=counts.__getitem__)
        print(f"Longest pair: {counts[longest]:,} tokens (line {dataset.lines[longest]}).")
        if args.max_tokens is None:
            print("Pass --max-tokens N (the recipe's data.max_length) to flag pairs longer than N.")
    elif args.max_tokens is not None:
        print("Token counts are estimates; pass --model DIR to count with the model's tokenizer.")
    return EXIT_FOUND if dataset.problems or lints else EXIT_CLEAN


def _headline(dataset: Dataset, lints: Sequence[Lint]) -> str:
    name = dataset.path.name if dataset.path is not None else "dataset"
    found = []
    if dataset.problems:
        found.append(_unreadable(dataset.problems))
    if lints:
        found.append(_count(len(lints), "lint"))
    summary = ", ".join(found) if found else "no problems found"
    return f"{name}: {_count(len(dataset.pairs), 'pair')}; {summary}."


def _refuse_overwrite(dest: Path, force: bool) -> None:
    if dest.exists() and not force:
        raise EngineError(
            f"{dest} already exists and was left as it is.",
            title="Refusing to overwrite",
            next_step="Pass --force to replace it, or --out to write somewhere else.",
        )


def _import(args: argparse.Namespace) -> int:
    source = args.source.expanduser()
    dataset = read_dataset(source, args.format)
    if dataset.problems and not args.skip_bad:
        print(
            f"{source.name} ({FORMAT_NAMES[dataset.format]}): {_unreadable(dataset.problems)}; "
            "nothing was written."
        )
        _print_all(dataset.problems)
        readable = _count(len(dataset.pairs), "pair")
        print(
            f"Fix those lines and import again, or pass --skip-bad to import the {readable} that were read."
        )
        return EXIT_FOUND
    if not dataset.pairs:
        raise DatasetFileError(
            f"{source.name} holds no readable pairs, so nothing was written.",
            path=source,
            next_step="Check that it is the file you meant, and pass --format if it was misdetected.",
        )
    if args.out is not None:
        dest = args.out.expanduser()
    else:
        try:
            dest = _workspace(args).datasets_dir / f"{source.stem}.jsonl"
        except WorkspaceError as exc:
            raise WorkspaceError(
                exc.message,
                next_step="Pass --out FILE, pass --workspace DIR, or run `tunedeck init DIR` first.",
            ) from None
    _refuse_overwrite(dest, args.force)
    save_pairs(dest, dataset.pairs)
    print(
        f"Imported {_count(len(dataset.pairs), 'pair')} from {source.name} ({FORMAT_NAMES[dataset.format]}) "
        f"into {dest}."
    )
    if dataset.problems:
        print(f"Skipped {_unreadable(dataset.problems)}:")
        _print_all(dataset.problems)
    lints = lint_pairs(dataset.pairs, lines=dataset.lines)
    if lints:
        print(f"{_count(len(lints), 'lint')} (lines of {source.name}):")
        _print_limited(lints)
        print(f"Run `tunedeck data lint {dest}` to review the imported file.")
    return EXIT_FOUND if dataset.problems or lints else EXIT_CLEAN


def _print_all(problems: Sequence[LineProblem]) -> None:
    for _, text in _entries(problems, ()):
        print(f"  {text}")


def _print_limited(lints: Sequence[Lint]) -> None:
    rows = _entries((), lints)
    for _, text in rows[:IMPORT_LISTED_LINES]:
        print(f"  {text}")
    if len(rows) > IMPORT_LISTED_LINES:
        print(f"  … and {len(rows) - IMPORT_LISTED_LINES:,} more.")


def _export(args: argparse.Namespace) -> int:
    path = _dataset_path(args.file, args)
    try:
        pairs = load_pairs(path)
    except DatasetFileError as exc:
        if not exc.problems:
            raise
        print(f"{path.name}: {_unreadable(exc.problems)}; nothing was exported.")
        _print_all(exc.problems)
        print(f"Fix those lines first (`tunedeck data lint {path}` lists them all).")
        return EXIT_FOUND
    dest = args.out.expanduser()
    if dest.exists() and dest.resolve() == path.resolve():
        raise EngineError(
            f"--out names the dataset being exported ({dest}).",
            title="Refusing to overwrite",
            next_step="Choose another file for --out.",
        )
    _refuse_overwrite(dest, args.force)
    export_pairs(dest, pairs, args.format)
    print(f"Exported {_count(len(pairs), 'pair')} from {path.name} to {dest} ({FORMAT_NAMES[args.format]}).")
    return EXIT_CLEAN
