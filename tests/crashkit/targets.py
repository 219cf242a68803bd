"""Functions a trial process runs (by name, through the zygote) to exercise one write path again and again."""

from __future__ import annotations

import json
from pathlib import Path

from engine.dataset import QAPair, save_pairs


def _pairs(path: str) -> list[QAPair]:
    return [QAPair(**row) for row in json.loads(Path(path).read_text(encoding="utf-8"))]


def save_pairs_loop(dataset: str, first: str, second: str, rounds: int) -> int:
    """Save the `first` and `second` pair lists (JSON files) over `dataset` in turn, `rounds` times, as the Dataset
    tab's autosave does after each edit."""
    versions = [_pairs(first), _pairs(second)]
    for index in range(rounds):
        save_pairs(Path(dataset), versions[index % 2])
    return 0
