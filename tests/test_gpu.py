"""QLoRA on a CUDA GPU through the real trainer subprocess; skipped where no GPU is present (CI)."""

from __future__ import annotations

import subprocess

import pytest

from engine.events import RunFinished, Step, read_events
from engine.launch import _child_env, prepare_run, train_command
from engine.workspace import Workspace, latest_checkpoint

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU on this machine", allow_module_level=True)


def test_qlora_trains_in_bf16_on_the_gpu_and_reports_gpu_memory(tiny_workspace: Workspace) -> None:
    recipe = tiny_workspace.root / "recipes" / "tiny.toml"
    overrides = [
        "train.method=qlora",
        "train.max_steps=4",
        "train.device=cuda",
        "model.dtype=bfloat16",
        "quant.compute_dtype=bfloat16",
        "train.optimizer=paged_adamw_32bit",
    ]
    run_dir = prepare_run(tiny_workspace, recipe, overrides)
    result = subprocess.run(
        train_command(run_dir), capture_output=True, text=True, env=_child_env(run_dir), timeout=300, cwd=run_dir
    )
    assert result.returncode == 0, result.stderr[-2000:]
    events = read_events(run_dir / "events.jsonl")
    steps = [event for event in events if isinstance(event, Step)]
    assert [event.step for event in steps] == [1, 2, 3, 4]
    assert all(event.gpu_mem_gib and event.gpu_mem_gib > 0 for event in steps)
    assert isinstance(events[-1], RunFinished) and events[-1].status == "finished"
    assert (latest_checkpoint(run_dir) / "adapter_model.safetensors").is_file()
