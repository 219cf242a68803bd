"""Tiny random-init models with a locally trained tokenizer, for tests and benchmarks that must not download weights.

Hidden and intermediate sizes are multiples of 32 so llama.cpp quantizes every tensor.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<unk>"]

BASE_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "tunedeck trains a lora adapter on your questions and answers",
    "what is the capital of france? paris is the capital of france.",
    "how do i resume a run? use tunedeck train --resume with the run id.",
    "export writes gguf files in q4_0 q5_1 and q8_0 for llama.cpp and ollama.",
    "system user assistant question answer hello world 0 1 2 3 4 5 6 7 8 9",
    "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z . , ! ? : ; ' \" ( ) - _ / = + *",
]


def train_tokenizer(out_dir: Path, corpus: Iterable[str] = (), vocab_size: int = 512) -> None:
    """Train a byte-level BPE tokenizer on `corpus` and save it as a transformers fast tokenizer in `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [*BASE_CORPUS, *corpus]
    tokenizer.train_from_iterator(lines * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.save_pretrained(out_dir)


def corpus_from_jsonl(path: Path) -> list[str]:
    """Question and answer texts of a Q/A JSONL file, to make the tiny tokenizer fit the test data."""
    texts = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            texts += [str(row.get("question", "")), str(row.get("answer", ""))]
    return texts


def tiny_config(arch: str, vocab_size: int, *, hidden: int = 64, intermediate: int = 128, layers: int = 2,
                heads: int = 4):  # noqa: ANN201 - a transformers config
    """A random-init config of architecture `arch` (llama by default) with the given shape."""
    from transformers import LlamaConfig

    if arch != "llama":
        raise ValueError(f"unknown tiny architecture {arch!r}")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=4,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def build_tiny_model(out_dir: Path, *, arch: str = "llama", corpus: Iterable[str] = (), seed: int = 0,
                     vocab_size: int = 512, chat_template: str | None = None) -> Path:
    """Write a tiny random-init model and its tokenizer to `out_dir` (a Hugging Face folder) and return it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_tokenizer(out_dir, corpus, vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
        tokenizer.save_pretrained(out_dir)
    config = tiny_config(arch, len(tokenizer))
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir)
    return out_dir
