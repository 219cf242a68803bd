"""Tiny random-init models with a locally trained tokenizer, for tests and benchmarks that download nothing.

Hidden and intermediate sizes are multiples of 32 so llama.cpp quantizes every tensor.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

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


def train_tokenizer(
    out_dir: Path, corpus: Iterable[str] = (), vocab_size: int = 512, extra_special: Iterable[str] = ()
) -> None:
    """Train a byte-level BPE tokenizer on `corpus`; save it as a transformers fast tokenizer in `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS, *extra_special],
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


def train_sentencepiece_tokenizer(out_dir: Path, corpus: Iterable[str] = (), vocab_size: int = 512) -> None:
    """Train a Llama-2-style SentencePiece BPE model with byte fallback and save it as hub folders ship one:
    tokenizer.model beside the tokenizer.json and tokenizer_config.json transformers converts from it."""
    import io

    import sentencepiece
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    # Llama 2's settings: <unk> <s> </s> at ids 0-2, no pad token, a dummy prefix space, digits split, and
    # unknown characters spelled as byte tokens.
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([*BASE_CORPUS, *corpus] * 4),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    # transformers builds the fast tokenizer from tokenizer.model; saving writes tokenizer.json (and, being
    # transformers 5, no tokenizer.model, so the SentencePiece model written above stays the original).
    AutoTokenizer.from_pretrained(out_dir).save_pretrained(out_dir)


def corpus_from_jsonl(path: Path) -> list[str]:
    """Question and answer texts of a Q/A JSONL file, to make the tiny tokenizer fit the test data."""
    texts = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            texts += [str(row.get("question", "")), str(row.get("answer", ""))]
    return texts


# The architectures tiny_config builds: name → (transformers config class, extra settings). Every one is a
# family llama.cpp's converter maps, with attention heads of 16 dimensions and no tied tricks it cannot read.
TINY_ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": False}),
    "qwen3": ("Qwen3Config", {"head_dim": 16, "use_sliding_window": False}),
    "gemma3": (
        "Gemma3TextConfig",
        {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 512, "tie_word_embeddings": True},
    ),
    "phi3": ("Phi3Config", {"original_max_position_embeddings": 512}),
    "stablelm": ("StableLmConfig", {"partial_rotary_factor": 0.25}),
    # The converter reads GPT-2's context length from `n_ctx`, which newer configs no longer write by default.
    "gpt2": ("GPT2Config", {"n_ctx": 512}),
    "bloom": ("BloomConfig", {}),
}

# Converters that read a byte-level BPE tokenizer only when tokenizer_config.json names GPT2Tokenizer.
_GPT2_TOKENIZER_CLASS = ("phi3",)

# Phi-3: llama.cpp looks up its chat markers when loading the vocabulary, so the tiny tokenizer has them, and
# the model ships Phi-3's own template (its turns end with <|end|>, not the tokenizer's EOS).
PHI3_SPECIAL_TOKENS = ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def tiny_config(
    arch: str, vocab_size: int, *, hidden: int = 64, intermediate: int = 128, layers: int = 2, heads: int = 4
):
    """A random-init config of architecture `arch` (see TINY_ARCHITECTURES) with the given shape."""
    import transformers

    if arch not in TINY_ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_ARCHITECTURES)}")
    class_name, extra = TINY_ARCHITECTURES[arch]
    config_class = getattr(transformers, class_name)
    if arch == "gpt2":
        # llama.cpp reads GPT-2's MLP width as 4 × hidden (the converter ignores n_inner), like BLOOM's below.
        shape: dict[str, Any] = {"n_embd": hidden, "n_layer": layers, "n_head": heads, "n_positions": 512}
    elif arch == "bloom":
        # BLOOM's MLP is fixed at 4 × hidden, so `intermediate` does not apply.
        shape = {"hidden_size": hidden, "n_layer": layers, "n_head": heads}
    else:
        shape = {
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "max_position_embeddings": 512,
        }
    tie = extra.get("tie_word_embeddings", arch in ("gpt2", "bloom"))
    return config_class(
        vocab_size=vocab_size,
        bos_token_id=1,
        eos_token_id=4,
        pad_token_id=0,
        **shape,
        **{**extra, "tie_word_embeddings": tie},
    )


def build_tiny_model(
    out_dir: Path,
    *,
    arch: str = "llama",
    corpus: Iterable[str] = (),
    seed: int = 0,
    vocab_size: int = 512,
    chat_template: str | None = None,
    sentencepiece: bool = False,
) -> Path:
    """Write a tiny random-init model and its tokenizer (byte-level BPE, or with `sentencepiece` a Llama-2-style
    SentencePiece model) to `out_dir` (a Hugging Face folder) and return it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if sentencepiece:
        train_sentencepiece_tokenizer(out_dir, corpus, vocab_size)
    else:
        train_tokenizer(out_dir, corpus, vocab_size, PHI3_SPECIAL_TOKENS if arch == "phi3" else ())
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    if chat_template is None and arch == "phi3":
        chat_template = PHI3_CHAT_TEMPLATE
    if chat_template is not None:
        tokenizer.chat_template = chat_template
        tokenizer.save_pretrained(out_dir)
    if arch in _GPT2_TOKENIZER_CLASS:
        _set_tokenizer_class(out_dir, "GPT2Tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(out_dir)
    config = tiny_config(arch, len(tokenizer))
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir)
    return out_dir


def _set_tokenizer_class(out_dir: Path, name: str) -> None:
    """Name the tokenizer class in tokenizer_config.json (some converters dispatch on it)."""
    path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = name
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
