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


FOLDER_VERSIONS = {"old": 3, "new": 5}


def folder_version(folder: Path) -> str | None:
    """Which complete version (FOLDER_VERSIONS) `folder` holds, or None when it holds neither in full."""
    names = sorted(path.name for path in folder.iterdir())
    for version, count in FOLDER_VERSIONS.items():
        expected = [f"{version}-{index}.bin" for index in range(count)]
        if names == expected and all(
            (folder / name).read_bytes() == _payload(version, index) for index, name in enumerate(names)
        ):
            return version
    return None


def _payload(version: str, index: int) -> bytes:
    return f"{version} {index} ".encode() * 2000


def replace_folder_loop(final: str, rounds: int, exchange: bool) -> int:
    """Replace `final` with the old and the new version in turn, `rounds` times, through
    atomic_directory(replace=True) (as the export's merged/ and the demo's model folder are written); without
    `exchange`, as on a file system that cannot swap two folders in one step."""
    from engine import atomic

    system_exchange = atomic.exchange_paths
    if not exchange:
        atomic.exchange_paths = lambda first, second: False  # type: ignore[assignment]
    try:
        versions = list(FOLDER_VERSIONS)
        for index in range(rounds):
            version = versions[(index + 1) % 2]
            with atomic.atomic_directory(Path(final), replace=True) as temp:
                for number in range(FOLDER_VERSIONS[version]):
                    (temp / f"{version}-{number}.bin").write_bytes(_payload(version, number))
    finally:
        atomic.exchange_paths = system_exchange  # type: ignore[assignment]
    return 0
