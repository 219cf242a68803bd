"""Model and tokenizer loading rules: chat-template fallbacks, added ChatML tokens, inference loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.errors import ModelError
from engine.template import DEFAULT_CHAT_TEMPLATE, IM_END, IM_START


@pytest.fixture(scope="module")
def bare_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose tokenizer has neither a chat template nor ChatML tokens (like a raw base model)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("bare") / "bare"
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(["user assistant system hello world the sky is blue"] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_default_template_adds_chatml_tokens_and_makes_im_end_the_eos(bare_model_dir: Path) -> None:
    from engine.modeling import ADDED_TOKEN_IDS_ATTR, load_model, load_tokenizer
    from engine.recipes import recipe_from_dict

    tokenizer = load_tokenizer(bare_model_dir)
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    assert tokenizer.eos_token == IM_END and tokenizer.pad_token is not None
    added = getattr(tokenizer, ADDED_TOKEN_IDS_ATTR)
    assert added == tokenizer.convert_tokens_to_ids([IM_START, IM_END])
    ids = tokenizer("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == added[0] and ids[-1] == added[1]  # each marker is one token
    recipe = recipe_from_dict(
        {
            "model": {"base": str(bare_model_dir), "dtype": "float32"},
            "train": {"method": "lora", "device": "cpu"},
            "lora": {"r": 4, "alpha": 8},
        }
    )
    model = load_model(str(bare_model_dir), recipe, tokenizer, device="cpu")
    assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer)
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    assert any("trainable_tokens" in name and "embed_tokens" in name for name in trainable)
    assert any("trainable_tokens" in name and "lm_head" in name for name in trainable)
    assert IM_END and model.generation_config.eos_token_id[0] == tokenizer.convert_tokens_to_ids(IM_END)


def test_recipe_chat_template_is_used_when_the_model_has_none(bare_model_dir: Path) -> None:
    from engine.modeling import load_tokenizer

    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer = load_tokenizer(bare_model_dir, chat_template=template)
    assert tokenizer.chat_template == template and tokenizer.eos_token == "</s>"


def test_model_folder_checks_name_the_problem(tmp_path: Path, bare_model_dir: Path) -> None:
    from engine.modeling import check_model_folder

    with pytest.raises(ModelError, match="does not exist"):
        check_model_folder(tmp_path / "absent")
    (tmp_path / "no-config").mkdir()
    with pytest.raises(ModelError, match=r"no config\.json"):
        check_model_folder(tmp_path / "no-config")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (pickled / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(ModelError, match=r"no \.safetensors weights"):
        check_model_folder(pickled)
    check_model_folder(bare_model_dir)


def test_load_for_inference_of_a_base_model(tiny_model_dir: Path) -> None:
    from engine.modeling import load_for_inference

    model, tokenizer = load_for_inference(str(tiny_model_dir), device="cpu")
    assert not model.training and tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    assert tokenizer.convert_tokens_to_ids(IM_END) in model.generation_config.eos_token_id


def test_answer_window_gives_the_same_loss_and_gradients(tiny_model_dir: Path) -> None:
    import torch
    from conftest import TINY_QA
    from transformers import AutoModelForCausalLM

    from engine.dataset import QAPair
    from engine.modeling import load_tokenizer, renderer_for
    from engine.train import PadCollator, accepts_logits_to_keep, answer_window

    renderer = renderer_for(load_tokenizer(tiny_model_dir))
    features = [renderer.encode(QAPair(**row)) for row in TINY_QA]
    batch = PadCollator(0)([{"input_ids": f.input_ids, "labels": f.labels} for f in features])
    windowed = answer_window(batch)
    assert 0 < windowed["logits_to_keep"] < batch["input_ids"].shape[1]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert accepts_logits_to_keep(model)
    results = []
    for inputs in (batch, windowed):
        model.zero_grad()
        loss = model(**inputs).loss
        loss.backward()
        results.append((loss.item(), model.model.layers[0].mlp.up_proj.weight.grad.clone()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)
