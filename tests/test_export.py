"""The export engine on the tiny model: the process, its events, files and parity report, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.events import Progress, RunFailed, RunFinished, RunStarted, parse_event

REPO_ROOT = Path(__file__).resolve().parent.parent
QUANTS = ("q4_0", "q5_1", "q8_0")
STAGES = (
    "preflight",
    "merge",
    "convert",
    "quantize:q4_0",
    "quantize:q5_1",
    "quantize:q8_0",
    "verify",
    "parity",
)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def run_export_process(run_dir: Path, out: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m engine.export` as the TUI runs it; stdout must carry events only."""
    command = [sys.executable, "-m", "engine.export", "--run-dir", str(run_dir), "--out", str(out), *args]
    return subprocess.run(
        command, capture_output=True, text=True, env=_env(**env), cwd=REPO_ROOT, timeout=600
    )


def stdout_events(result: subprocess.CompletedProcess[str]) -> list:
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    events = [parse_event(line) for line in lines]
    assert all(event is not None for event in events), f"stdout carried non-event lines: {lines[:5]}"
    return events


@pytest.fixture(scope="module")
def tiny_export(tiny_run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One complete export of the tiny run, through the real process (shared by the checks below)."""
    out = tmp_path_factory.mktemp("tiny-export") / "export"
    result = run_export_process(tiny_run_dir, out, "--questions", "6")
    assert result.returncode == 0, result.stderr[-3000:]
    return {"out": out, "events": stdout_events(result), "run_dir": tiny_run_dir, "stderr": result.stderr}


def test_export_emits_progress_for_every_stage_and_finishes(tiny_export: dict) -> None:
    events = tiny_export["events"]
    assert isinstance(events[0], RunStarted) and events[0].method == "export"
    stages = [event.stage for event in events if isinstance(event, Progress)]
    assert list(dict.fromkeys(stages)) == list(STAGES)
    for stage in STAGES:
        last = [e for e in events if isinstance(e, Progress) and e.stage == stage][-1]
        assert last.current == last.total and last.eta_s == 0.0
    # Long stages announce an ETA before they end.
    for stage in ("merge", "convert", "parity"):
        early = [e for e in events if isinstance(e, Progress) and e.stage == stage and e.current < e.total]
        assert any(e.eta_s is not None and e.eta_s > 0 for e in early), stage
    finished = events[-1]
    assert isinstance(finished, RunFinished) and finished.status == "finished"
    assert set(finished.outputs["files"]) == {"f16", *QUANTS}
    assert Path(finished.outputs["report"]).is_file()
    # events.jsonl in the export folder holds the same record the TUI would replay.
    logged = [
        json.loads(line)["type"] for line in (tiny_export["out"] / "events.jsonl").read_text().splitlines()
    ]
    assert logged[0] == "run_started" and logged[-1] == "run_finished"


def test_export_writes_files_llama_cpp_reads_as_the_asked_types(tiny_export: dict) -> None:
    from engine.convert import read_gguf
    from engine.export import partial_files
    from engine.quantize import llama_file_report

    out = tiny_export["out"]
    assert partial_files(out) == []
    for kind in ("f16", *QUANTS):
        (path,) = out.glob(f"*-{kind}.gguf")
        assert llama_file_report(path)["ftype_name"] == kind
        assert read_gguf(path).file_type_name == kind
    merged = out / "merged"
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ):
        assert (merged / name).is_file(), name


def test_gguf_carries_the_training_chat_template_and_eos(tiny_export: dict) -> None:
    from engine.convert import read_gguf
    from engine.workspace import latest_checkpoint

    checkpoint = latest_checkpoint(tiny_export["run_dir"])
    template = (checkpoint / "chat_template.jinja").read_text(encoding="utf-8")
    for path in tiny_export["out"].glob("*.gguf"):
        info = read_gguf(path)
        assert info.chat_template == template
        assert info.eos_token == "<|im_end|>"
        assert info.bos_token == "<s>"


def test_each_gguf_loads_and_answers_like_training(tiny_export: dict) -> None:
    import llama_cpp

    for kind in QUANTS:
        (path,) = tiny_export["out"].glob(f"*-{kind}.gguf")
        llm = llama_cpp.Llama(str(path), n_ctx=256, verbose=False)
        reply = llm.create_chat_completion(
            [{"role": "user", "content": "What colour is the sky?"}], temperature=0.0, max_tokens=24
        )
        llm.close()
        choice = reply["choices"][0]
        assert choice["message"]["content"].strip() == "The sky is blue.", kind
        assert choice["finish_reason"] == "stop", kind


def test_parity_report_shows_adapter_and_every_gguf_side_by_side(tiny_export: dict) -> None:
    out = tiny_export["out"]
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    parity = report["parity"]
    assert parity["questions"] == 6 and parity["by_split"] == {"train": 6}
    assert set(parity["files"]) == {"f16", *QUANTS}
    assert parity["files"]["q8_0"]["agreement_train"] >= 0.9
    assert (
        parity["files"]["f16"]["agreement_train"] == 1.0 and parity["files"]["f16"]["token_agreement"] >= 0.99
    )
    for kind in ("f16", *QUANTS):
        summary = parity["files"][kind]
        assert summary["runaway"] == 0 and summary["tokens_per_s"] > 0 and summary["size_bytes"] > 0
        assert summary["llama_cpp_type"] == kind
        assert 0.9 <= summary["token_agreement"] <= 1.0
    assert parity["adapter"]["reference_similarity"] >= 0.9
    row = parity["rows"][0]
    assert {"question", "reference", "adapter", *QUANTS} <= set(row)
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert "## Parity" in markdown and "| q8_0 |" in markdown and row["question"] in markdown
    assert set(report["durations_s"]) >= set(STAGES) | {"total"}


def test_verify_notes_the_output_layer_llama_cpp_keeps_at_higher_precision(tiny_export: dict) -> None:
    out = tiny_export["out"]
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    # Every weight row of the tiny model (64) fits q4_0's and q5_1's blocks of 32; only the output layer is in
    # another type, by llama.cpp's choice (q8_0 here, as its rows do not fit q6_k's blocks of 256).
    for kind in ("q4_0", "q5_1"):
        assert report["files"][kind]["tensor_types"].get("q8_0") == 1, kind
    assert not [warning for warning in report["warnings"] if "rows" in warning]
    notes = [note for note in report["notes"] if "output.weight is in q8_0" in note]
    assert len(notes) == 2 and all(
        "llama.cpp keeps the output layer at a higher precision" in n for n in notes
    )
    assert "- Note: " in (out / "report.md").read_text(encoding="utf-8")


def test_modelfile_points_at_q4_0_with_template_and_stops(tiny_export: dict) -> None:
    out = tiny_export["out"]
    text = (out / "Modelfile").read_text(encoding="utf-8")
    from_line = next(line for line in text.splitlines() if line.startswith("FROM "))
    assert from_line.endswith("-q4_0.gguf") and (out / from_line.split("./", 1)[1]).is_file()
    assert 'TEMPLATE """{{ range .Messages }}' in text and '<|im_start|>assistant\n"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text


def test_llama_cpp_log_stays_off_stdout(tiny_export: dict) -> None:
    # stdout_events() already refused any non-event line; llama.cpp's log went to stderr and export.log.
    assert "llama_model_loader" in (tiny_export["out"] / "export.log").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------------------------
# Failures at every stage leave only complete earlier outputs


EXPECTED_BEFORE = {
    "preflight": set(),
    "merge": set(),
    "convert": {"merged"},
    "quantize:q4_0": {"merged", "f16"},
    "quantize:q5_1": {"merged", "f16", "q4_0"},
    "quantize:q8_0": {"merged", "f16", "q4_0", "q5_1"},
    "verify": {"merged", "f16", *QUANTS},
    "parity": {"merged", "f16", *QUANTS, "Modelfile"},
}


def _outputs(export_dir: Path) -> set[str]:
    from engine.export import LOG_NAMES

    names = set()
    for entry in export_dir.iterdir():
        if entry.name in LOG_NAMES:
            continue
        names.add(
            entry.name.rsplit("-", 1)[1].removesuffix(".gguf") if entry.suffix == ".gguf" else entry.name
        )
    return names


@pytest.mark.parametrize("stage", STAGES)
def test_failure_at_each_stage_leaves_nothing_that_looks_finished(
    stage: str, tiny_run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.convert import read_gguf
    from engine.errors import ExportError
    from engine.export import FAULT_ENV, ExportOptions, partial_files, run_export
    from engine.quantize import llama_file_report

    monkeypatch.setenv(FAULT_ENV, f"export:{stage}")
    out = tmp_path / "export"
    with pytest.raises(ExportError, match="injected"):
        run_export(ExportOptions(run_dir=tiny_run_dir, out_dir=out, parity_questions=2))
    assert partial_files(out) == []
    assert _outputs(out) == EXPECTED_BEFORE[stage]
    assert not (out / "report.json").exists() and not (out / "report.md").exists()
    for path in out.glob("*.gguf"):
        kind = path.stem.rsplit("-", 1)[1]
        assert read_gguf(path).file_type_name == kind and llama_file_report(path)["ftype_name"] == kind
    if "merged" in EXPECTED_BEFORE[stage]:
        assert (out / "merged" / "model.safetensors").is_file() and (
            out / "merged" / "chat_template.jinja"
        ).is_file()


def test_export_after_a_failed_one_starts_clean_and_finishes(
    tiny_run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.errors import ExportError
    from engine.export import FAULT_ENV, ExportOptions, run_export

    out = tmp_path / "export"
    monkeypatch.setenv(FAULT_ENV, "export:verify")
    with pytest.raises(ExportError):
        run_export(ExportOptions(run_dir=tiny_run_dir, out_dir=out, parity=False, quants=["q4_0", "q8_0"]))
    monkeypatch.delenv(FAULT_ENV)
    run_export(ExportOptions(run_dir=tiny_run_dir, out_dir=out, parity=False, quants=["q8_0"]))
    # The q4_0 file of the failed attempt is gone: nothing of another attempt passes for part of this one.
    assert _outputs(out) == {"merged", "f16", "q8_0", "Modelfile", "report.json", "report.md"}
    assert "FROM ./" in (out / "Modelfile").read_text() and "-q8_0.gguf" in (out / "Modelfile").read_text()


def test_failed_process_reports_run_failed_with_cause(tiny_run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    result = run_export_process(tiny_run_dir, out, "--no-parity", TUNEDECK_FAULT="export:convert")
    assert result.returncode == 2
    events = stdout_events(result)
    failed = events[-1]
    assert isinstance(failed, RunFailed) and "convert" in failed.cause and failed.next_step
    assert failed.details_path.endswith("export.log")


# ----------------------------------------------------------------------------------------------------
# The CLI


def test_cli_export_waits_prints_folder_and_refuses_a_second_export(
    tiny_run_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cli-export"
    command = [
        sys.executable,
        "-m",
        "engine.cli",
        "export",
        str(tiny_run_dir),
        "--out",
        str(out),
        "--wait",
        "--no-parity",
        "--quant",
        "q8_0",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), cwd=REPO_ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == str(out)
    assert "q8_0" in result.stderr and (out / "report.json").is_file()
    again = subprocess.run(command, capture_output=True, text=True, env=_env(), cwd=REPO_ROOT, timeout=600)
    assert again.returncode == 2
    assert "already exported" in again.stderr and "--force" in again.stderr


QLORA_RECIPE = """\
name = "tiny-qlora"

[model]
base = "{model}"
dtype = "float32"

[data]
dataset = "tiny_qa.jsonl"
max_length = 128

[train]
method = "qlora"
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
target_modules = "all-linear"
"""


@pytest.mark.slow
def test_qlora_run_merges_into_a_16bit_reload_of_the_base(
    tiny_model_dir: Path, tiny_qa_path: Path, tmp_path: Path
) -> None:
    import shutil

    from safetensors import safe_open

    from engine.export import ExportOptions, run_export
    from engine.launch import start_run, wait_run
    from engine.workspace import Workspace

    workspace = Workspace.init(tmp_path / "workspace")
    shutil.copyfile(tiny_qa_path, workspace.datasets_dir / "tiny_qa.jsonl")
    recipe = workspace.root / "recipes" / "tiny-qlora.toml"
    recipe.parent.mkdir()
    recipe.write_text(QLORA_RECIPE.format(model=tiny_model_dir))
    run_dir = workspace.runs_dir / start_run(workspace, recipe)
    summary = wait_run(run_dir, timeout=900)
    assert summary.status == "finished", f"{summary.cause} {summary.next_step}"
    outputs = run_export(ExportOptions(run_dir=run_dir, parity_questions=6))
    merged = Path(outputs["merged"])
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    with safe_open(str(merged / "model.safetensors"), "pt") as handle:
        names = list(handle.keys())
        assert not [n for n in names if n.endswith((".absmax", ".quant_map")) or "quant_state" in n]
        assert str(handle.get_tensor(names[0]).dtype) == "torch.float16"
    report = json.loads(Path(outputs["report_json"]).read_text())
    assert report["method"] == "qlora" and report["merge_dtype"] in ("float32", "bfloat16")
    assert report["parity"]["files"]["q8_0"]["agreement"] >= 0.9


def test_stopping_the_process_mid_convert_keeps_no_partial_file(tiny_run_dir: Path, tmp_path: Path) -> None:
    import signal
    import time

    from engine.events import EventTail
    from engine.export import LOG_NAMES, partial_files

    out = tmp_path / "export"
    command = [sys.executable, "-m", "engine.export", "--run-dir", str(tiny_run_dir), "--out", str(out)]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env(), cwd=REPO_ROOT
    )
    deadline = time.monotonic() + 300
    tail = EventTail(out / "events.jsonl")
    converting = False
    while not converting and time.monotonic() < deadline:
        converting = any(isinstance(e, Progress) and e.stage == "convert" for e in tail.poll())
        time.sleep(0.05)
    assert converting
    time.sleep(1.0)  # the converter subprocess is running now
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=120)
    assert process.returncode == 130
    last = parse_event(stdout.strip().splitlines()[-1])
    assert isinstance(last, RunFailed) and last.title == "Export stopped"
    assert partial_files(out) == []
    assert {p.name for p in out.iterdir()} - LOG_NAMES <= {"merged"}
