"""The one chat-template renderer used by training, chat, export and the TUI: all see the same prompt.

Pure: standard library, jinja2 and tokenizers only (the TUI imports it to show rendered prompts and counts).
Rendering follows transformers' `apply_chat_template`: a sandboxed Jinja environment with trim_blocks,
lstrip_blocks, `raise_exception`, `strftime_now` and a `tojson` filter that keeps non-ASCII text.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.errors import ModelError

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# ChatML, the default for models that ship no template; `<|im_end|>` closes every turn and is the EOS.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_JSON_FILE = "chat_template.json"

# The label value that excludes a token from the loss (PyTorch's cross-entropy ignore_index).
IGNORE_INDEX = -100


class QAPairLike(Protocol):
    """What the renderer needs of a dataset row (engine.dataset.QAPair has these attributes)."""

    question: str
    answer: str


def _pair_system(pair: Any) -> str:
    return str(getattr(pair, "system", "") or "")


class _GenerationTag(Extension):
    """Accepts `{% generation %}…{% endgeneration %}` (assistant-mask templates) and renders the body."""

    tags = frozenset({"generation"})

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    """Compile a chat template once; raises ModelError naming the syntax problem."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ModelError(
            f"The chat template has a syntax error on line {exc.lineno}: {exc.message}.",
            next_step="Fix model.chat_template in the recipe, or the model's tokenizer_config.json.",
        ) from None


def render_prompt(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    **extra: Any,
) -> str:
    """Render `messages` with a chat template, as transformers' apply_chat_template(tokenize=False) would."""
    compiled = compile_template(template or DEFAULT_CHAT_TEMPLATE)
    try:
        return compiled.render(
            # Like transformers, drop None-valued keys: templates test for a key's presence, not for None.
            messages=[{k: v for k, v in message.items() if v is not None} for message in messages],
            tools=None,
            documents=None,
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
            **extra,
        )
    except jinja2.exceptions.TemplateError as exc:
        raise ModelError(
            f"The chat template refused these messages: {exc}.",
            next_step="Check which roles (system, user, assistant) it accepts, or set model.chat_template.",
        ) from None


def pair_messages(
    pair: QAPairLike, system_prompt: str = "", *, with_answer: bool = True
) -> list[dict[str, str]]:
    """The chat messages of a Q/A pair; the row's own system text wins over the recipe's system prompt."""
    system = _pair_system(pair) or system_prompt
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": pair.question})
    if with_answer:
        messages.append({"role": "assistant", "content": pair.answer})
    return messages


def split_training_text(
    template: str,
    pair: QAPairLike,
    system_prompt: str = "",
    *,
    bos_token: str = "",
    eos_token: str = "",
    **extra: Any,
) -> tuple[str, str]:
    """Split a pair's rendered conversation into the prompt (masked) and completion (trained) texts.

    The prompt is the conversation up to and including the assistant header the template adds for generation;
    the completion is the rest: the answer, the end-of-turn marker and EOS as the template writes them, with
    EOS appended when the template does not emit it, so a trained model learns to stop.
    """
    prompt = render_prompt(
        template,
        pair_messages(pair, system_prompt, with_answer=False),
        bos_token=bos_token,
        eos_token=eos_token,
        add_generation_prompt=True,
        **extra,
    )
    full = render_prompt(
        template,
        pair_messages(pair, system_prompt),
        bos_token=bos_token,
        eos_token=eos_token,
        add_generation_prompt=False,
        **extra,
    )
    if full.startswith(prompt):
        completion = full[len(prompt) :]
    else:
        # Templates that render the last turn differently once it is answered (some strip reasoning blocks)
        # still put the answer after the prompt's common prefix; train from the answer onwards.
        start = full.find(pair.answer, _common_prefix_length(prompt, full))
        if start < 0:
            raise ModelError(
                "The chat template does not write the assistant's answer into the conversation.",
                next_step="Use a chat template that renders assistant messages, or set model.chat_template.",
            )
        prompt, completion = full[:start], full[start:]
    if eos_token and eos_token not in completion:
        completion += eos_token
    return prompt, completion


def _common_prefix_length(first: str, second: str) -> int:
    length = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        length += 1
    return length


class MaskedToken(NamedTuple):
    """One token of a rendered training example: its text and whether the loss trains on it."""

    text: str
    trained: bool


@dataclasses.dataclass
class EncodedPair:
    """Token ids of one training example; `labels` is IGNORE_INDEX on prompt tokens."""

    input_ids: list[int]
    labels: list[int]
    prompt_tokens: int
    truncated: bool = False

    @property
    def trained_tokens(self) -> int:
        """How many tokens the loss trains on."""
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


class _Encoder(Protocol):
    def encode(self, sequence: str, add_special_tokens: bool = True) -> Any: ...


def _special_token_text(value: Any) -> str:
    # tokenizer_config.json stores special tokens as text or as AddedToken dicts ({"content": ...}).
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return str(value or "")


def _select_named_template(value: Any) -> str:
    # A list of {"name", "template"} entries: the "default" one renders chats.
    if isinstance(value, list):
        named = {
            str(entry.get("name")): str(entry.get("template", ""))
            for entry in value
            if isinstance(entry, dict)
        }
        return named.get("default", next(iter(named.values()), ""))
    return str(value or "")


def read_chat_template(model_dir: Path) -> str:
    """The chat template a model folder ships (chat_template.jinja or tokenizer_config.json), or ''."""
    model_dir = Path(model_dir)
    jinja_file = model_dir / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    json_file = model_dir / CHAT_TEMPLATE_JSON_FILE
    if json_file.is_file():
        return _select_named_template(json.loads(json_file.read_text(encoding="utf-8")).get("chat_template"))
    config_file = model_dir / TOKENIZER_CONFIG_FILE
    if config_file.is_file():
        return _select_named_template(
            json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
        )
    return ""


class PromptRenderer:
    """Renders and tokenizes Q/A pairs exactly as training does, for token counts and masked-prompt views."""

    def __init__(
        self,
        tokenizer: _Encoder,
        chat_template: str = "",
        *,
        bos_token: str = "",
        eos_token: str = "",
        system_prompt: str = "",
        special_tokens: Mapping[str, str] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template or DEFAULT_CHAT_TEMPLATE
        self.uses_default_template = not chat_template
        self.bos_token = bos_token
        self.eos_token = IM_END if self.uses_default_template else eos_token
        self.system_prompt = system_prompt
        self.special_tokens = {
            k: v for k, v in (special_tokens or {}).items() if k not in ("bos_token", "eos_token")
        }

    @classmethod
    def from_model_dir(
        cls, path: Path, *, fallback_template: str = "", system_prompt: str = ""
    ) -> PromptRenderer:
        """A renderer for a model folder (tokenizer.json + tokenizer_config.json), using `fallback_template`
        (else ChatML) when the folder ships no chat template."""
        from tokenizers import Tokenizer

        path = Path(path)
        tokenizer_file = path / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise ModelError(
                f"{path} has no {TOKENIZER_FILE}, so its prompts cannot be counted.",
                next_step="Point model.base at a Hugging Face folder with a fast tokenizer (tokenizer.json).",
            )
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        config_file = path / TOKENIZER_CONFIG_FILE
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        special = {
            key: _special_token_text(config.get(key))
            for key in ("bos_token", "eos_token", "unk_token", "pad_token")
            if config.get(key)
        }
        return cls(
            tokenizer,
            read_chat_template(path) or fallback_template,
            bos_token=special.get("bos_token", ""),
            eos_token=special.get("eos_token", ""),
            system_prompt=system_prompt,
            special_tokens=special,
        )

    def texts(self, pair: QAPairLike) -> tuple[str, str]:
        """The (prompt, completion) texts of a pair."""
        return split_training_text(
            self.chat_template,
            pair,
            self.system_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **self.special_tokens,
        )

    def render(self, pair: QAPairLike) -> str:
        """The whole training text of a pair: prompt then completion."""
        prompt, completion = self.texts(pair)
        return prompt + completion

    def render_generation_prompt(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """The prompt a chat model is given to write the next assistant turn."""
        return render_prompt(
            self.chat_template,
            messages,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            add_generation_prompt=True,
            **self.special_tokens,
        )

    def _tokens(self, pair: QAPairLike) -> tuple[str, list[int], list[tuple[int, int]], int]:
        prompt, completion = self.texts(pair)
        text = prompt + completion
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        return text, list(encoding.ids), [tuple(span) for span in encoding.offsets], len(prompt)

    def encode(self, pair: QAPairLike, max_length: int | None = None) -> EncodedPair:
        """Token ids and labels of a pair; a token is trained when it starts inside the completion.

        Longer than `max_length`: the completion is cut to fit (`truncated` is set); a prompt that alone
        fills `max_length` leaves nothing to train, which the caller reports.
        """
        _, ids, offsets, boundary = self._tokens(pair)
        prompt_tokens = sum(1 for start, _ in offsets if start < boundary)
        labels = [IGNORE_INDEX if index < prompt_tokens else token for index, token in enumerate(ids)]
        truncated = max_length is not None and len(ids) > max_length
        if truncated:
            ids, labels = ids[:max_length], labels[:max_length]
        return EncodedPair(ids, labels, prompt_tokens=min(prompt_tokens, len(ids)), truncated=truncated)

    def count(self, pair: QAPairLike) -> int:
        """Prompt plus completion tokens of a pair (what data.max_length limits)."""
        return len(self._tokens(pair)[1])

    def trained_mask(self, pair: QAPairLike) -> list[MaskedToken]:
        """Each token's text with whether it is trained; the texts join back into the rendered example."""
        text, _, offsets, boundary = self._tokens(pair)
        starts = [start for start, _ in offsets]
        tokens = []
        for index, start in enumerate(starts):
            # Slice from this token's start to the next one's, so whitespace the offsets trim is not lost.
            begin = 0 if index == 0 else start
            end = starts[index + 1] if index + 1 < len(starts) else len(text)
            tokens.append(MaskedToken(text[begin:end], start >= boundary))
        return tokens
