"""The `train`, `runs`, `logs` and `doctor` commands, run through the CLI entry point."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import pytest

from engine.cli import main
from engine.workspace import Workspace


def _run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_wait_runs_and_logs(tiny_workspace: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tiny_workspace.root)
    code, out, err = _run_cli(capsys, "--workspace", root, "train", "tiny", "train.max_steps=3", "--wait")
    assert code == 0, err
    run_id = out.strip()
    assert run_id.endswith("-tiny") and "\n" not in run_id  # stdout is the run id alone, for scripts
    assert "Started run" in err and "finished at step 3" in err

    code, out, err = _run_cli(capsys, "--workspace", root, "runs")
    assert code == 0
    header, row = out.splitlines()[:2]
    assert header.split()[:3] == ["RUN", "STATUS", "STEP"]
    assert row.split()[:3] == [run_id, "finished", "3/3"] and "lora" in row

    code, out, _ = _run_cli(capsys, "--workspace", root, "logs", run_id[-8:])
    assert code == 0
    lines = out.splitlines()
    assert any("started lora on tiny_qa.jsonl" in line for line in lines)
    assert sum(" step " in f" {line} " and "/3" in line for line in lines) == 3
    assert "finished at step 3" in lines[-1]

    code, out, err = _run_cli(capsys, "--workspace", root, "train", "--resume", run_id)
    assert code == 2 and "already finished" in err


def test_train_without_a_recipe_or_with_a_bad_one(
    tiny_workspace: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    root = str(tiny_workspace.root)
    code, _, err = _run_cli(capsys, "--workspace", root, "train")
    assert code == 2 and "Name a recipe" in err
    code, _, err = _run_cli(capsys, "--workspace", root, "train", "tiny", "train.epochz=3")
    assert code == 2 and "train.epochz" in err and "epochs" in err
    code, _, err = _run_cli(capsys, "--workspace", root, "logs", "no-such-run")
    assert code == 2 and "no run called 'no-such-run'" in err


def test_runs_on_an_empty_workspace(workspace: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run_cli(capsys, "--workspace", str(workspace.root), "runs")
    assert code == 0 and "No runs yet" in out


def test_doctor_reports_every_check(workspace: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run_cli(capsys, "--workspace", str(workspace.root), "doctor")
    names = [line.split()[1] for line in out.splitlines() if line[:4].strip() in ("OK", "WARN", "FAIL")]
    for name in (
        "python",
        "torch",
        "cuda",
        "transformers",
        "peft",
        "bitsandbytes",
        "llama-cpp-python",
        "gguf",
        "demo",
        "workspace",
        "disk",
    ):
        assert name in names, out
    assert code == (1 if "FAIL" in out else 0)


def test_doctor_survives_a_missing_package(
    workspace: Workspace, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_import = importlib.import_module

    def without_llama_cpp(name: str, package: str | None = None) -> ModuleType:
        if name == "llama_cpp":
            raise ModuleNotFoundError("No module named 'llama_cpp'")
        return real_import(name, package)

    monkeypatch.setattr(importlib, "import_module", without_llama_cpp)
    monkeypatch.setenv("LLAMA_CPP_DIR", str(workspace.root / "nowhere"))
    monkeypatch.setattr("engine.commands.doctor.REPO_ROOT", Path("/nonexistent"))
    monkeypatch.setattr("sys.prefix", "/nonexistent")
    code, out, _ = _run_cli(capsys, "--workspace", str(workspace.root), "doctor")
    assert code == 1
    assert "FAIL  llama-cpp-python" in out and "scripts/setup.sh" in out
    assert "FAIL  gguf converter" in out and "LLAMA_CPP_DIR" in out
