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
import shutil
from pathlib import Path

import pytest

pytest.register_assert_rewrite("crashkit")

from crashkit.fixtures import CHAIN_TRIALS  # noqa: E402
from crashkit.harness import KillChain, Zygote, export_problems, leftover_problems  # noqa: E402
from crashkit.plugin import Trials, family  # noqa: E402

from engine.dataset import QAPair, dumps_pairs, load_pairs, save_pairs  # noqa: E402

pytest_plugins = ["crashkit.plugin", "crashkit.fixtures"]

SEED = 20261123
DATASET_TRIALS = 30
DATASET_ROUNDS = 12


def _pairs(count: int, tag: str) -> list[QAPair]:
    return [
        QAPair(f"{tag} question {i}: what is {i} squared?", f"{tag} answer: {i * i}. " * 12)
        for i in range(count)
    ]


@family("crash-dataset")
def test_sigkill_during_dataset_save_leaves_the_old_or_the_new_file(
    tmp_path: Path, light_zygote: Zygote, trials: Trials
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
    temps_left = 0
    for trial in range(DATASET_TRIALS):
        save_pairs(dataset, versions["old"])
        for leftover in folder.glob(".*"):
            leftover.unlink()
        if trial % 2 == 0:
            kill, rounds = {"kill_at_event": rng.randint(1, dry.writes)}, DATASET_ROUNDS
        else:
            # A delay within the dry run's saves; the loop runs on far longer, so the kill always lands.
            kill = {"kill_after_s": rng.uniform(0, dry.seconds - (dry.first_write_s or 0))}
            rounds = DATASET_ROUNDS * 50
        result = light_zygote.trial(
            "crashkit.targets:save_pairs_loop", *args[:-1], rounds, watch=folder, **kill
        )
        trials.case()
        found = complete.get(dataset.read_bytes())
        if found is None or load_pairs(dataset) != versions[found]:
            trials.lost()
        outcomes.append((kill, result.killed, found, leftover_problems(folder, {dataset.name})))
        temps_left += any(folder.glob(".*"))
    lost = [outcome for outcome in outcomes if outcome[2] is None]
    assert not lost, f"a kill left a file that is neither version: {lost}"
    assert not [outcome for outcome in outcomes if outcome[3]], (
        "only temp names may be left beside the dataset"
    )
    assert all(killed for _, killed, _, _ in outcomes), outcomes
    assert {found for _, _, found, _ in outcomes} == {"old", "new"}, "kills landed before and after a rename"
    ended = [found for _, _, found, _ in outcomes]
    trials.note(
        f"{ended.count('old')} kills left the old file, {ended.count('new')} the new one; "
        f"{temps_left} left a temp file beside it"
    )


FOLDER_ROUNDS = 6
FOLDER_TIMED_KILLS = 6


@family("crash-folder")
def test_sigkill_during_a_folder_replace_always_leaves_a_complete_version(
    tmp_path: Path, light_zygote: Zygote, trials: Trials
) -> None:
    from crashkit.targets import folder_version, replace_folder_loop

    from engine.atomic import recover_directory

    parent = tmp_path / "export"
    final = parent / "merged"
    rng = random.Random(SEED + 2)
    outcomes = []
    for exchange in (True, False):
        shutil.rmtree(parent, ignore_errors=True)
        parent.mkdir()
        replace_folder_loop(str(final), 1, exchange)
        dry = light_zygote.trial(
            "crashkit.targets:replace_folder_loop", str(final), FOLDER_ROUNDS, exchange, watch=parent
        )
        assert dry.code == 0 and dry.writes and folder_version(final) is not None, dry
        # Every gap between two writes of one old-and-new cycle, then kills at seeded delays (inside writes).
        kills: list[dict[str, float]] = [
            {"kill_at_event": k} for k in range(1, 2 * dry.writes // FOLDER_ROUNDS + 2)
        ]
        kills += [
            {"kill_after_s": rng.uniform(0, dry.seconds - (dry.first_write_s or 0))}
            for _ in range(FOLDER_TIMED_KILLS)
        ]
        for kill in kills:
            rounds = FOLDER_ROUNDS if "kill_at_event" in kill else FOLDER_ROUNDS * 50
            result = light_zygote.trial(
                "crashkit.targets:replace_folder_loop", str(final), rounds, exchange, watch=parent, **kill
            )
            trials.case()
            visible = folder_version(final) if final.is_dir() else None
            recovered = recover_directory(final)
            after = folder_version(final) if final.is_dir() else None
            leftovers = [entry.name for entry in parent.iterdir() if entry != final]
            if after is None:
                trials.lost()
            outcomes.append((exchange, kill, result.killed, visible, after, recovered, leftovers))
    assert [outcome for outcome in outcomes if outcome[4] is None] == [], "a kill lost both versions"
    assert [outcome for outcome in outcomes if outcome[6]] == [], "the next write removes every leftover"
    assert all(outcome[2] for outcome in outcomes), outcomes
    swapped = [outcome for outcome in outcomes if outcome[0]]
    assert [outcome for outcome in swapped if outcome[3] is None] == [], (
        "with renameat2 a complete version is under the final name at every moment"
    )
    assert {outcome[3] for outcome in swapped} == {"old", "new"}, "kills landed before and after a swap"
    window = [outcome for outcome in outcomes if not outcome[0] and outcome[3] is None]
    assert window, "some fallback kills landed between its two renames"
    trials.note(
        f"renameat2: {len(swapped)} kills, none without a complete folder; aside fallback: "
        f"{len(outcomes) - len(swapped)} kills, {len(window)} between the two renames, each restored by "
        "recover_directory (which every atomic_directory call runs first)"
    )


@family("crash-checkpoint")
@pytest.mark.slow
def test_sigkill_during_checkpoint_writes_leaves_only_complete_checkpoints(
    kill_chain_run: KillChain, trials: Trials
) -> None:
    chain = kill_chain_run
    for trial in chain.trials:
        trials.case()
        if trial.lost:
            trials.lost()
    assert [trial.lost for trial in chain.trials if trial.lost] == [], (
        "an earlier checkpoint or run file changed"
    )
    assert [(trial.kill, trial.problems) for trial in chain.trials if trial.problems] == []
    assert all(trial.killed for trial in chain.trials), [
        trial.kill for trial in chain.trials if not trial.killed
    ]
    assert len(chain.trials) == CHAIN_TRIALS
    progress = [len(trial.checkpoints_after) for trial in chain.trials]
    assert progress == sorted(progress) and progress[-1] >= 4, f"the chain made no progress: {progress}"
    assert sum(trial.resumed for trial in chain.trials) >= CHAIN_TRIALS - 2, (
        "most attempts resumed a checkpoint"
    )
    trials.note(f"complete checkpoints after each kill: {progress}")


EXPORT_TRIALS = 12
EXPORT_QUANTS = "q4_0,q8_0"


@family("crash-export")
@pytest.mark.slow
def test_sigkill_during_export_leaves_nothing_half_written_under_a_final_name(
    tiny_run_dir: Path, tmp_path: Path, ml_zygote: Zygote, trials: Trials
) -> None:
    from engine.export import REPORT_JSON, partial_files

    out = tmp_path / "export"
    argv = [
        "--run-dir",
        str(tiny_run_dir),
        "--out",
        str(out),
        "--no-parity",
        "--quant",
        EXPORT_QUANTS,
        "--force",
    ]
    dry = ml_zygote.trial("engine.export:main", argv, watch=out)
    assert dry.code == 0 and (out / REPORT_JSON).is_file(), dry
    assert export_problems(out) == []
    rng = random.Random(SEED + 1)
    outcomes = []
    for trial in range(EXPORT_TRIALS):
        # Kill points spread evenly over the dry run's writes (stratified), and over its duration.
        stratum = dry.writes / (EXPORT_TRIALS // 2)
        if trial % 2 == 0:
            kill = {"kill_at_event": 1 + int(stratum * (trial // 2) + rng.uniform(0, stratum))}
        else:
            # Within the first 70% of the dry run (a later trial may run a little faster than the first).
            kill = {"kill_after_s": round(rng.uniform(0, 0.7 * (dry.seconds - (dry.first_write_s or 0))), 3)}
        result = ml_zygote.trial("engine.export:main", argv, watch=out, **kill)
        while "kill_after_s" in kill and not result.killed and kill["kill_after_s"] > 0.01:
            # This attempt outran the dry run and finished first: try again with half the delay.
            kill = {"kill_after_s": round(kill["kill_after_s"] / 2, 3)}
            result = ml_zygote.trial("engine.export:main", argv, watch=out, **kill)
        trials.case()
        problems = export_problems(out)
        finished = (out / REPORT_JSON).is_file()
        outcomes.append((kill, result.killed, finished, sorted(p.name for p in out.iterdir()), problems))
        if problems:
            trials.lost()
    assert [(kill, problems) for kill, _, _, _, problems in outcomes if problems] == []
    assert all(killed for _, killed, _, _, _ in outcomes), outcomes
    # The next export after all those kills finishes and clears what the killed ones left.
    seen = [names for _, _, _, names, _ in outcomes]
    trials.note(
        f"after the kills: {sum('merged' in names for names in seen)} had merged/, "
        f"{sum(any(n.endswith('-f16.gguf') for n in names) for names in seen)} an f16 GGUF, "
        f"{sum(any(n.endswith('-q8_0.gguf') for n in names) for names in seen)} every GGUF, "
        f"{sum(finished for _, _, finished, _, _ in outcomes)} report.json, "
        f"{sum(any('.partial-' in n for n in names) for names in seen)} a temp file"
    )
    final = ml_zygote.trial("engine.export:main", argv, watch=out)
    assert final.code == 0 and export_problems(out) == [] and partial_files(out) == []
