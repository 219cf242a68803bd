"""Text generation with a Hugging Face model: streamed replies for chat, greedy batches for accuracy checks.

Prompts are rendered with `tokenizer.apply_chat_template(add_generation_prompt=True)`, the template that
training used, and tokenized without extra special tokens, as training tokenizes them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from engine.errors import EngineError

Message = dict[str, str]

# End-of-turn markers of common chat templates; generation also stops on them when the vocabulary has them.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")

STOP_EOS = "eos"
STOP_LENGTH = "length"
STOP_STOPPED = "stopped"


class GenerationError(EngineError):
    """A reply could not be generated (the prompt does not fit, or the template cannot render it)."""

    default_title = "Generation failed"


@dataclasses.dataclass
class GenerationResult:
    """One finished reply: its text, how many tokens were generated, the decode speed and why it ended."""

    text: str
    tokens: int
    tokens_per_s: float
    stop_reason: str


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Token ids that end a reply: EOS of tokenizer and model plus end-of-turn markers in the vocabulary."""
    found: list[int] = []

    def add(value: Any) -> None:
        if value is None:
            return
        for token_id in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(token_id, int) and token_id >= 0 and token_id not in found:
                found.append(token_id)

    add(tokenizer.eos_token_id)
    generation_config = getattr(model, "generation_config", None)
    add(getattr(generation_config, "eos_token_id", None))
    vocabulary = tokenizer.get_vocab()
    special = set(getattr(tokenizer, "all_special_tokens", [])) | set(
        getattr(tokenizer, "added_tokens_encoder", {})
    )
    for marker in END_OF_TURN_TOKENS:
        # Only markers the tokenizer treats as special: a plain piece spelling "</s>" must not end a reply.
        if marker in vocabulary and marker in special:
            add(vocabulary[marker])
    return found


def _merge_system_into_first_user(messages: Sequence[Message]) -> list[Message]:
    """The conversation with its system text moved into the first user turn (for templates refusing one)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    for message in rest:
        if message["role"] == "user":
            message["content"] = f"{system}\n\n{message['content']}" if system else message["content"]
            break
    return rest


def render_prompt(tokenizer: Any, messages: Sequence[Message]) -> str:
    """The prompt text for `messages` with the assistant turn opened, by the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise GenerationError(
            "The tokenizer has no chat template, so prompts cannot be rendered the way training did.",
            next_step="Load the tokenizer with engine.modeling.load_tokenizer, (adds a default).",
        )
    try:
        return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    except Exception as exc:
        if any(m["role"] == "system" for m in messages):
            # Some templates (Gemma's, for one) raise on a system turn; fold it into the first question.
            try:
                return tokenizer.apply_chat_template(
                    _merge_system_into_first_user(messages), add_generation_prompt=True, tokenize=False
                )
            except Exception:
                pass
        raise GenerationError(
            f"The chat template could not render this conversation: {exc}.",
            next_step="Check that roles alternate user/assistant and that the chat template is valid.",
        ) from exc


def prompt_ids(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """Token ids of the rendered prompt; the template supplies BOS and other special tokens itself."""
    return list(tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"])


def context_length(model: Any, tokenizer: Any) -> int:
    """How many tokens (prompt plus reply) the model attends to."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", 0)
    # Tokenizers without a limit report a huge sentinel (1e30); fall back to a common default.
    return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else 2048


def fit_messages(
    messages: Sequence[Message], count_tokens: Callable[[Sequence[Message]], int], budget: int
) -> list[Message]:
    """The newest part of a conversation that fits `budget` tokens: system turn kept, oldest turns dropped."""
    system = [m for m in messages if m["role"] == "system"][:1]
    turns = [m for m in messages if m["role"] != "system"]
    while turns:
        candidate = [*system, *turns]
        if count_tokens(candidate) <= budget:
            return candidate
        # Drop the oldest turn and any assistant turn left in front, so the kept part opens with a question.
        turns = turns[1:]
        while turns and turns[0]["role"] == "assistant":
            turns = turns[1:]
    raise GenerationError(
        f"The last message alone is longer than the {budget} tokens the model can read.",
        next_step="Shorten the message or lower max_new_tokens.",
    )


class _FlagStop(StoppingCriteria):
    """Ends generation as soon as `should_stop()` turns true (checked once per generated token)."""

    def __init__(self, should_stop: Callable[[], bool]) -> None:
        self.should_stop = should_stop
        self.triggered = False

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        if self.should_stop():
            self.triggered = True
        return torch.full((input_ids.shape[0],), self.triggered, dtype=torch.bool, device=input_ids.device)


class _IncrementalDecoder(BaseStreamer):
    """Receives generated ids from `model.generate` and hands out complete text pieces as they form.

    A piece is released only once it no longer ends in a partial UTF-8 character, and each piece is decoded
    with the token before it so tokenizers that drop a leading space at a cut still produce the right text.
    """

    def __init__(
        self, tokenizer: Any, stop_ids: Sequence[int], on_text: Callable[[str], None] | None
    ) -> None:
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids)
        self.on_text = on_text
        self.ids: list[int] = []
        self.emitted = ""
        self._prefix_offset = 0
        self._read_offset = 0
        self._saw_prompt = False
        self.first_token_time: float | None = None
        self.ended_on_stop_token = False

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def put(self, value: torch.Tensor) -> None:
        """Take the next generated token (the first call carries the prompt, which is skipped)."""
        if not self._saw_prompt:
            self._saw_prompt = True
            return
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        for token_id in value.reshape(-1).tolist():
            if token_id in self.stop_ids:
                self.ended_on_stop_token = True
                return
            self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self.ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._send(new_text[len(prefix_text) :])
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)

    def end(self) -> None:
        """Release whatever text is still held back."""
        final = self.text()
        if final.startswith(self.emitted) and len(final) > len(self.emitted):
            self._send(final[len(self.emitted) :])

    def _send(self, piece: str) -> None:
        self.emitted += piece
        if self.on_text is not None:
            self.on_text(piece)

    def text(self) -> str:
        """The whole reply decoded at once (authoritative; the streamed pieces add up to it)."""
        return self._decode(self.ids)


def _generation_config(
    *, max_new_tokens: int, temperature: float, top_p: float, stop_ids: list[int], pad_id: int | None
) -> GenerationConfig:
    """A complete generation config, so a model's shipped defaults (penalties, top_k) cannot sway replies."""
    sampling = temperature > 0
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=None,
        eos_token_id=stop_ids or None,
        pad_token_id=pad_id if pad_id is not None else (stop_ids[0] if stop_ids else None),
    )


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


@torch.inference_mode()
def generate(
    model: Any,
    tokenizer: Any,
    messages: Sequence[Message],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    on_text: Callable[[str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GenerationResult:
    """Answer the conversation `messages`, streaming pieces of text to `on_text`; greedy at temperature 0."""
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be at least 1, not {max_new_tokens}.")
    stop_ids = stop_token_ids(model, tokenizer)
    ids = prompt_ids(tokenizer, messages)
    room = context_length(model, tokenizer) - len(ids)
    if room < 1:
        raise GenerationError(
            f"The prompt is {len(ids)} tokens, more than the model's context of "
            f"{context_length(model, tokenizer)} tokens.",
            next_step="Start a new conversation or shorten the messages.",
        )
    max_new_tokens = min(max_new_tokens, room)
    flag = _FlagStop(should_stop or (lambda: False))
    decoder = _IncrementalDecoder(tokenizer, stop_ids, on_text)
    device = _model_device(model)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    config = _generation_config(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        stop_ids=stop_ids,
        pad_id=tokenizer.pad_token_id,
    )
    started = time.perf_counter()
    if flag.should_stop():
        return GenerationResult(text="", tokens=0, tokens_per_s=0.0, stop_reason=STOP_STOPPED)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        generation_config=config,
        stopping_criteria=StoppingCriteriaList([flag]),
        streamer=decoder,
    )
    elapsed = time.perf_counter() - started
    generated = int(output.shape[-1]) - len(ids)
    if decoder.ended_on_stop_token:
        stop_reason = STOP_EOS
    elif flag.triggered:
        stop_reason = STOP_STOPPED
    else:
        stop_reason = STOP_LENGTH
    return GenerationResult(
        text=decoder.text(),
        tokens=generated,
        tokens_per_s=generated / elapsed if elapsed > 0 else 0.0,
        stop_reason=stop_reason,
    )


@torch.inference_mode()
def generate_batch(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[Sequence[Message]],
    max_new_tokens: int = 128,
    *,
    batch_size: int = 8,
) -> list[str]:
    """Greedy replies to many conversations, in their order, from left-padded batches of similar lengths."""
    stop_ids = stop_token_ids(model, tokenizer)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids[0] if stop_ids else 0)
    )
    encoded = [prompt_ids(tokenizer, conversation) for conversation in conversations]
    limit = context_length(model, tokenizer)
    device = _model_device(model)
    config = _generation_config(
        max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, stop_ids=stop_ids, pad_id=pad_id
    )
    # Sorting by length keeps padding (wasted compute) small; answers are put back in the callers' order.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(encoded)
    for start in range(0, len(order), max(1, batch_size)):
        chunk = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in chunk)
        if width >= limit:
            raise GenerationError(
                f"A prompt is {width} tokens, more than the model's context of {limit} tokens.",
                next_step="Shorten the questions used for the check.",
            )
        rows = [[pad_id] * (width - len(encoded[i])) + encoded[i] for i in chunk]
        masks = [[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in chunk]
        input_ids = torch.tensor(rows, dtype=torch.long, device=device)
        attention_mask = torch.tensor(masks, dtype=torch.long, device=device)
        config.max_new_tokens = min(max_new_tokens, limit - width)
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        for row, index in zip(output[:, width:].tolist(), chunk, strict=True):
            cut = next((pos for pos, token_id in enumerate(row) if token_id in stop_ids), len(row))
            answers[index] = tokenizer.decode(
                row[:cut], skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
    return answers
