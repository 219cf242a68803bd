"""docs/reliability.md's results table matches what the reliability tests measured in this session.

The plugin (tests/crashkit/plugin.py) runs this check after every other test; it compares only the families whose
tests all ran here, so a partial run (one file, -k) skips rather than fails. After changing a reliability test,
run the reliability tests and `python scripts/reliability_table.py` to rewrite the table.
"""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("crashkit")

from crashkit.plugin import LEDGER, table_module  # noqa: E402

pytest_plugins = ["crashkit.plugin"]


def test_reliability_table_matches_the_measurements(request: pytest.FixtureRequest) -> None:
    table = table_module()
    summary = request.config.stash[LEDGER].summary()
    measured = table.table_rows(summary)
    if not measured:
        pytest.skip("no reliability family ran completely in this session")
    stale = table.stale_rows(summary, table.DOC.read_text(encoding="utf-8"))
    assert stale == [], (
        "docs/reliability.md is stale; run `python scripts/reliability_table.py`:\n" + "\n".join(stale)
    )


def test_the_table_script_rewrites_and_checks_the_document() -> None:
    table = table_module()
    entry = {"cases": 30, "failed": 0, "known_bugs": 1, "data_lost": 0, "complete": True}
    summary = {"families": {"crash-dataset": entry, "safety": {**entry, "complete": False}}}
    doc = f"# Title\n\nintro\n\n{table.BEGIN}\n{table.END}\n\nafter\n"
    assert table.stale_rows(summary, doc) != []
    rewritten = table.rewrite(doc, summary)
    assert table.stale_rows(summary, rewritten) == []
    assert rewritten.startswith("# Title\n\nintro\n\n") and rewritten.endswith("\n\nafter\n")
    assert "| SIGKILL during dataset save (`save_pairs`) | 30 | 1 (1 known bug, xfail) | 0 |" in rewritten
    assert "Safety" not in rewritten, "a family that did not run completely is not written"
    assert table.stale_rows({"families": {"crash-dataset": {**entry, "data_lost": 2}}}, rewritten) != []
