"""Export of a run over a SentencePiece base (as Llama 2 and Mistral v0.1 are), whose checkpoints lack
tokenizer.model because transformers 5 saves only tokenizer.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine.errors import ExportError

# The tiny recipe, shortened to two steps: the export only needs a checkpoint the trainer wrote. lm_head is
# left out because the trainer trains the rows of the chat tokens it adds to this base instead.
SHORT_RECIPE_CHANGES = (
    ("epochs = 80", "epochs = 2"),
    ("save_steps = 20", "save_steps = 2"),
    (', "lm_head"]', "]"),
)


def plenty_of_memory() -> int:
    return 1 << 40


@pytest.fixture(scope="module")
def sentencepiece_base(tmp_path_factory: pytest.TempPathFactory, tiny_qa_path: Path) -> Path:
    """A tiny random Llama with a SentencePiece BPE tokenizer with byte fallback and no chat template."""
    from engine.tiny import build_tiny_model, corpus_from_jsonl

    folder = tmp_path_factory.mktemp("sentencepiece-base") / "tiny-sp"
    return build_tiny_model(folder, corpus=corpus_from_jsonl(tiny_qa_path), sentencepiece=True)


@pytest.fixture(scope="module")
def sentencepiece_run(
    tmp_path_factory: pytest.TempPathFactory, sentencepiece_base: Path, tiny_qa_path: Path
) -> Path:
    """A two-step LoRA run over that base, trained by the real trainer (which adds the ChatML markers)."""
    from conftest import TINY_RECIPE, finish_run

    from engine.launch import start_run
    from engine.workspace import Workspace

    workspace = Workspace.init(tmp_path_factory.mktemp("sentencepiece-workspace"))
    shutil.copyfile(tiny_qa_path, workspace.datasets_dir / "tiny_qa.jsonl")
    recipe_text = TINY_RECIPE.format(model=sentencepiece_base)
    for old, new in SHORT_RECIPE_CHANGES:
        assert old in recipe_text, old
        recipe_text = recipe_text.replace(old, new)
    recipe = workspace.root / "recipes" / "tiny-sp.toml"
    recipe.parent.mkdir(exist_ok=True)
    recipe.write_text(recipe_text, encoding="utf-8")
    run_dir = workspace.runs_dir / start_run(workspace, recipe)
    summary = finish_run(run_dir, timeout=300)
    if summary.status != "finished":
        pytest.fail(f"run ended {summary.status}: {summary.cause} {summary.next_step} (see {run_dir})")
    return run_dir


def test_the_base_is_a_sentencepiece_model_and_the_checkpoint_saved_only_tokenizer_json(
    sentencepiece_base: Path, sentencepiece_run: Path
) -> None:
    from engine.convert import check_tokenizer, find_converter
    from engine.workspace import latest_checkpoint

    spec = json.loads((sentencepiece_base / "tokenizer.json").read_text(encoding="utf-8"))
    assert (sentencepiece_base / "tokenizer.model").is_file()
    assert spec["model"]["type"] == "BPE" and spec["model"]["byte_fallback"]
    checkpoint = latest_checkpoint(sentencepiece_run)
    assert checkpoint is not None
    assert (checkpoint / "tokenizer.json").is_file() and not (checkpoint / "tokenizer.model").exists()
    # On its own, the checkpoint's tokenizer.json is a BPE whose fingerprint llama.cpp does not know.
    with pytest.raises(ExportError, match="not byte-level"):
        check_tokenizer(checkpoint, find_converter())


def test_preflight_judges_the_base_sentencepiece_model_the_merged_folder_gets(
    sentencepiece_base: Path, sentencepiece_run: Path, tmp_path: Path
) -> None:
    from engine.export import ExportOptions, preflight
    from engine.workspace import latest_checkpoint

    plan = preflight(
        ExportOptions(run_dir=sentencepiece_run, out_dir=tmp_path / "export"), free_memory=plenty_of_memory
    )
    checkpoint = latest_checkpoint(sentencepiece_run)
    assert plan.tokenizer.kind == "sentencepiece"
    assert plan.tokenizer_files["tokenizer.model"] == sentencepiece_base / "tokenizer.model"
    # The checkpoint still defines the tokenizer: its chat template and the tokens training added.
    assert plan.tokenizer_files["tokenizer.json"] == checkpoint / "tokenizer.json"
    assert plan.tokenizer_files["tokenizer_config.json"] == checkpoint / "tokenizer_config.json"
    assert not (tmp_path / "export").exists()


def test_a_full_run_takes_tokenizer_model_from_the_model_it_started_from(
    sentencepiece_base: Path, sentencepiece_run: Path, tmp_path: Path
) -> None:
    from engine.export import ExportOptions, preflight
    from engine.workspace import latest_checkpoint

    # A full fine-tune's checkpoint: whole weights and the tokenizer.json the trainer saved, no adapter.
    workspace = shutil.copytree(sentencepiece_run.parent.parent, tmp_path / "workspace")
    run_dir = workspace / "runs" / sentencepiece_run.name
    checkpoint = latest_checkpoint(run_dir)
    assert checkpoint is not None
    for path in checkpoint.glob("adapter_*"):
        path.unlink()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy2(sentencepiece_base / name, checkpoint / name)
    plan = preflight(
        ExportOptions(run_dir=run_dir, out_dir=tmp_path / "export"), free_memory=plenty_of_memory
    )
    assert plan.method == "full" and plan.base_dir == checkpoint
    assert plan.tokenizer.kind == "sentencepiece"
    assert plan.tokenizer_files["tokenizer.model"] == sentencepiece_base / "tokenizer.model"


def test_a_base_sentencepiece_model_of_another_vocabulary_is_not_carried(
    sentencepiece_base: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from engine.export import plan_tokenizer_files

    checkpoint = tmp_path / "step_1"
    checkpoint.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tiny_model_dir / name, checkpoint / name)
    # A byte-level BPE checkpoint over a SentencePiece base: its tokenizer.model would give the GGUF the base's
    # pieces, not the vocabulary training used.
    assert "tokenizer.model" not in plan_tokenizer_files(checkpoint, [sentencepiece_base])


def test_export_converts_the_sentencepiece_vocabulary_with_the_tokens_training_added(
    sentencepiece_base: Path, sentencepiece_run: Path, tmp_path: Path
) -> None:
    import gguf
    import llama_cpp

    from engine.convert import read_gguf, tokenizer_json_tokens
    from engine.export import ExportOptions, run_export
    from engine.workspace import latest_checkpoint

    outputs = run_export(
        ExportOptions(run_dir=sentencepiece_run, out_dir=tmp_path / "export", quants=["q4_0"], parity=False),
        free_memory=plenty_of_memory,
    )
    merged = Path(outputs["merged"])
    assert (merged / "tokenizer.model").read_bytes() == (sentencepiece_base / "tokenizer.model").read_bytes()
    added = {
        text: index
        for index, text in tokenizer_json_tokens(
            latest_checkpoint(sentencepiece_run) / "tokenizer.json"
        ).items()
        if text in ("<|im_start|>", "<|im_end|>")
    }
    assert len(added) == 2
    f16 = Path(outputs["files"]["f16"])
    reader = gguf.GGUFReader(str(f16))
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    tokens = reader.fields["tokenizer.ggml.tokens"]
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    for text, index in added.items():
        # Not a [PAD…] placeholder: the chat markers the template writes are control tokens of the GGUF.
        assert tokens.contents(index) == text
        assert types[index] == gguf.TokenType.CONTROL
    for path in outputs["files"].values():
        info = read_gguf(Path(path))
        assert (info.eos_token, info.eos_token_id) == ("<|im_end|>", added["<|im_end|>"])
    llm = llama_cpp.Llama(str(f16), vocab_only=True, verbose=False)
    try:
        assert llm.tokenize(b"<|im_start|>", add_bos=False, special=True) == [added["<|im_start|>"]]
    finally:
        llm.close()
    report = json.loads(Path(outputs["report_json"]).read_text(encoding="utf-8"))
    assert report["converter"]["tokenizer"]["kind"] == "sentencepiece"
    assert any("<|im_end|>" in change for change in report["chat"]["changes"])


def test_the_gguf_splits_chat_prompts_as_the_trainer_did(sentencepiece_run: Path, tmp_path: Path) -> None:
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoTokenizer

    from engine.convert import read_gguf, sentencepiece_space_prefix
    from engine.export import ExportOptions, run_export
    from engine.generation import prompt_ids
    from engine.workspace import latest_checkpoint

    outputs = run_export(
        ExportOptions(run_dir=sentencepiece_run, out_dir=tmp_path / "export", quants=["q4_0"], parity=False),
        free_memory=plenty_of_memory,
    )
    # The trainer's tokenizer: the checkpoint's tokenizer.json (Metaspace, prepend_scheme "first").
    tokenizer = AutoTokenizer.from_pretrained(str(latest_checkpoint(sentencepiece_run)))
    conversation = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi there, what is 2+2?"},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "user and assistant words"},
    ]
    # llama.cpp has no "prefix only the first fragment" mode: text that opens a raw prompt (no special token
    # before it) now loses its `▁`; a ChatML prompt never starts that way.
    assert sentencepiece_space_prefix(Path(outputs["merged"])) is False
    for path in outputs["files"].values():
        info = read_gguf(Path(path))
        # What tunedeck's chat sends: llama-cpp-python renders the GGUF's template and tokenizes the text with
        # special tokens parsed and no BOS added (the template writes its own).
        formatter = Jinja2ChatFormatter(
            info.chat_template, eos_token=info.eos_token or "", bos_token=info.bos_token or ""
        )
        llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        try:
            for messages in (conversation[:2], conversation):
                rendered = formatter(messages=messages).prompt  # type: ignore[arg-type]
                assert rendered.startswith("<|im_start|>")
                expected = prompt_ids(tokenizer, messages)
                assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == expected
                got = llm.tokenize(rendered.encode(), add_bos=False, special=True)
                # Pieces first, for a readable diff: `▁user` after `<|im_start|>` is the mismatch to catch.
                assert tokenizer.convert_ids_to_tokens(got) == tokenizer.convert_ids_to_tokens(expected)
                assert got == expected, Path(path).name
        finally:
            llm.close()


def test_only_a_sentencepiece_model_that_prefixes_the_first_fragment_drops_the_space_prefix(
    sentencepiece_base: Path, tiny_model_dir: Path
) -> None:
    from engine.convert import sentencepiece_space_prefix

    assert sentencepiece_space_prefix(sentencepiece_base) is False
    # Byte-level BPE (no tokenizer.model) keeps whatever the converter writes.
    assert sentencepiece_space_prefix(tiny_model_dir) is None
