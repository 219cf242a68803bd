"""Crash safety: SIGKILL at seeded points during dataset saves, checkpoint writes and exports leaves every file
either the old complete version or the new complete version, and nothing half-written under a finished name.

Each trial is a process forked from a warm zygote (tests/crashkit) and killed either just before its k-th write
under the watched folder (k drawn from a seeded RNG over the writes a dry run counted) or a seeded random time
after its first write there (so kills also land inside writes done by native code: safetensors, torch.save,
llama.cpp).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from crashkit.harness import (
    Zygote,
    checkpoint_problems,
    events_problems,
    gguf_problems,
    leftover_problems,
    tree_digest,
)
from engine.dataset import QAPair, dumps_pairs, load_pairs, save_pairs

pytest_plugins = ["crashkit.plugin", "crashkit.fixtures"]

SEED = 20261123
DATASET_TRIALS = 30
DATASET_ROUNDS = 12


def _pairs(count: int, tag: str) -> list[QAPair]:
    return [QAPair(f"{tag} question {i}: what is {i} squared?", f"{tag} answer: {i * i}. " * 12) for i in range(count)]


@pytest.mark.reliability("crash-dataset")
def test_sigkill_during_dataset_save_leaves_the_old_or_the_new_file(
    tmp_path: Path, light_zygote: Zygote, trials
) -> None:
    folder = tmp_path / "datasets"
    folder.mkdir()
    dataset = folder / "qa.jsonl"
    versions = {"old": _pairs(1500, "old"), "new": _pairs(1700, "new")}
    files = {}
    for name, pairs in versions.items():
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps([pair.__dict__ for pair in pairs]), encoding="utf-8")
    complete = {dumps_pairs(pairs).encode("utf-8"): name for name, pairs in versions.items()}
    args = (str(dataset), str(files["new"]), str(files["old"]), DATASET_ROUNDS)

    save_pairs(dataset, versions["old"])
    dry = light_zygote.trial("crashkit.targets:save_pairs_loop", *args, watch=folder)
    assert dry.code == 0 and dry.writes, dry
    rng = random.Random(SEED)
    outcomes = []
    for trial in range(DATASET_TRIALS):
        save_pairs(dataset, versions["old"])
        for leftover in folder.glob(".*"):
            leftover.unlink()
        if trial % 2 == 0:
            kill = {"kill_at_event": rng.randint(1, dry.writes)}
        else:
            kill = {"kill_after_s": rng.uniform(0, dry.seconds * 0.8)}
        result = light_zygote.trial("crashkit.targets:save_pairs_loop", *args, watch=folder, **kill)
        trials.case()
        found = complete.get(dataset.read_bytes())
        if found is None or load_pairs(dataset) != versions[found]:
            trials.lost()
        outcomes.append((kill, result.killed, found, leftover_problems(folder, {dataset.name})))
    lost = [outcome for outcome in outcomes if outcome[2] is None]
    assert not lost, f"a kill left a file that is neither version: {lost}"
    assert not [outcome for outcome in outcomes if outcome[3]], "only temp names may be left beside the dataset"
    assert sum(killed for _, killed, _, _ in outcomes) >= DATASET_TRIALS - 2, outcomes
    assert {found for _, _, found, _ in outcomes} == {"old", "new"}, "kills landed before and after a rename"
