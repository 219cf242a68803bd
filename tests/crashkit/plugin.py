"""Pytest plugin of the reliability tests: per family it counts cases, failures, known bugs and data lost, writes
build/reliability.json when the session ends, and runs the docs-table check after every other test.

Test modules load it with `pytest_plugins = ["crashkit.plugin"]` and put tests in a family with `@family("name")`
(an attribute, not a pytest mark: marks used before this late-loaded plugin registers them would warn); a test that
runs several cases (kill trials, scenarios) reports them through the `trials` fixture.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest

FAMILY_ATTR = "reliability_family"
CHECK_TEST = "test_reliability_table_matches_the_measurements"
REPO_ROOT = Path(__file__).resolve().parent.parent.parent
TABLE_SCRIPT = REPO_ROOT / "scripts" / "reliability_table.py"


def table_module() -> ModuleType:
    """scripts/reliability_table.py, imported from its path (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("reliability_table", TABLE_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclasses.dataclass
class FamilyCount:
    """What one family's tests did in this session."""

    collected: int = 0
    deselected: int = 0
    run: int = 0
    failed: int = 0
    known_bugs: int = 0
    skipped: int = 0
    cases: int = 0
    data_lost: int = 0
    seconds: float = 0.0
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when every test of the family was selected, ran and none was skipped."""
        return self.collected > 0 and not self.deselected and not self.skipped and self.run == self.collected


@dataclasses.dataclass
class Recorded:
    """Cases, data losses and measurements one test reported."""

    cases: int = 0
    data_lost: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)


class Ledger:
    """The counts of every family, keyed by family name."""

    def __init__(self) -> None:
        self.families: dict[str, FamilyCount] = {}

    def __getitem__(self, family: str) -> FamilyCount:
        return self.families.setdefault(family, FamilyCount())

    def summary(self) -> dict[str, Any]:
        """The JSON-ready summary scripts/reliability_table.py renders."""
        return {
            "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "families": {
                key: {
                    **dataclasses.asdict(count),
                    "complete": count.complete,
                    "seconds": round(count.seconds, 2),
                }
                for key, count in self.families.items()
            },
        }


F = TypeVar("F", bound=Callable[..., Any])
LEDGER = pytest.StashKey[Ledger]()
RECORDED = pytest.StashKey[Recorded]()


def family(name: str) -> Callable[[F], F]:
    """Put a test in the reliability family `name` (a row of docs/reliability.md's table)."""

    def mark(test: F) -> F:
        setattr(test, FAMILY_ATTR, name)
        return test

    return mark


def family_of(item: pytest.Item) -> str | None:
    """The family a test belongs to."""
    return getattr(getattr(item, "function", None), FAMILY_ATTR, None)


def pytest_configure(config: pytest.Config) -> None:
    if LEDGER not in config.stash:
        config.stash[LEDGER] = Ledger()


def pytest_itemcollected(item: pytest.Item) -> None:
    family = family_of(item)
    if family:
        item.config.stash[LEDGER][family].collected += 1


def pytest_deselected(items: list[pytest.Item]) -> None:
    for item in items:
        family = family_of(item)
        if family:
            item.config.stash[LEDGER][family].deselected += 1


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The table check compares what every other reliability test measured, so it runs after them.
    checks = [item for item in items if item.name == CHECK_TEST]
    items[:] = [item for item in items if item.name != CHECK_TEST] + checks


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    family = family_of(item)
    if not family:
        return
    count = item.config.stash[LEDGER][family]
    count.seconds += report.duration
    finished_early = report.when == "setup" and not report.passed
    if report.when == "call" or finished_early:
        count.run += 1
        recorded = item.stash.get(RECORDED, Recorded())
        count.data_lost += recorded.data_lost
        count.notes += [f"{item.name}: {note}" for note in recorded.notes]
        if hasattr(report, "wasxfail"):
            count.known_bugs += 1
            count.cases += max(recorded.cases, 1)
            count.notes.append(f"{item.name}: {report.wasxfail}")
        elif report.skipped:
            count.skipped += 1
            count.notes.append(
                f"{item.name} skipped: {report.longrepr[2] if isinstance(report.longrepr, tuple) else ''}"
            )
        else:
            count.cases += max(recorded.cases, 1)
            count.failed += int(report.failed)
    elif report.when == "teardown" and report.failed:
        count.failed += 1


def pytest_sessionfinish(session: pytest.Session) -> None:
    ledger = session.config.stash.get(LEDGER, None)
    if ledger is None or not ledger.families:
        return
    target = REPO_ROOT / "build" / "reliability.json"
    target.parent.mkdir(exist_ok=True)
    target.write_text(json.dumps(ledger.summary(), indent=2) + "\n", encoding="utf-8")


class Trials:
    """What a test reports about the cases it ran."""

    def __init__(self, recorded: Recorded) -> None:
        self.recorded = recorded

    def case(self, count: int = 1) -> None:
        """Count `count` more cases (kill trials, scenarios) run by this test."""
        self.recorded.cases += count

    def lost(self, count: int = 1) -> None:
        """Count cases in which data was lost (the test then fails)."""
        self.recorded.data_lost += count

    def note(self, text: str) -> None:
        """Keep a measurement (a timing, a deviation) in build/reliability.json beside the counts."""
        self.recorded.notes.append(text)


@pytest.fixture
def trials(request: pytest.FixtureRequest) -> Trials:
    """The current test's case and data-loss counter."""
    recorded = Recorded()
    request.node.stash[RECORDED] = recorded
    return Trials(recorded)
