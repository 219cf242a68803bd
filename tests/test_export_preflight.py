"""Export pre-flight (each refusal one sentence with its fix), the converter and its launcher, quantizing."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from engine.errors import DiskFullError, EngineError, ExportError, OutOfMemoryError


def assert_one_sentence(error: EngineError) -> None:
    """The user-facing cause is one sentence and a fix is named."""
    assert error.message.endswith("."), error.message
    assert not re.search(r"[.!?]\s+[A-Z]", error.message), f"more than one sentence: {error.message}"
    assert error.next_step, "no next step"


def options(run_dir: Path, tmp_path: Path, **kwargs):
    from engine.export import ExportOptions

    return ExportOptions(run_dir=run_dir, out_dir=tmp_path / "export", **kwargs)


def plenty_of_memory() -> int:
    return 1 << 40


# ----------------------------------------------------------------------------------------------------
# Pre-flight refusals


@pytest.fixture(scope="module")
def bnb_4bit_base(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model saved pre-quantized by bitsandbytes (as `…-bnb-4bit` hub folders are)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder = tmp_path_factory.mktemp("bnb") / "tiny-bnb-4bit"
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
        device_map="cpu",
    )
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tiny_model_dir / name, folder / name)
    return folder


def test_preflight_rejects_a_bitsandbytes_4bit_base(
    tiny_run_dir: Path, bnb_4bit_base: Path, tmp_path: Path
) -> None:
    from engine.export import preflight

    with pytest.raises(ExportError) as caught:
        preflight(options(tiny_run_dir, tmp_path, base=str(bnb_4bit_base)), free_memory=plenty_of_memory)
    assert "4-bit" in caught.value.message and "llama.cpp cannot convert" in caught.value.message
    assert "16-bit" in caught.value.next_step
    assert_one_sentence(caught.value)
    assert not (tmp_path / "export").exists()


def test_preflight_rejects_a_gguf_only_base(tiny_run_dir: Path, tmp_path: Path) -> None:
    from engine.export import preflight

    folder = tmp_path / "gguf-only"
    folder.mkdir()
    (folder / "model.Q4_K_M.gguf").write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(ExportError) as caught:
        preflight(options(tiny_run_dir, tmp_path, base=str(folder)), free_memory=plenty_of_memory)
    assert "only a GGUF file" in caught.value.message
    assert_one_sentence(caught.value)


def test_preflight_rejects_a_full_disk(tiny_run_dir: Path, tmp_path: Path) -> None:
    from engine.export import preflight

    with pytest.raises(DiskFullError) as caught:
        preflight(options(tiny_run_dir, tmp_path), free_disk=lambda _: 50_000, free_memory=plenty_of_memory)
    message = caught.value.message
    assert "needs about" in message and "only 50.0 KB is free" in message
    assert "merged model" in message and "q8_0 GGUF" in message
    assert "--out" in caught.value.next_step
    assert_one_sentence(caught.value)


def test_full_disk_through_the_environment_fails_the_process_before_any_output(
    tiny_run_dir: Path, tmp_path: Path
) -> None:
    import subprocess
    import sys

    from engine.events import RunFailed, parse_event
    from engine.export import FREE_DISK_ENV, LOG_NAMES

    out = tmp_path / "export"
    repo = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-m", "engine.export", "--run-dir", str(tiny_run_dir), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=repo,
        timeout=300,
        env={**__import__("os").environ, FREE_DISK_ENV: "1000", "PYTHONPATH": str(repo)},
    )
    assert result.returncode == 2
    failed = parse_event(result.stdout.strip().splitlines()[-1])
    assert (
        isinstance(failed, RunFailed)
        and failed.title == "Disk full"
        and "only 1.0 KB is free" in failed.cause
    )
    assert {p.name for p in out.iterdir()} <= LOG_NAMES


def test_preflight_rejects_too_little_memory_for_the_merge(tiny_run_dir: Path, tmp_path: Path) -> None:
    from engine.export import preflight

    with pytest.raises(OutOfMemoryError) as caught:
        preflight(options(tiny_run_dir, tmp_path), free_memory=lambda: 1000)
    assert "Merging the adapter needs about" in caught.value.message
    assert_one_sentence(caught.value)


def test_preflight_picks_16bit_merge_when_32bit_does_not_fit(tiny_run_dir: Path, tmp_path: Path) -> None:
    from engine.export import count_parameters, preflight

    plan = preflight(options(tiny_run_dir, tmp_path), free_memory=plenty_of_memory)
    assert plan.merge_dtype == "float32"
    parameters = count_parameters(plan.base_dir)
    plan = preflight(options(tiny_run_dir, tmp_path), free_memory=lambda: parameters * 3)
    assert plan.merge_dtype == "bfloat16"


def test_preflight_rejects_an_architecture_the_converter_lacks(
    tiny_run_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from engine.export import preflight

    folder = tmp_path / "odd-model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["NotARealModelForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError) as caught:
        preflight(options(tiny_run_dir, tmp_path, base=str(folder)), free_memory=plenty_of_memory)
    assert "cannot convert NotARealModelForCausalLM" in caught.value.message
    assert "LLAMA_CPP_DIR" in caught.value.next_step
    assert_one_sentence(caught.value)


def test_preflight_rejects_unknown_quant_and_missing_checkpoint(tiny_run_dir: Path, tmp_path: Path) -> None:
    from engine.export import preflight

    with pytest.raises(ExportError) as caught:
        preflight(options(tiny_run_dir, tmp_path, quants=["q4"]), free_memory=plenty_of_memory)
    assert "did you mean" in caught.value.message
    assert_one_sentence(caught.value)
    with pytest.raises(ExportError) as caught:
        preflight(options(tiny_run_dir, tmp_path, checkpoint=7), free_memory=plenty_of_memory)
    assert "no checkpoint at step 7" in caught.value.message and "20" in caught.value.next_step


def test_preflight_plan_estimates_disk_from_the_parameter_count(tiny_run_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from engine.export import count_parameters, preflight

    plan = preflight(options(tiny_run_dir, tmp_path), free_memory=plenty_of_memory)
    expected = sum(tensor.numel() for tensor in load_file(str(plan.base_dir / "model.safetensors")).values())
    assert count_parameters(plan.base_dir) == expected == plan.parameters
    # merged (2 bytes a weight) + f16 (2 bytes) + three quants, plus headroom.
    assert plan.disk_needed > plan.parameters * 4
    assert plan.architecture == "LlamaForCausalLM" and plan.tokenizer.kind == "bpe-byte-level"


# ----------------------------------------------------------------------------------------------------
# The converter: where it is, what it supports, its tokenizer check and launcher


def test_bundled_converter_is_found_and_lists_common_architectures() -> None:
    from engine.convert import find_converter, supported_architectures

    converter = find_converter()
    assert converter.source == "bundled" and converter.script.is_file()
    supported = supported_architectures(converter)
    for name in (
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Gemma3ForCausalLM",
        "Phi3ForCausalLM",
        "GPT2LMHeadModel",
        "StableLmForCausalLM",
        "BloomForCausalLM",
    ):
        assert name in supported, name


def test_llama_cpp_dir_with_an_old_style_checkout_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.convert import CONVERTER_DIR_ENV, find_converter, supported_architectures

    checkout = tmp_path / "llama.cpp"
    (checkout / "gguf-py").mkdir(parents=True)
    (checkout / "convert_hf_to_gguf.py").write_text(
        '@Model.register("FooForCausalLM", "FooModel")\nclass FooModel(Model):\n    pass\n', encoding="utf-8"
    )
    monkeypatch.setenv(CONVERTER_DIR_ENV, str(checkout))
    converter = find_converter()
    assert converter.source == CONVERTER_DIR_ENV and converter.root == checkout.resolve()
    assert supported_architectures(converter) == {"FooForCausalLM", "FooModel"}


def test_llama_cpp_dir_without_the_script_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.convert import CONVERTER_DIR_ENV, find_converter

    monkeypatch.setenv(CONVERTER_DIR_ENV, str(tmp_path))
    with pytest.raises(ExportError) as caught:
        find_converter()
    assert "convert_hf_to_gguf.py" in caught.value.message
    assert_one_sentence(caught.value)


def test_a_users_llama_cpp_checkout_converts(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.convert import CONVERTER_DIR_ENV, check_tokenizer, convert_to_gguf, find_converter, read_gguf

    bundled = find_converter().root
    checkout = tmp_path / "my-llama.cpp"
    checkout.mkdir()
    for name in ("convert_hf_to_gguf.py", "conversion", "gguf-py"):
        source = bundled / name
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, checkout / name)
    monkeypatch.setenv(CONVERTER_DIR_ENV, str(checkout))
    converter = find_converter()
    assert converter.root == checkout.resolve()
    out = convert_to_gguf(
        tiny_model_dir,
        tmp_path / "tiny-f16.gguf",
        converter=converter,
        tokenizer=check_tokenizer(tiny_model_dir, converter),
    )
    info = read_gguf(out)
    assert info.architecture == "llama" and info.file_type_name == "f16"


def test_unknown_byte_level_bpe_converts_as_gpt2_and_only_then(tiny_model_dir: Path, tmp_path: Path) -> None:
    import gguf

    from engine.convert import TokenizerCheck, check_tokenizer, convert_to_gguf, find_converter

    converter = find_converter()
    check = check_tokenizer(tiny_model_dir, converter)
    assert check.kind == "bpe-byte-level" and check.needs_byte_level_fallback
    out = convert_to_gguf(tiny_model_dir, tmp_path / "f16.gguf", converter=converter, tokenizer=check)
    assert gguf.GGUFReader(str(out)).fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    # Without the fallback the converter refuses the unknown fingerprint; the error says so in one sentence.
    with pytest.raises(ExportError) as caught:
        convert_to_gguf(
            tiny_model_dir,
            tmp_path / "refused.gguf",
            converter=converter,
            tokenizer=TokenizerCheck("bpe-known"),
            log_path=tmp_path / "convert.log",
        )
    assert "does not recognise this model's BPE tokenizer" in caught.value.message
    assert not (tmp_path / "refused.gguf").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_a_non_byte_level_unknown_bpe_is_refused_before_converting(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from engine.convert import check_tokenizer, find_converter

    folder = tmp_path / "whitespace-bpe"
    shutil.copytree(tiny_model_dir, folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ExportError) as caught:
        check_tokenizer(folder, find_converter())
    assert "not byte-level" in caught.value.message
    assert_one_sentence(caught.value)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(ExportError, match="has no tokenizer"):
        check_tokenizer(folder, find_converter())


def test_converter_failure_before_rename_leaves_no_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    from engine.convert import check_tokenizer, convert_to_gguf, find_converter

    def refuse() -> None:
        raise ExportError("stop here.")

    converter = find_converter()
    with pytest.raises(ExportError, match="stop here"):
        convert_to_gguf(
            tiny_model_dir,
            tmp_path / "f16.gguf",
            converter=converter,
            tokenizer=check_tokenizer(tiny_model_dir, converter),
            before_commit=refuse,
        )
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------
# Quantizing


def test_parse_quant_types() -> None:
    from engine.quantize import DEFAULT_QUANTS, parse_quant_types

    assert parse_quant_types(None) == list(DEFAULT_QUANTS)
    assert parse_quant_types("Q4_0, q5_1 q8_0,q4_0") == ["q4_0", "q5_1", "q8_0"]
    assert parse_quant_types("q4_k_m,q6_k") == ["q4_k_m", "q6_k"]
    with pytest.raises(ExportError, match="needs an importance matrix"):
        parse_quant_types("iq2_xxs")
    with pytest.raises(ExportError, match="not a quantization type"):
        parse_quant_types("q9_9")


@pytest.fixture(scope="module")
def tiny_f16(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.convert import check_tokenizer, convert_to_gguf, find_converter

    converter = find_converter()
    return convert_to_gguf(
        tiny_model_dir,
        tmp_path_factory.mktemp("f16") / "tiny-f16.gguf",
        converter=converter,
        tokenizer=check_tokenizer(tiny_model_dir, converter),
    )


@pytest.mark.parametrize("quant", ["q4_0", "q5_1", "q8_0", "q4_k_m"])
def test_quantize_writes_the_type_llama_cpp_reports(quant: str, tiny_f16: Path, tmp_path: Path) -> None:
    from engine.convert import read_gguf
    from engine.quantize import llama_file_report, quantize_gguf

    progress: list[tuple[int, int]] = []
    out = quantize_gguf(
        tiny_f16, tmp_path / f"tiny-{quant}.gguf", quant, on_progress=lambda a, b: progress.append((a, b))
    )
    report = llama_file_report(out)
    assert report["ftype_name"] == quant and report["desc"].startswith("llama ")
    assert read_gguf(out).file_type_name == quant
    assert progress and progress[-1][0] == progress[-1][1]


def llama_7b_weights(quant_type: str, output_type: str) -> dict[str, tuple[int, str]]:
    """A 7B Llama's 226 weight matrices (name → row length, type) as a GGUF of `quant_type` lists them."""
    weights = {"token_embd.weight": (4096, quant_type), "output.weight": (4096, output_type)}
    for layer in range(32):
        for part in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up"):
            weights[f"blk.{layer}.{part}.weight"] = (4096, quant_type)
        weights[f"blk.{layer}.ffn_down.weight"] = (11008, quant_type)
    return weights


def test_the_output_layer_llama_cpp_keeps_in_q6_k_is_a_note_not_a_row_length_warning() -> None:
    from engine.quantize import explain_tensor_types

    warnings, notes = explain_tensor_types(llama_7b_weights("q4_0", "q6_k"), "q4_0")
    assert warnings == []
    assert notes == [
        "output.weight is in q6_k: llama.cpp keeps the output layer at a higher precision by default"
    ]
    # A tied model's output layer is its token embeddings.
    tied = llama_7b_weights("q5_1", "q6_k")
    tied["token_embd.weight"] = tied.pop("output.weight")
    warnings, notes = explain_tensor_types(tied, "q5_1")
    assert warnings == [] and notes[0].startswith(
        "token_embd.weight is in q6_k: llama.cpp keeps the output layer"
    )
    # q8_0 keeps the output layer in q8_0: nothing to say.
    assert explain_tensor_types(llama_7b_weights("q8_0", "q8_0"), "q8_0") == ([], [])


def test_rows_that_do_not_divide_into_blocks_still_warn() -> None:
    from engine.quantize import explain_tensor_types

    weights = llama_7b_weights("q4_0", "q6_k")
    weights["blk.3.ffn_down.weight"] = (11000, "f16")
    weights["blk.4.ffn_down.weight"] = (11000, "f16")
    warnings, notes = explain_tensor_types(weights, "q4_0")
    assert warnings == [
        "2 of 226 weight tensors stay in f16 because their rows (11,000 weights) are not a multiple of q4_0's "
        "block of 32"
    ]
    assert len(notes) == 1 and notes[0].startswith("output.weight is in q6_k")
    # An output layer whose rows fit no block is a row-length problem too, not llama.cpp's choice.
    weights = llama_7b_weights("q4_0", "f16")
    weights["output.weight"] = (4100, "f16")
    warnings, notes = explain_tensor_types(weights, "q4_0")
    assert len(warnings) == 1 and "rows (4,100 weights)" in warnings[0] and notes == []


def test_a_k_quant_mix_is_a_note_and_its_rows_are_judged_by_256_blocks() -> None:
    from engine.quantize import explain_tensor_types

    weights = llama_7b_weights("q4_k", "q6_k")
    for layer in (0, 1, 2, 5, 8):
        weights[f"blk.{layer}.attn_v.weight"] = (4096, "q6_k")
        weights[f"blk.{layer}.ffn_down.weight"] = (11008, "q6_k")
    warnings, notes = explain_tensor_types(weights, "q4_k_m")
    assert warnings == []
    assert notes == [
        "output.weight is in q6_k: llama.cpp keeps the output layer at a higher precision by default",
        "10 of 226 weight tensors are in q6_k: q4_k_m is llama.cpp's mix that gives some layers more bits than "
        "q4_k",
    ]
    # Rows of 64 (the tiny test models) fit q4_0's blocks of 32 but not q4_k's of 256.
    tiny = {"output.weight": (64, "q8_0"), "blk.0.attn_q.weight": (64, "q5_0")}
    warnings, _ = explain_tensor_types(tiny, "q4_k_m")
    assert len(warnings) == 1 and "not a multiple of q4_k's block of 256" in warnings[0]


def test_quantize_failure_before_rename_leaves_no_file(tiny_f16: Path, tmp_path: Path) -> None:
    from engine.quantize import quantize_gguf

    def refuse() -> None:
        raise ExportError("stop here.")

    with pytest.raises(ExportError):
        quantize_gguf(tiny_f16, tmp_path / "q8.gguf", "q8_0", before_commit=refuse)
    assert list(tmp_path.iterdir()) == []


def test_stage_clock_reports_eta_from_progress() -> None:
    from engine.events import Progress
    from engine.export import StageClock

    class Sink:
        def __init__(self) -> None:
            self.events: list[Progress] = []

        def emit(self, event: Progress) -> None:
            self.events.append(event)

    sink = Sink()
    clock = StageClock(sink, min_interval=0.0)  # type: ignore[arg-type]
    with clock.stage("convert", total=4, estimate_s=30):
        clock.started -= 10  # pretend 10 s have passed
        clock.update(1, "a quarter")
    first, middle, last = sink.events
    assert first.eta_s is not None and 0 < first.eta_s <= 30
    assert middle.eta_s == pytest.approx(30, rel=0.05)  # 10 s for a quarter → 30 s left
    assert last.current == 4 and last.eta_s == 0.0
    assert clock.durations["convert"] >= 10
