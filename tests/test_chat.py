"""The chat engine: generation helpers in-process, and the real `python -m engine.chat` over its protocol."""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.chat import RequestError, parse_request
from engine.events import (
    AdapterSwapped,
    ChatReady,
    Event,
    Log,
    ReplyDone,
    RunFailed,
    Token,
    parse_event,
)

REPO_ROOT = Path(__file__).resolve().parent.parent

# Two adapters over the same tiny base: A learns the right answers, B the same questions with swapped answers.
QUESTIONS = ["What is the capital of France?", "How many legs does a cat have?"]
ANSWERS_A = ["Paris is the capital of France.", "A cat has four legs."]
ANSWERS_B = list(reversed(ANSWERS_A))
TIMEOUT_S = 90.0


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _train_adapter(model_dir: Path, answers: list[str], out_dir: Path, steps: int = 40) -> Path:
    """Memorise QUESTIONS → `answers` with a small LoRA (seconds on a CPU) and save a checkpoint folder."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from engine.modeling import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    rows = []
    for question, answer in zip(QUESTIONS, answers, strict=True):
        prompt = tokenizer.apply_chat_template(_user(question), add_generation_prompt=True, tokenize=False)
        conversation = [*_user(question), {"role": "assistant", "content": answer}]
        full = tokenizer.apply_chat_template(conversation, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        rows.append((full_ids, [-100] * len(prompt_ids) + full_ids[len(prompt_ids) :]))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows])
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    threads = torch.get_num_threads()
    # One thread: matrices this small gain nothing from more, and a busy shared CPU makes extra threads crawl.
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        # A random-init output layer is too weak to memorise through attention and MLP adapters alone.
        modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
        model = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=modules)
        )
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
        model.train()
        for _ in range(steps):
            model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.save_pretrained(out_dir)
    finally:
        torch.set_num_threads(threads)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """Adapter checkpoints A (right answers) and B (swapped answers) over the tiny model."""
    root = tmp_path_factory.mktemp("chat-adapters")
    return {
        "A": _train_adapter(tiny_model_dir, ANSWERS_A, root / "A"),
        "B": _train_adapter(tiny_model_dir, ANSWERS_B, root / "B"),
    }


@pytest.fixture(scope="module")
def model_a(tiny_model_dir: Path, adapters: dict[str, Path]) -> tuple[Any, Any]:
    """Base plus adapter A, loaded in this process the way the chat engine loads it."""
    from engine.modeling import load_for_inference

    return load_for_inference(tiny_model_dir, adapters["A"], device="cpu")


# Generation helpers (in-process)


def test_generate_streams_the_trained_answer_and_stops_at_end_of_turn(model_a: tuple[Any, Any]) -> None:
    from engine.generation import generate

    model, tokenizer = model_a
    pieces: list[str] = []
    result = generate(model, tokenizer, _user(QUESTIONS[0]), max_new_tokens=40, on_text=pieces.append)
    assert result.text == ANSWERS_A[0]
    assert "".join(pieces) == result.text
    assert len(pieces) > 1
    assert result.stop_reason == "eos"
    assert 0 < result.tokens < 40
    assert result.tokens_per_s > 0


def test_generate_reports_length_and_stopped(model_a: tuple[Any, Any]) -> None:
    from engine.generation import generate

    model, tokenizer = model_a
    cut = generate(model, tokenizer, _user(QUESTIONS[0]), max_new_tokens=3)
    assert (cut.stop_reason, cut.tokens) == ("length", 3)
    assert ANSWERS_A[0].startswith(cut.text)
    pieces: list[str] = []
    stopped = generate(
        model,
        tokenizer,
        _user(QUESTIONS[0]),
        max_new_tokens=40,
        on_text=pieces.append,
        should_stop=lambda: len(pieces) >= 2,
    )
    # The token in flight when the flag turns may still arrive; nothing after it does.
    assert stopped.stop_reason == "stopped"
    assert 2 <= len(pieces) <= 3
    assert stopped.tokens == len(pieces)
    assert ANSWERS_A[0].startswith(stopped.text)


def test_sampling_with_a_seed_is_repeatable_and_differs_from_greedy(model_a: tuple[Any, Any]) -> None:
    import torch

    from engine.generation import generate

    model, tokenizer = model_a
    texts = []
    for _ in range(2):
        torch.manual_seed(7)
        texts.append(generate(model, tokenizer, _user("hello"), max_new_tokens=12, temperature=5.0).text)
    assert texts[0] == texts[1]
    with model.disable_adapter():
        greedy = generate(model, tokenizer, _user("hello"), max_new_tokens=12).text
        torch.manual_seed(7)
        sampled = generate(model, tokenizer, _user("hello"), max_new_tokens=12, temperature=5.0).text
    assert sampled != greedy


def test_generate_batch_matches_one_by_one_greedy_answers(model_a: tuple[Any, Any]) -> None:
    from engine.generation import generate, generate_batch

    model, tokenizer = model_a
    # Prompts of different lengths, so the batch is left-padded.
    conversations = [
        _user(QUESTIONS[0]),
        _user("hi"),
        [{"role": "system", "content": "You answer briefly and only about geography."}, *_user(QUESTIONS[1])],
        _user(QUESTIONS[1]),
    ]
    singles = [generate(model, tokenizer, c, max_new_tokens=16).text for c in conversations]
    assert generate_batch(model, tokenizer, conversations, max_new_tokens=16, batch_size=3) == singles
    assert singles[0] == ANSWERS_A[0] and singles[3] == ANSWERS_A[1]


def test_fit_messages_drops_the_oldest_turns_and_keeps_the_system_prompt() -> None:
    from engine.generation import GenerationError, fit_messages

    conversation = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u1 " * 10},
        {"role": "assistant", "content": "a1 " * 10},
        {"role": "user", "content": "u2"},
    ]

    def count(messages: Any) -> int:
        return sum(len(m["content"]) for m in messages)

    assert fit_messages(conversation, count, 1000) == conversation
    assert fit_messages(conversation, count, 10) == [conversation[0], conversation[3]]
    with pytest.raises(GenerationError):
        fit_messages(conversation, count, 1)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"op": "dance"}', "unknown op 'dance'"),
        ('{"op": "generate", "id": "x"}', "`messages` must be a non-empty list"),
        ('{"op": "generate", "messages": [{"role": "bot", "content": "hi"}]}', "messages[0].role"),
        (
            '{"op": "generate", "messages": [{"role": "user", "content": 3}]}',
            "messages[0].content must be text",
        ),
        ('{"op": "generate", "messages": [{"role": "assistant", "content": "x"}]}', "last message must have"),
        (
            '{"op": "generate", "messages": [{"role": "user", "content": "x"}], "max_new_tokens": 0}',
            "`max_new_tokens` must lie between",
        ),
        (
            '{"op": "generate", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}',
            "`temperature` must be a number",
        ),
        (
            '{"op": "generate", "messages": [{"role": "user", "content": "x"}], "compare": "yes"}',
            "`compare` must be true or false",
        ),
        ('{"op": "load", "base": 5}', "`base` must be text"),
    ],
)
def test_malformed_requests_name_the_problem(line: str, problem: str) -> None:
    with pytest.raises(RequestError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        parse_request(line, 1)


# The engine process


def _subprocess_env() -> dict[str, str]:
    """This environment with the repository importable and one torch thread (tiny models, shared CPUs)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return env


@dataclasses.dataclass
class Reply:
    """Everything one generate request produced, by slot."""

    tokens: dict[str, list[str]]
    done: dict[str, ReplyDone]
    others: list[Event]


class EngineClient:
    """Drives a real `python -m engine.chat`: requests on stdin, every stdout line checked as an event."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            [sys.executable, "-P", "-m", "engine.chat", "--poll", "0.2", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            encoding="utf-8",
            bufsize=1,
            env=_subprocess_env(),
            cwd=REPO_ROOT,
        )
        self.raw_lines: list[str] = []
        self.unparsed: list[str] = []
        self.events: queue.Queue[Event | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._ids = iter(range(1, 10**6))

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.raw_lines.append(line)
            event = parse_event(line)
            if event is None:
                self.unparsed.append(line)
            else:
                self.events.put(event)
        self.events.put(None)

    def stderr_tail(self) -> str:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-3000:]

    def send(self, request: dict[str, Any] | str) -> None:
        line = request if isinstance(request, str) else json.dumps(request)
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def next_event(self, timeout: float = TIMEOUT_S) -> Event:
        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no event from the chat engine within {timeout} s; its log:\n{self.stderr_tail()}")
        assert not self.unparsed, f"stdout carried non-event lines: {self.unparsed}"
        if event is None:
            self.events.put(None)
            pytest.fail(f"the chat engine exited ({self.process.wait()}); its log:\n{self.stderr_tail()}")
        return event

    def wait_for(
        self, wanted: Callable[[Event], bool], timeout: float = TIMEOUT_S
    ) -> tuple[Event, list[Event]]:
        """The first event `wanted` accepts, and the events before it."""
        deadline = time.monotonic() + timeout
        skipped: list[Event] = []
        while True:
            event = self.next_event(max(0.1, deadline - time.monotonic()))
            if wanted(event):
                return event, skipped
            skipped.append(event)

    def load(self, **spec: str) -> Event:
        """Send a load request and return chat_ready or run_failed."""
        self.send({"op": "load", **spec})
        event, _ = self.wait_for(lambda e: isinstance(e, (ChatReady, RunFailed)))
        return event

    def generate(self, text: str | list[dict[str, str]], **options: Any) -> Reply:
        """Send one generate request and collect its events until the reply_done of slot "adapter"."""
        request_id = f"t{next(self._ids)}"
        messages = _user(text) if isinstance(text, str) else text
        self.send({"op": "generate", "id": request_id, "messages": messages, **options})
        return self.collect(request_id)

    def collect(self, request_id: str, timeout: float = TIMEOUT_S) -> Reply:
        reply = Reply({}, {}, [])
        deadline = time.monotonic() + timeout
        while True:
            event = self.next_event(max(0.1, deadline - time.monotonic()))
            if isinstance(event, Token) and event.request_id == request_id:
                reply.tokens.setdefault(event.slot, []).append(event.text)
            elif isinstance(event, ReplyDone) and event.request_id == request_id:
                assert event.slot not in reply.done, f"two reply_done events for slot {event.slot}"
                reply.done[event.slot] = event
                if event.slot == "adapter":
                    return reply
            else:
                reply.others.append(event)

    def close(self) -> int:
        if self.process.poll() is None:
            with_pipe = self.process.stdin is not None and not self.process.stdin.closed
            if with_pipe:
                try:
                    self.send({"op": "quit"})
                    self.process.stdin.close()  # type: ignore[union-attr]
                except (BrokenPipeError, OSError):
                    pass
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout=10)
        self._log.close()
        return self.process.returncode


@pytest.fixture
def light_engine(tmp_path: Path) -> Iterator[EngineClient]:
    """An engine started with no model (it never imports torch until asked to load one)."""
    client = EngineClient([], tmp_path / "engine.log")
    yield client
    client.close()


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineClient]:
    """One engine process shared by this module's protocol tests; each test loads what it needs first."""
    client = EngineClient([], tmp_path_factory.mktemp("chat-engine") / "engine.log")
    yield client
    assert client.close() == 0
    assert not client.unparsed


def test_bad_lines_are_logged_and_generate_without_a_model_is_closed(light_engine: EngineClient) -> None:
    light_engine.send("this is not json")
    event = light_engine.next_event()
    assert isinstance(event, Log) and event.level == "error" and "not valid JSON" in event.message
    light_engine.send({"op": "explode"})
    event = light_engine.next_event()
    assert isinstance(event, Log) and event.level == "error" and "unknown op 'explode'" in event.message
    # A malformed generate that has an id is still closed, so a client waiting on it does not hang.
    light_engine.send({"op": "generate", "id": "bad", "messages": []})
    reply = light_engine.collect("bad")
    assert reply.done["adapter"].stop_reason == "error"
    assert any(isinstance(e, Log) and "messages" in e.message for e in reply.others)
    reply = light_engine.generate("hello")
    assert reply.done["adapter"].stop_reason == "error"
    assert any(isinstance(e, Log) and "no model is loaded" in e.message for e in reply.others)
    # Both slots of a compare request are closed, so a two-pane client never waits forever.
    reply = light_engine.generate("hello", compare=True)
    assert list(reply.done) == ["base", "adapter"]
    assert {done.stop_reason for done in reply.done.values()} == {"error"}


def test_a_failed_load_explains_itself_and_the_engine_stays_up(
    light_engine: EngineClient, tmp_path: Path
) -> None:
    failed = light_engine.load(base=str(tmp_path / "no-such-model"))
    assert isinstance(failed, RunFailed)
    assert "does not exist" in failed.cause and failed.next_step
    failed = light_engine.load(adapter=str(tmp_path))
    assert isinstance(failed, RunFailed) and "adapter_config.json" in failed.cause
    failed = light_engine.load(gguf=str(tmp_path / "missing.gguf"))
    assert isinstance(failed, RunFailed) and "does not exist" in failed.cause
    light_engine.send({"op": "generate", "id": "after", "messages": _user("still there?")})
    assert light_engine.collect("after").done["adapter"].stop_reason == "error"


def test_closing_stdin_ends_the_engine(light_engine: EngineClient) -> None:
    assert light_engine.process.stdin is not None
    light_engine.process.stdin.close()
    assert light_engine.process.wait(timeout=20) == 0


def test_round_trip_streams_tokens_then_reply_done(
    engine: EngineClient, tiny_model_dir: Path, adapters: dict[str, Path]
) -> None:
    ready = engine.load(base=str(tiny_model_dir), adapter=str(adapters["A"]))
    assert isinstance(ready, ChatReady), ready
    assert (ready.backend, Path(ready.adapter)) == ("hf", adapters["A"].resolve())
    reply = engine.generate(QUESTIONS[0], max_new_tokens=40)
    done = reply.done["adapter"]
    assert (done.text, done.stop_reason) == (ANSWERS_A[0], "eos")
    assert "".join(reply.tokens["adapter"]) == done.text
    assert done.tokens > 0 and done.tokens_per_s > 0
    # A conversation with earlier turns and a system prompt is rendered by the same template.
    conversation = [
        *_user(QUESTIONS[0]),
        {"role": "assistant", "content": ANSWERS_A[0]},
        *_user(QUESTIONS[1]),
    ]
    reply = engine.generate(conversation, system="Answer briefly.", max_new_tokens=20)
    assert reply.done["adapter"].stop_reason in ("eos", "length")


def test_compare_answers_with_base_then_adapter(
    engine: EngineClient, tiny_model_dir: Path, adapters: dict[str, Path]
) -> None:
    assert isinstance(engine.load(base=str(tiny_model_dir), adapter=str(adapters["A"])), ChatReady)
    reply = engine.generate(QUESTIONS[1], compare=True, max_new_tokens=12)
    assert list(reply.done) == ["base", "adapter"]
    assert reply.done["adapter"].text == ANSWERS_A[1]
    assert reply.done["base"].text != reply.done["adapter"].text
    assert "".join(reply.tokens["base"]) == reply.done["base"].text
    # Switching the adapter off for the base slot must not leave it off.
    assert engine.generate(QUESTIONS[1], max_new_tokens=12).done["adapter"].text == ANSWERS_A[1]


def test_stop_ends_a_reply_promptly(engine: EngineClient, tiny_model_dir: Path) -> None:
    assert isinstance(engine.load(base=str(tiny_model_dir)), ChatReady)
    engine.send(
        {"op": "generate", "id": "long", "messages": _user("tell me everything"), "max_new_tokens": 400}
    )
    engine.wait_for(lambda e: isinstance(e, Token) and e.request_id == "long")
    sent = time.monotonic()
    engine.send({"op": "stop"})
    reply = engine.collect("long")
    assert time.monotonic() - sent < 5
    done = reply.done["adapter"]
    assert done.stop_reason == "stopped"
    assert 0 < done.tokens < 400
    # A stop applies to what was sent before it, never to the next request.
    assert engine.generate("hi", max_new_tokens=5).done["adapter"].stop_reason == "length"


def test_long_conversations_drop_old_turns_and_an_oversized_message_is_refused(
    engine: EngineClient, tiny_model_dir: Path, adapters: dict[str, Path]
) -> None:
    assert isinstance(engine.load(base=str(tiny_model_dir), adapter=str(adapters["A"])), ChatReady)
    long_turn = (
        "the quick brown fox jumps over the lazy dog " * 60
    )  # more than the tiny model's 512 positions
    conversation = [*_user(long_turn), {"role": "assistant", "content": "ok"}, *_user(QUESTIONS[0])]
    reply = engine.generate(conversation, max_new_tokens=40)
    assert reply.done["adapter"].text == ANSWERS_A[0]
    assert any(isinstance(e, Log) and "left out the 2 oldest messages" in e.message for e in reply.others)
    reply = engine.generate(long_turn, max_new_tokens=5, compare=True)
    assert {slot: done.stop_reason for slot, done in reply.done.items()} == {
        "base": "error",
        "adapter": "error",
    }
    assert any(isinstance(e, Log) and e.level == "error" and "longer than" in e.message for e in reply.others)


def test_following_a_run_hot_swaps_to_each_new_checkpoint(
    engine: EngineClient, tiny_model_dir: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    run_dir = tmp_path / "runs" / "20261123-000000-tiny"
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True)
    ready = engine.load(base=str(tiny_model_dir), run=str(run_dir))
    assert isinstance(ready, ChatReady) and ready.adapter == ""  # no checkpoint yet: the base answers
    base_answer = engine.generate(QUESTIONS[0], max_new_tokens=20).done["adapter"].text
    assert base_answer != ANSWERS_A[0]

    # A half-written folder (no weights yet) is ignored; the complete one is picked up while idle.
    (checkpoints / "step_5").mkdir()
    shutil.copytree(adapters["A"], checkpoints / "step_10")
    swapped, _ = engine.wait_for(lambda e: isinstance(e, AdapterSwapped))
    assert (swapped.step, Path(swapped.path).name) == (10, "step_10")
    assert engine.generate(QUESTIONS[0], max_new_tokens=20).done["adapter"].text == ANSWERS_A[0]

    # A checkpoint that appears between replies is swapped in before the next reply.
    shutil.copytree(adapters["B"], checkpoints / "step_20")
    reply = engine.generate(QUESTIONS[0], max_new_tokens=20, compare=True)
    # Whether the idle poll or the request found it first, the swap event precedes the reply.
    assert [e.step for e in reply.others if isinstance(e, AdapterSwapped)] == [20]
    assert reply.done["adapter"].text == ANSWERS_B[0]
    assert reply.done["base"].text == base_answer


def test_gguf_backend_answers_with_the_files_template(
    engine: EngineClient, tiny_model_dir: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    from engine.errors import ExportError

    try:
        from engine.convert import check_tokenizer, convert_to_gguf, find_converter

        converter = find_converter()
    except (ImportError, ExportError) as exc:
        pytest.skip(f"llama.cpp's converter is not available here ({exc}); engine.convert provides it")
    from engine.modeling import load_for_inference

    model, tokenizer = load_for_inference(tiny_model_dir, adapters["A"], device="cpu")
    merged = tmp_path / "merged"
    model.merge_and_unload().save_pretrained(merged)
    tokenizer.save_pretrained(merged)
    gguf = convert_to_gguf(
        merged,
        tmp_path / "tiny.gguf",
        converter=converter,
        tokenizer=check_tokenizer(merged, converter),
        outtype="f32",
    )
    ready = engine.load(gguf=str(gguf))
    assert isinstance(ready, ChatReady) and ready.backend == "gguf"
    reply = engine.generate(QUESTIONS[0], max_new_tokens=30)
    assert (reply.done["adapter"].text, reply.done["adapter"].stop_reason) == (ANSWERS_A[0], "eos")
    assert "".join(reply.tokens["adapter"]) == ANSWERS_A[0]
    # No base model inside a GGUF: compare closes the base slot with an error and still answers.
    reply = engine.generate(QUESTIONS[0], max_new_tokens=30, compare=True)
    assert reply.done["base"].stop_reason == "error"
    assert reply.done["adapter"].text == ANSWERS_A[0]
    engine.send(
        {
            "op": "generate",
            "id": "g-long",
            "messages": _user("hello"),
            "max_new_tokens": 400,
            "temperature": 1.0,
            "seed": 1,
        }
    )
    engine.wait_for(lambda e: isinstance(e, Token) and e.request_id == "g-long")
    engine.send({"op": "stop"})
    assert engine.collect("g-long").done["adapter"].stop_reason in ("stopped", "eos")


def _tiny_pairs(tiny_qa_path: Path) -> list[dict[str, str]]:
    return [
        json.loads(line) for line in tiny_qa_path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


@pytest.mark.slow
def test_chat_with_a_finished_training_run(
    engine: EngineClient, tiny_run_dir: Path, tiny_qa_path: Path
) -> None:
    from engine.workspace import latest_checkpoint

    ready = engine.load(run=str(tiny_run_dir))  # the base comes from the run's recipe
    assert isinstance(ready, ChatReady), ready
    assert Path(ready.adapter) == latest_checkpoint(tiny_run_dir)
    pair = _tiny_pairs(tiny_qa_path)[2]
    reply = engine.generate(pair["question"], max_new_tokens=30, compare=True)
    assert (reply.done["adapter"].text, reply.done["adapter"].stop_reason) == (pair["answer"], "eos")
    assert reply.done["base"].text != pair["answer"]


@pytest.mark.slow
def test_chat_follows_a_run_while_it_trains(
    engine: EngineClient, tiny_workspace: Any, tiny_qa_path: Path
) -> None:
    from engine.launch import start_run, wait_run
    from engine.workspace import latest_checkpoint

    run_dir = tiny_workspace.runs_dir / start_run(tiny_workspace, "tiny")
    ready = engine.load(run=str(run_dir))
    assert isinstance(ready, ChatReady), ready
    summary = wait_run(run_dir, timeout=300)
    assert summary.status == "finished", summary
    final = latest_checkpoint(run_dir)
    assert final is not None
    # Swaps arrive while idle, in step order, ending at the last checkpoint.
    steps = [int(Path(ready.adapter).name.removeprefix("step_"))] if ready.adapter else []
    while not steps or steps[-1] != int(final.name.removeprefix("step_")):
        event, _ = engine.wait_for(lambda e: isinstance(e, AdapterSwapped), timeout=30)
        steps.append(event.step)
    assert steps == sorted(set(steps))
    pair = _tiny_pairs(tiny_qa_path)[0]
    assert engine.generate(pair["question"], max_new_tokens=30).done["adapter"].text == pair["answer"]


def test_stdout_carried_only_events(engine: EngineClient) -> None:
    assert engine.raw_lines, "the shared engine wrote nothing"
    assert all(parse_event(line) is not None for line in engine.raw_lines)


def test_cli_chat_repl(tiny_model_dir: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    env = {**_subprocess_env(), "TMPDIR": str(tmp_path)}  # where a failed chat keeps its engine log
    lines = f"{QUESTIONS[0]}\n/compare\n{QUESTIONS[1]}\n/quit\n"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "chat",
            "--base",
            str(tiny_model_dir),
            "--adapter",
            str(adapters["A"]),
            "--max-new-tokens",
            "20",
        ],
        input=lines,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert f"model> {ANSWERS_A[0]}" in done.stdout
    assert "base> " in done.stdout
    assert f"adapter> {ANSWERS_A[1]}" in done.stdout


def test_cli_chat_reports_a_load_failure(tmp_path: Path) -> None:
    env = {**_subprocess_env(), "TMPDIR": str(tmp_path)}  # where a failed chat keeps its engine log
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "chat", "--base", str(tmp_path / "nothing-here")],
        input="hello\n",
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "does not exist" in done.stderr
