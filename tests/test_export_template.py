"""One chat template from training to GGUF to Ollama: EOS/BOS fixes of converter inputs, the Modelfile."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from engine.template import DEFAULT_CHAT_TEMPLATE, render_prompt

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
TOOL_HEAVY = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"

SPECIALS = {
    "chatml": {"bos_token": "<s>", "eos_token": "<|im_end|>"},
    "smollm2": {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
    "zephyr": {"bos_token": "<s>", "eos_token": "</s>"},
    "gemma": {"bos_token": "<bos>", "eos_token": "<eos>"},
}
TEMPLATES = {
    "chatml": DEFAULT_CHAT_TEMPLATE,
    "smollm2": SMOLLM2,
    "llama3": LLAMA3,
    "zephyr": ZEPHYR,
    "gemma": GEMMA,
}
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
    ],
]


def render_go_template(template: str, messages: list[dict[str, str]]) -> str:
    """Render the Go template tunedeck writes (its fixed range/if shape) the way Ollama would."""
    match = re.fullmatch(
        r'\{\{ range \.Messages \}\}\{\{ if eq \.Role "system" \}\}(.*?)\{\{ \.Content \}\}(.*?)'
        r'\{\{ else if eq \.Role "user" \}\}(.*?)\{\{ \.Content \}\}(.*?)'
        r'\{\{ else if eq \.Role "assistant" \}\}(.*?)\{\{ \.Content \}\}(.*?)\{\{ end \}\}\{\{ end \}\}(.*)',
        template,
        re.DOTALL,
    )
    assert match, template
    sp, ss, up, us, ap, as_, generation = match.groups()
    parts = {"system": (sp, ss), "user": (up, us), "assistant": (ap, as_)}
    return "".join(parts[m["role"]][0] + m["content"] + parts[m["role"]][1] for m in messages) + generation


def _jinja(name: str, messages: list[dict[str, str]]) -> str:
    special = SPECIALS[name]
    return render_prompt(
        TEMPLATES[name], messages, bos_token=special["bos_token"], eos_token=special["eos_token"]
    )


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_ollama_template_builds_the_same_prompt_as_the_chat_template(name: str) -> None:
    from engine.convert import chat_format

    found = chat_format(TEMPLATES[name], SPECIALS[name])
    assert found is not None
    for messages in CONVERSATIONS:
        if name == "gemma" and messages[0]["role"] == "system":
            continue  # Gemma refuses a system turn; Ollama gets it as a user turn instead.
        if found.default_system and messages[0]["role"] != "system":
            # Ollama puts the Modelfile's SYSTEM first when the request has none.
            ollama_messages = [{"role": "system", "content": found.default_system}, *messages]
        else:
            ollama_messages = messages
        # BOS is the tokenizer's job in Ollama; the chat template writes it as text.
        assert found.bos + render_go_template(found.go_template(), ollama_messages) == _jinja(name, messages)


def test_default_system_prompt_becomes_the_modelfile_system() -> None:
    from engine.convert import chat_format

    found = chat_format(SMOLLM2, SPECIALS["smollm2"])
    assert found is not None
    assert found.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert found.system_prefix == "<|im_start|>system\n" and found.bos == ""


def test_a_template_that_is_not_per_message_is_not_translated() -> None:
    from engine.convert import chat_format
    from engine.export import build_modelfile

    assert chat_format(TOOL_HEAVY, SPECIALS["chatml"]) is None
    text, translated = build_modelfile(
        "m-q4_0.gguf",
        {
            "chat_template": TOOL_HEAVY,
            "eos_token": "<|im_end|>",
            "turn_end_token": "<|im_end|>",
            "bos_token": "",
        },
    )
    assert not translated and "TEMPLATE" not in text
    assert text.splitlines()[1] == "FROM ./m-q4_0.gguf" and 'PARAMETER stop "<|im_end|>"' in text


def test_modelfile_for_smollm2_has_system_template_and_stops() -> None:
    from engine.export import build_modelfile

    text, translated = build_modelfile(
        "demo-q4_0.gguf",
        {
            "chat_template": SMOLLM2,
            "eos_token": "<|im_end|>",
            "turn_end_token": "<|im_end|>",
            "bos_token": "<|im_start|>",
        },
    )
    assert translated
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|im_start|>"' in text


@pytest.mark.parametrize(
    ("name", "expected"),
    [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>"), ("zephyr", "</s>"), ("gemma", "<end_of_turn>")],
)
def test_turn_end_token(name: str, expected: str) -> None:
    from engine.convert import turn_end_token

    specials = [
        "<|im_end|>",
        "<|im_start|>",
        "<|eot_id|>",
        "</s>",
        "<end_of_turn>",
        "<|end_of_text|>",
        "<eos>",
    ]
    assert turn_end_token(TEMPLATES[name], SPECIALS[name], specials) == expected


def test_converter_inputs_make_the_turn_end_the_eos(tiny_model_dir: Path, tmp_path: Path) -> None:
    from engine.export import prepare_converter_inputs
    from engine.tiny import PHI3_CHAT_TEMPLATE, build_tiny_model

    folder = build_tiny_model(tmp_path / "phi3-like", arch="phi3")
    assert json.loads((folder / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"
    inputs = prepare_converter_inputs(folder)
    vocab = json.loads((folder / "tokenizer.json").read_text())
    end_id = next(t["id"] for t in vocab["added_tokens"] if t["content"] == "<|end|>")
    assert inputs["eos_token"] == "<|end|>" and inputs["eos_token_id"] == end_id
    assert any("EOS set to <|end|>" in change for change in inputs["changes"])
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|end|>" and config["chat_template"] == PHI3_CHAT_TEMPLATE
    assert config["add_bos_token"] is False
    assert json.loads((folder / "config.json").read_text())["eos_token_id"] == end_id
    assert (folder / "chat_template.jinja").read_text() == PHI3_CHAT_TEMPLATE


def test_converter_inputs_add_the_default_template_when_the_model_has_none(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from engine.export import prepare_converter_inputs

    folder = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, folder)
    inputs = prepare_converter_inputs(folder)
    assert inputs["chat_template"] == DEFAULT_CHAT_TEMPLATE
    assert "added the chat template training used" in inputs["changes"]
    assert inputs["eos_token"] == "<|im_end|>" and not inputs["template_writes_bos"]
    assert (folder / "chat_template.jinja").read_text() == DEFAULT_CHAT_TEMPLATE
