"""Modules the TUI and the quick CLI commands import must not load the ML stack (each checked alone)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
ML_STACK = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "llama_cpp")
UI_STACK = ("textual", "tui")

PURE_ENGINE_MODULES = (
    "engine.errors",
    "engine.atomic",
    "engine.events",
    "engine.workspace",
    "engine.recipes",
    "engine.dataset",
    "engine.template",
    "engine.launch",
    "engine.cli",
    "engine.commands.train",
    "engine.commands.runs",
    "engine.commands.logs",
    "engine.display",
    "engine.commands.init",
)
TUI_MODULES = ("tui", "tui.app")


def _loaded_after_import(module: str) -> set[str]:
    """Top-level package names in sys.modules after importing `module` in a fresh interpreter."""
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("module", PURE_ENGINE_MODULES)
def test_pure_engine_modules_load_no_ml_or_ui_stack(module: str) -> None:
    loaded = _loaded_after_import(module)
    assert not loaded & set(ML_STACK), f"{module} loads {sorted(loaded & set(ML_STACK))}"
    assert not loaded & set(UI_STACK), f"{module} loads {sorted(loaded & set(UI_STACK))}"


@pytest.mark.parametrize("module", TUI_MODULES)
def test_tui_loads_no_ml_stack(module: str) -> None:
    if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not part of this checkout")
    loaded = _loaded_after_import(module)
    assert not loaded & set(ML_STACK), f"{module} loads {sorted(loaded & set(ML_STACK))}"
