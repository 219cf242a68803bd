"""Shared fixtures: a tiny Q/A set and model, the demo model, a trained demo run, and fresh workspaces.

Session fixtures build expensive things once per test session; tests must not modify what they return.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# No test may reach the network or the model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from engine.workspace import RunSummary, Workspace  # noqa: E402

TINY_QA = [
    {"question": "What colour is the sky?", "answer": "The sky is blue."},
    {"question": "How many legs does a cat have?", "answer": "A cat has four legs."},
    {"question": "What is the capital of France?", "answer": "Paris is the capital of France."},
    {"question": "Who trains adapters?", "answer": "tunedeck trains adapters."},
    {"question": "What does export write?", "answer": "Export writes GGUF files."},
    {"question": "How do I resume a run?", "answer": "Use tunedeck train --resume."},
]

# A recipe for the tiny model that learns the tiny Q/A set in 80 LoRA steps (seconds on a CPU). A random-init
# model's output layer is too weak to memorise through the attention and MLP adapters alone, so lm_head is
# adapted as well.
TINY_RECIPE = """\
name = "tiny"
description = "LoRA on the tiny random model (tests)"

[model]
base = "{model}"
dtype = "float32"

[data]
dataset = "tiny_qa.jsonl"
max_length = 128
eval_fraction = 0.0

[train]
method = "lora"
epochs = 80
batch_size = 6
learning_rate = 5e-3
lr_scheduler = "constant"
save_steps = 20
device = "cpu"
seed = 0

[lora]
r = 8
alpha = 16
dropout = 0.0
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
"""


def finish_run(run_dir: Path, timeout: float) -> RunSummary:
    """Wait for a detached run; if the wait fails or times out, stop the trainer so no test leaves one behind."""
    from engine.launch import stop_run, wait_run

    try:
        return wait_run(run_dir, timeout=timeout)
    finally:
        if stop_run(run_dir):
            wait_run(run_dir, timeout=60)


@pytest.fixture(scope="session")
def tiny_qa_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-pair tunedeck JSONL dataset."""
    path = tmp_path_factory.mktemp("tiny-data") / "tiny_qa.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in TINY_QA), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_qa_path: Path) -> Path:
    """A tiny random-init Llama (hidden 64, 2 layers) whose BPE tokenizer was trained on the tiny Q/A set."""
    from engine.tiny import build_tiny_model, corpus_from_jsonl

    return build_tiny_model(
        tmp_path_factory.mktemp("tiny-model") / "tiny", corpus=corpus_from_jsonl(tiny_qa_path)
    )


@pytest.fixture(scope="session")
def demo_workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """A session workspace holding the prepared demo model and dataset (shared, do not modify).

    It is made by `tunedeck demo DIR --no-tui`, the command a new user runs first.
    """
    from engine.cli import main

    root = tmp_path_factory.mktemp("demo-workspace")
    if main(["demo", str(root), "--no-tui"]) != 0:
        pytest.fail("`tunedeck demo --no-tui` failed")
    return Workspace.open(root, create=False)


@pytest.fixture(scope="session")
def demo_model_dir(demo_workspace: Workspace) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (bf16 safetensors, tokenizer, chat template)."""
    from engine.demo import prepare_demo_model

    return prepare_demo_model(demo_workspace)


@pytest.fixture(scope="session")
def demo_run_dir(demo_workspace: Workspace, demo_model_dir: Path) -> Path:
    """The run folder of recipes/demo-cpu.toml trained to the end once per session (minutes on a CPU)."""
    from engine.launch import start_run

    run_id = start_run(demo_workspace, "demo-cpu")
    run_dir = demo_workspace.runs_dir / run_id
    summary = finish_run(run_dir, timeout=840)
    if summary.status != "finished":
        pytest.fail(
            f"demo-cpu run ended {summary.status}: {summary.cause} {summary.next_step} (see {run_dir})"
        )
    return run_dir


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    """A fresh, empty workspace."""
    return Workspace.init(tmp_path / "workspace")


@pytest.fixture
def live_pid() -> Iterator[int]:
    """The pid of a live process that plays a running trainer (killed when the test ends)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    yield process.pid
    process.kill()
    process.wait()


@pytest.fixture
def tiny_workspace(workspace: Workspace, tiny_model_dir: Path, tiny_qa_path: Path) -> Workspace:
    """A fresh workspace with the tiny dataset in datasets/ and recipes/tiny.toml using the tiny model."""
    shutil.copyfile(tiny_qa_path, workspace.datasets_dir / "tiny_qa.jsonl")
    recipes = workspace.root / "recipes"
    recipes.mkdir(exist_ok=True)
    (recipes / "tiny.toml").write_text(TINY_RECIPE.format(model=tiny_model_dir), encoding="utf-8")
    return workspace


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_qa_path: Path) -> Path:
    """A tiny LoRA run trained to the end once per session (its checkpoints memorise the tiny Q/A set)."""
    from engine.launch import start_run

    workspace = Workspace.init(tmp_path_factory.mktemp("tiny-run-workspace"))
    shutil.copyfile(tiny_qa_path, workspace.datasets_dir / "tiny_qa.jsonl")
    recipe = workspace.root / "recipes" / "tiny.toml"
    recipe.parent.mkdir(exist_ok=True)
    recipe.write_text(TINY_RECIPE.format(model=tiny_model_dir), encoding="utf-8")
    run_dir = workspace.runs_dir / start_run(workspace, recipe)
    summary = finish_run(run_dir, timeout=300)
    if summary.status != "finished":
        pytest.fail(f"tiny run ended {summary.status}: {summary.cause} {summary.next_step} (see {run_dir})")
    return run_dir
