"""The pure chat-template renderer: rendering, prompt/answer splits, masks, and parity with transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.dataset import QAPair
from engine.errors import ModelError
from engine.template import (
    DEFAULT_CHAT_TEMPLATE,
    IGNORE_INDEX,
    IM_END,
    PromptRenderer,
    read_chat_template,
    render_prompt,
    split_training_text,
)

PAIRS = [
    QAPair("What is the capital of France?", "Paris is the capital of France."),
    QAPair("hello  there\n", " an answer with  spaces ", system="Be brief."),
    QAPair("é ü 日本 — emoji 🙂?", "ok\n\nyes 🙂"),
    QAPair("Multi\nline\nquestion", "Line one.\nLine two."),
]

# A template without end-of-turn tokens, as some base models ship.
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def test_default_template_renders_chatml() -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    text = render_prompt(DEFAULT_CHAT_TEMPLATE, messages)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt("", messages, add_generation_prompt=False).endswith("Q<|im_end|>\n")


def test_template_errors_are_model_errors() -> None:
    with pytest.raises(ModelError, match="refused"):
        render_prompt(
            "{{ raise_exception('only user and assistant roles') }}", [{"role": "user", "content": "q"}]
        )
    with pytest.raises(ModelError, match="syntax error on line 1"):
        render_prompt("{% for m in messages %}", [{"role": "user", "content": "q"}])


def test_generation_tag_and_tojson_like_transformers() -> None:
    template = (
        "{% for m in messages %}{% generation %}{{ m['content'] | tojson }}{% endgeneration %}{% endfor %}"
    )
    assert render_prompt(template, [{"role": "user", "content": "é"}]) == '"é"'


def test_split_training_text_prompt_then_answer_and_end_of_turn() -> None:
    pair = PAIRS[0]
    prompt, completion = split_training_text(DEFAULT_CHAT_TEMPLATE, pair, eos_token=IM_END)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert completion == "Paris is the capital of France.<|im_end|>\n"
    full = render_prompt(
        DEFAULT_CHAT_TEMPLATE,
        [{"role": "user", "content": pair.question}, {"role": "assistant", "content": pair.answer}],
        add_generation_prompt=False,
    )
    assert prompt + completion == full


def test_split_appends_eos_when_the_template_does_not_end_the_turn() -> None:
    prompt, completion = split_training_text(PLAIN_TEMPLATE, PAIRS[0], eos_token="</s>")
    assert prompt.endswith("assistant: ")
    assert completion == "Paris is the capital of France.\n</s>"


def test_row_system_prompt_wins_over_recipe_system_prompt() -> None:
    prompt, _ = split_training_text(DEFAULT_CHAT_TEMPLATE, PAIRS[1], "Recipe system.")
    assert "Be brief." in prompt and "Recipe system." not in prompt
    prompt, _ = split_training_text(DEFAULT_CHAT_TEMPLATE, PAIRS[0], "Recipe system.")
    assert prompt.startswith("<|im_start|>system\nRecipe system.<|im_end|>")


def test_read_chat_template_sources(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}
        )
    )
    assert read_chat_template(tmp_path) == "D"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert read_chat_template(tmp_path) == "J"
    assert read_chat_template(tmp_path / "missing") == ""


def test_renderer_counts_masks_and_truncates(tiny_model_dir: Path) -> None:
    renderer = PromptRenderer.from_model_dir(tiny_model_dir)
    assert renderer.uses_default_template and renderer.eos_token == IM_END
    for pair in PAIRS:
        encoded = renderer.encode(pair)
        mask = renderer.trained_mask(pair)
        assert renderer.count(pair) == len(encoded.input_ids) == len(mask)
        assert "".join(token.text for token in mask) == renderer.render(pair)
        trained_text = "".join(token.text for token in mask if token.trained)
        assert trained_text.startswith(pair.answer.strip()[:3]) or trained_text.lstrip().startswith(
            pair.answer.strip()[:3]
        )
        assert IM_END in trained_text and pair.question.strip()[:5] not in trained_text
        assert [label == IGNORE_INDEX for label in encoded.labels] == [not token.trained for token in mask]
    cut = renderer.encode(PAIRS[0], max_length=renderer.count(PAIRS[0]) - 3)
    assert cut.truncated and len(cut.input_ids) == renderer.count(PAIRS[0]) - 3
    assert cut.labels[: cut.prompt_tokens] == [IGNORE_INDEX] * cut.prompt_tokens and cut.trained_tokens > 0


def test_renderer_refuses_a_folder_without_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"tokenizer\.json"):
        PromptRenderer.from_model_dir(tmp_path)


def _assert_parity_with_transformers(model_dir: Path) -> None:
    from engine.modeling import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    renderer = PromptRenderer.from_model_dir(model_dir)
    assert renderer.chat_template == tokenizer.chat_template
    for pair in PAIRS:
        messages = [{"role": "system", "content": pair.system}] if pair.system else []
        messages += [{"role": "user", "content": pair.question}]
        prompt_ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        full_ids = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": pair.answer}], tokenize=True, return_dict=False
        )
        encoded = renderer.encode(pair)
        assert encoded.input_ids == full_ids, pair
        assert encoded.prompt_tokens == len(prompt_ids) and full_ids[: len(prompt_ids)] == prompt_ids
        assert renderer.render_generation_prompt(messages) == tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )


def test_token_ids_match_apply_chat_template_on_the_tiny_tokenizer(tiny_model_dir: Path) -> None:
    _assert_parity_with_transformers(tiny_model_dir)


def test_token_ids_match_apply_chat_template_on_the_demo_tokenizer(demo_model_dir: Path) -> None:
    _assert_parity_with_transformers(demo_model_dir)
