"""The trainer's packed path (`train.packing`) through the real `python -m engine.train` subprocess, on CPU.

The packed path runs on any device; on a CPU it computes in float32 like the padded path, so the two must train
the same adapter step for step.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from engine.events import Eval, Event, Log, RunFailed, RunFinished, RunStarted, Step, read_events
from engine.launch import _child_env, prepare_run, train_command
from engine.workspace import Workspace, latest_checkpoint

torch = pytest.importorskip("torch")

ATTENTION_AND_MLP = '["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]'
# Six Q/A rows: two held out for eval, two micro-batches of two per step (accumulation across packs).
COMMON = [
    "train.max_steps=4",
    "train.batch_size=2",
    "train.grad_accum=2",
    "train.save_steps=2",
    "train.eval_steps=2",
    "data.eval_fraction=0.3",
    f"lora.target_modules={ATTENTION_AND_MLP}",
    "train.max_tokens_per_batch=24",  # below two samples' length: a micro-batch becomes several packs
]


def _train(workspace: Workspace, overrides: list[str], env: dict[str, str] | None = None) -> Path:
    run_dir = prepare_run(workspace, workspace.root / "recipes" / "tiny.toml", overrides)
    _run(run_dir, env=env)
    return run_dir


def _run(run_dir: Path, *, resume: bool = False, env: dict[str, str] | None = None) -> None:
    subprocess.run(
        train_command(run_dir, resume=resume),
        capture_output=True,
        text=True,
        env={**_child_env(run_dir), **(env or {})},
        timeout=240,
        cwd=run_dir,
        check=False,
    )


def _of(events: list[Event], kind: type) -> list:
    return [event for event in events if isinstance(event, kind)]


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(latest_checkpoint(run_dir) / "adapter_model.safetensors"))


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_packed_and_padded_training_agree_step_for_step(tiny_workspace: Workspace, method: str) -> None:
    # QLoRA on packs keeps the base's other weights unconverted (no kbit preparation): on a CPU both paths
    # compute in float32 all the same, so they still agree to rounding.
    padded = _train(tiny_workspace, [*COMMON, f"train.method={method}", "train.packing=false"])
    packed = _train(tiny_workspace, [*COMMON, f"train.method={method}", "train.packing=true"])
    padded_events, packed_events = read_events(padded / "events.jsonl"), read_events(packed / "events.jsonl")
    assert isinstance(padded_events[-1], RunFinished) and padded_events[-1].status == "finished"
    assert isinstance(packed_events[-1], RunFinished) and packed_events[-1].status == "finished"
    assert any("Training on packs of up to 24 tokens" in e.message for e in _of(packed_events, Log))
    assert not any("packs" in e.message for e in _of(padded_events, Log))

    padded_steps, packed_steps = _of(padded_events, Step), _of(packed_events, Step)
    assert [s.step for s in packed_steps] == [1, 2, 3, 4]
    for a, b in zip(padded_steps, packed_steps, strict=True):
        assert b.loss == pytest.approx(a.loss, rel=1e-4), (a, b)
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-3), (a, b)
        assert b.learning_rate == a.learning_rate
        assert b.tokens_per_s and b.tokens_per_s > 0
    assert packed_steps[-1].loss < packed_steps[0].loss
    padded_evals, packed_evals = _of(padded_events, Eval), _of(packed_events, Eval)
    assert [e.step for e in packed_evals] == [e.step for e in padded_evals] == [2, 4]
    for a, b in zip(padded_evals, packed_evals, strict=True):
        assert b.eval_loss == pytest.approx(a.eval_loss, rel=1e-4)

    expected, got = _adapter(padded), _adapter(packed)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        if method == "lora":
            assert torch.allclose(got[name], tensor, rtol=1e-3, atol=1e-5), name
        else:
            # bitsandbytes' CPU 4-bit matmul rounds differently from dequantize-then-matmul, and Adam turns that
            # into whole steps for weights whose gradients are near zero: compare each tensor as a whole.
            assert (got[name] - tensor).norm() <= 1e-2 * tensor.norm(), name


def test_packed_run_resumes_after_a_crash_as_if_uninterrupted(tiny_workspace: Workspace) -> None:
    whole = _train(tiny_workspace, [*COMMON, "train.packing=true"])
    crashed = _train(
        tiny_workspace, [*COMMON, "train.packing=true"], env={"TUNEDECK_FAULT": "crash_at_step:4"}
    )
    events = read_events(crashed / "events.jsonl")
    assert isinstance(events[-1], RunFailed) and latest_checkpoint(crashed).name == "step_2"

    _run(crashed, resume=True)
    events = read_events(crashed / "events.jsonl")
    starts = _of(events, RunStarted)
    assert [start.resumed_from_step for start in starts] == [None, 2]
    resumed = _of(events[events.index(starts[1]) :], Step)
    uninterrupted = {s.step: s.loss for s in _of(read_events(whole / "events.jsonl"), Step)}
    assert [s.step for s in resumed] == [3, 4]
    for step in resumed:
        assert step.loss == pytest.approx(uninterrupted[step.step], rel=1e-5)
    expected, got = _adapter(whole), _adapter(crashed)
    for name, tensor in expected.items():
        assert torch.allclose(got[name], tensor, rtol=1e-5, atol=1e-7), name


def test_resuming_a_packed_run_on_padded_batches_says_why_the_checkpoint_does_not_fit(
    tiny_workspace: Workspace,
) -> None:
    import sys

    crashed = _train(
        tiny_workspace, [*COMMON, "train.packing=true"], env={"TUNEDECK_FAULT": "crash_at_step:4"}
    )
    assert latest_checkpoint(crashed).name == "step_2"
    # The resume takes the padded path, as it would on a GPU without bfloat16.
    script = (
        "import sys\n"
        "import engine.train as train\n"
        "train.TrainingJob._packing_wanted = lambda self, recipe: False\n"
        "sys.exit(train.main(['--run-dir', sys.argv[1], '--resume']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(crashed)],
        capture_output=True,
        text=True,
        env=_child_env(crashed),
        timeout=240,
        cwd=crashed,
        check=False,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    failed = read_events(crashed / "events.jsonl")[-1]
    assert isinstance(failed, RunFailed), failed
    assert "was saved on packs, and this attempt trains on padded batches" in failed.cause
    assert "start a new run" in failed.next_step
    assert latest_checkpoint(crashed).name == "step_2"  # nothing overwritten


def test_a_model_the_packed_path_cannot_run_trains_padded_and_says_why(tiny_workspace: Workspace) -> None:
    # The tiny recipe adapts lm_head with LoRA, which the packed path does not do.
    run_dir = _train(tiny_workspace, ["train.max_steps=2", "train.packing=true"])
    events = read_events(run_dir / "events.jsonl")
    assert isinstance(events[-1], RunFinished) and events[-1].status == "finished"
    reasons = [e.message for e in _of(events, Log) if "padded batches, not packs" in e.message]
    assert reasons and "lm_head" in reasons[0]
    assert [s.step for s in _of(events, Step)] == [1, 2]


@pytest.mark.slow
def test_two_processes_on_packs_train_like_one(tiny_workspace: Workspace) -> None:
    from conftest import finish_run

    from engine.launch import start_run

    recipe = tiny_workspace.root / "recipes" / "tiny.toml"
    packed = ["train.packing=true", "train.max_steps=4", f"lora.target_modules={ATTENTION_AND_MLP}"]
    runs = []
    for overrides in (["train.gpus=2", "train.batch_size=1"], ["train.batch_size=2"]):
        run_dir = tiny_workspace.runs_dir / start_run(tiny_workspace, recipe, [*packed, *overrides])
        summary = finish_run(run_dir, timeout=240)
        assert summary.status == "finished", (run_dir / "train.log").read_text()[-3000:]
        runs.append(read_events(run_dir / "events.jsonl"))
    two, one = (_of(events, Step) for events in runs)
    assert any("Training on packs" in e.message for e in _of(runs[0], Log))
    assert [s.tokens for s in two] == [s.tokens for s in one]
    for ddp_step, single_step in zip(two, one, strict=True):
        assert ddp_step.loss == pytest.approx(single_step.loss, rel=1e-4)
        assert ddp_step.grad_norm == pytest.approx(single_step.grad_norm, rel=1e-3)
