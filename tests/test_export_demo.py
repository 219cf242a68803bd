"""The demo export (SmolLM2-135M-Instruct + demo adapter): three GGUF types, adapter parity, Modelfile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.events import Progress, RunFinished, parse_event

REPO_ROOT = Path(__file__).resolve().parent.parent
QUANTS = ("q4_0", "q5_1", "q8_0")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_export(demo_run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The one demo export of the session, run as the TUI runs it."""
    out = tmp_path_factory.mktemp("demo-export") / "export"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "engine.export", "--run-dir", str(demo_run_dir), "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    events = [parse_event(line) for line in result.stdout.splitlines() if line.strip()]
    assert all(event is not None for event in events)
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    return {"out": out, "events": events, "report": report}


def test_demo_export_writes_q4_0_q5_1_q8_0_as_llama_cpp_reports_them(demo_export: dict) -> None:
    from engine.quantize import llama_file_report

    finished = demo_export["events"][-1]
    assert isinstance(finished, RunFinished)
    for kind in QUANTS:
        path = Path(finished.outputs["files"][kind])
        assert path.is_file()
        report = llama_file_report(path)
        assert report["ftype_name"] == kind and "llama" in report["desc"]
    sizes = [Path(finished.outputs["files"][kind]).stat().st_size for kind in QUANTS]
    assert sizes == sorted(sizes)  # q4_0 < q5_1 < q8_0


def test_each_demo_gguf_loads_and_generates_with_its_own_chat_template(demo_export: dict) -> None:
    import llama_cpp

    from engine.convert import read_gguf

    template = (demo_export["out"] / "merged" / "chat_template.jinja").read_text(encoding="utf-8")
    question = demo_export["report"]["parity"]["rows"][0]["question"]
    for kind in QUANTS:
        (path,) = demo_export["out"].glob(f"*-{kind}.gguf")
        info = read_gguf(path)
        assert info.chat_template == template and info.eos_token == "<|im_end|>"
        llm = llama_cpp.Llama(str(path), n_ctx=1024, verbose=False)
        reply = llm.create_chat_completion(
            [{"role": "user", "content": question}], temperature=0.0, max_tokens=96
        )
        llm.close()
        assert reply["choices"][0]["message"]["content"].strip(), kind
        assert reply["choices"][0]["finish_reason"] == "stop", kind


def test_demo_q8_0_reproduces_the_adapters_greedy_answers(demo_export: dict) -> None:
    parity = demo_export["report"]["parity"]
    assert parity["by_split"].get("train", 0) >= 20
    # The f16 file shows the conversion alone reproduces the adapter; q8_0 adds its rounding on top.
    assert parity["files"]["f16"]["agreement_train"] >= 0.95
    assert parity["files"]["f16"]["token_agreement"] >= 0.99
    q8 = parity["files"]["q8_0"]
    assert q8["agreement_train"] >= 0.9, [
        (row["adapter"], row["q8_0"]) for row in parity["rows"] if not row["q8_0_agrees"]
    ]
    assert q8["runaway"] == 0
    for kind in QUANTS:
        assert parity["files"][kind]["tokens_per_s"] > 0


def test_demo_parity_report_and_modelfile_exist(demo_export: dict) -> None:
    out = demo_export["out"]
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert "## Parity" in markdown and "| q8_0 |" in markdown and "## Answers" in markdown
    modelfile = (out / "Modelfile").read_text(encoding="utf-8")
    assert "FROM ./" in modelfile and "-q4_0.gguf" in modelfile
    assert 'TEMPLATE """' in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    stages = {event.stage for event in demo_export["events"] if isinstance(event, Progress)}
    assert {"merge", "convert", "verify", "parity"} | {f"quantize:{q}" for q in QUANTS} <= stages
