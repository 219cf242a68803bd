"""Each tiny architecture through the real trainer (LoRA) → merge → f16 → q4_0/q5_1/q8_0 → load → generate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine.tiny import TINY_ARCHITECTURES
from engine.workspace import Workspace

QUANTS = ("q4_0", "q5_1", "q8_0")
# What general.architecture the converter writes for each Hugging Face family.
GGUF_ARCHITECTURE = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3",
    "phi3": "phi3",
    "stablelm": "stablelm",
    "gpt2": "gpt2",
    "bloom": "bloom",
}
# Gemma ties its output layer to the embeddings; adapting lm_head there exercises the untie-before-merge path.
LLAMA_STYLE_WITH_HEAD = (
    '["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]'
)
TARGETS = {"gemma3": LLAMA_STYLE_WITH_HEAD}

RECIPE = """\
name = "tiny-{arch}"

[model]
base = "{model}"
dtype = "float32"

[data]
dataset = "tiny_qa.jsonl"
max_length = 128

[train]
method = "lora"
epochs = 60
batch_size = 6
learning_rate = 5e-3
lr_scheduler = "constant"
save_steps = 60
device = "cpu"
seed = 0

[lora]
r = 8
alpha = 16
dropout = 0.0
target_modules = {targets}
"""


def test_at_least_six_architectures_are_covered() -> None:
    assert len(TINY_ARCHITECTURES) >= 6 and set(TINY_ARCHITECTURES) == set(GGUF_ARCHITECTURE)


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(TINY_ARCHITECTURES))
def test_tiny_architecture_exports_to_three_quants_that_load_and_generate(
    arch: str, tmp_path: Path, tiny_qa_path: Path
) -> None:
    from engine.convert import read_gguf
    from engine.export import ExportOptions, run_export
    from engine.launch import start_run, wait_run
    from engine.tiny import build_tiny_model, corpus_from_jsonl

    workspace = Workspace.init(tmp_path / "workspace")
    shutil.copyfile(tiny_qa_path, workspace.datasets_dir / "tiny_qa.jsonl")
    model = build_tiny_model(tmp_path / "model", arch=arch, corpus=corpus_from_jsonl(tiny_qa_path))
    config = json.loads((model / "config.json").read_text())
    hidden = config.get("hidden_size", config.get("n_embd"))
    intermediate = config.get("intermediate_size") or config.get("n_inner") or 4 * hidden
    assert hidden % 32 == 0 and intermediate % 32 == 0
    recipe = workspace.root / "recipes" / f"tiny-{arch}.toml"
    recipe.parent.mkdir(exist_ok=True)
    recipe.write_text(RECIPE.format(arch=arch, model=model, targets=TARGETS.get(arch, '"all-linear"')))
    run_dir = workspace.runs_dir / start_run(workspace, recipe)
    summary = wait_run(run_dir, timeout=900)
    assert summary.status == "finished", f"{summary.cause} {summary.next_step}"

    outputs = run_export(ExportOptions(run_dir=run_dir, parity_questions=6))
    report = json.loads(Path(outputs["report_json"]).read_text())
    assert report["architecture"] == config["architectures"][0]
    for kind in ("f16", *QUANTS):
        check = report["files"][kind]
        assert check["llama_cpp_type"] == kind and check["file_type"] == kind
        assert read_gguf(Path(outputs["files"][kind])).architecture == GGUF_ARCHITECTURE[arch]
    parity = report["parity"]
    for kind in QUANTS:
        # Every file loaded in llama.cpp and wrote an answer to every question.
        assert all(row[kind].strip() for row in parity["rows"]), kind
    assert parity["files"]["q8_0"]["agreement"] >= 5 / 6, parity["rows"]
    assert parity["files"]["q8_0"]["runaway"] == 0
