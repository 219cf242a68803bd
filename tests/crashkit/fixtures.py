"""Fixtures of the reliability tests: warm zygotes for kill trials and runs of the real trainer."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from crashkit.harness import KillChain, Zygote, kill_chain
from engine.workspace import Workspace

# What a trainer or export trial needs imported before the fork.
ML_PRELOAD = [
    "torch",
    "transformers",
    "peft",
    "engine.train",
    "engine.modeling",
    "engine.export",
    "llama_cpp",
]


@pytest.fixture(scope="session")
def ml_zygote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zygote]:
    """A zygote with torch, transformers, peft, the trainer and the export engine imported (one per session)."""
    log = tmp_path_factory.mktemp("ml-zygote") / "zygote.log"
    with Zygote(ML_PRELOAD, log) as zygote:
        yield zygote


@pytest.fixture(scope="session")
def light_zygote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zygote]:
    """A zygote with only the pure engine modules imported, for dataset-save trials."""
    log = tmp_path_factory.mktemp("light-zygote") / "zygote.log"
    with Zygote(["engine.dataset", "crashkit.targets"], log) as zygote:
        yield zygote


# A run trained in attempts that are all SIGKILLed (tests/test_crash.py checks what each kill left;
# tests/test_faults.py resumes it through the CLI to the end).
CHAIN_SEED = 20261124
CHAIN_TRIALS = 12
CHAIN_MAX_STEPS = 48  # more than 12 attempts of at most four checkpoints each can reach
CHAIN_WRITES_PER_SAVE = 14  # writes under the run folder per checkpoint save and step (counted in a dry run)
CHAIN_SAVE_S = 0.15  # one step plus its checkpoint save on an idle 2-core machine, until measured


@pytest.fixture(scope="session")
def reliability_workspace(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_qa_path: Path
) -> Workspace:
    """A workspace with the tiny dataset and recipes/tiny.toml (shared by the kill-chain run)."""
    from conftest import TINY_RECIPE

    workspace = Workspace.init(tmp_path_factory.mktemp("reliability") / "workspace")
    shutil.copyfile(tiny_qa_path, workspace.datasets_dir / "tiny_qa.jsonl")
    (workspace.root / "recipes").mkdir(exist_ok=True)
    (workspace.root / "recipes" / "tiny.toml").write_text(
        TINY_RECIPE.format(model=tiny_model_dir), encoding="utf-8"
    )
    return workspace


@pytest.fixture(scope="session")
def kill_chain_run(ml_zygote: Zygote, reliability_workspace: Workspace) -> KillChain:
    """The tiny recipe with a checkpoint every step, trained in CHAIN_TRIALS attempts that were all SIGKILLed."""
    from engine.launch import prepare_run

    run_dir = prepare_run(
        reliability_workspace,
        reliability_workspace.root / "recipes" / "tiny.toml",
        ["train.save_steps=1", f"train.max_steps={CHAIN_MAX_STEPS}"],
    )
    return kill_chain(
        ml_zygote,
        run_dir,
        CHAIN_SEED,
        CHAIN_TRIALS,
        writes_per_save=CHAIN_WRITES_PER_SAVE,
        save_s=CHAIN_SAVE_S,
    )
