"""The chat engine process (`python -m engine.chat`): loads a model and answers JSON requests read from stdin.

It serves a base model, a base plus LoRA adapter, the newest checkpoint of a run (hot-swapped while the run
trains), or a GGUF file through llama.cpp. Requests arrive one JSON object per line on stdin; events leave one
JSON object per line on stdout (see engine.events). Requests:

    {"op": "generate", "id": "r1", "messages": [{"role": "user", "content": "…"}], "system": "…",
     "max_new_tokens": 256, "temperature": 0.7, "top_p": 0.9, "compare": false, "seed": 0}
    {"op": "stop"}                      stop the reply being generated and any generate sent before this line
    {"op": "load", "base": "…", "adapter": "…" | "run": "…" | "gguf": "…"}   switch model
    {"op": "quit"}                      stop and exit (so does closing stdin)

A generate request streams token events and ends with one reply_done per slot: slot "adapter" (the model as
loaded) always, preceded by slot "base" (the same base with the adapter switched off) when compare is true.
The reply_done of slot "adapter" is therefore the last event of a request. A slot that cannot be answered
(no model loaded, a prompt too long, nothing to compare with) gets a log event and a reply_done with
stop_reason "error"; a load that fails emits run_failed and the engine waits for the next load.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from engine.errors import EngineError, ModelError, OutOfMemoryError
from engine.events import (
    AdapterSwapped,
    ChatReady,
    Event,
    EventWriter,
    Log,
    ReplyDone,
    RunFailed,
    Token,
    claim_stdout,
)
from engine.workspace import (
    RUN_RECIPE_FILE,
    Workspace,
    checkpoint_dirs,
    checkpoint_step,
)

log = logging.getLogger("tunedeck.chat")

# Slot "adapter" carries the reply of the model as loaded (with its adapter, if any) and always comes last;
# slot "base" is the same base with the adapter switched off, answered first for compare requests.
SLOT_BASE = "base"
SLOT_ADAPTER = "adapter"
# Why a reply ended: the values engine.generation returns, plus "error" for a slot that could not be answered.
STOP_EOS = "eos"
STOP_LENGTH = "length"
STOP_STOPPED = "stopped"
STOP_ERROR = "error"

ROLES = ("system", "user", "assistant")
MAX_NEW_TOKENS_LIMIT = 32_768
DEFAULT_POLL_S = 2.0
DEFAULT_GGUF_CONTEXT = 4096
ADAPTER_CONFIG_FILE = "adapter_config.json"
# Only safetensors weights are loaded: pickled .bin files can run code.
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
MODEL_CONFIG_FILE = "config.json"


class RequestError(ValueError):
    """A request line that cannot be served as written; the message names the problem."""


@dataclasses.dataclass
class GenerateRequest:
    """A validated generate request; `seq` orders it against stop requests."""

    id: str
    messages: list[dict[str, str]]
    system: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    compare: bool = False
    seed: int | None = None
    seq: int = 0


@dataclasses.dataclass
class LoadSpec:
    """What to load: a GGUF file, or a base model with an adapter or a run to follow (all paths as given)."""

    base: str = ""
    adapter: str = ""
    run: str = ""
    gguf: str = ""
    device: str = "auto"


@dataclasses.dataclass
class Control:
    """A request other than generate, as the main loop sees it."""

    op: str
    seq: int = 0
    spec: LoadSpec | None = None


@dataclasses.dataclass
class _Plan:
    """A checked load request: what to call it, how to load it, and what it sets once loaded."""

    label: str
    load: Callable[[], HFBackend | GGUFBackend]
    base: str = ""
    run_dir: Path | None = None
    system: str = ""


# Request parsing


def _number(data: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"`{key}` must be a number, not {value!r}")
    if not low <= value <= high:
        raise RequestError(f"`{key}` must lie between {low} and {high}, not {value}")
    return float(value)


def _whole_number(data: dict[str, Any], key: str, default: int | None, low: int, high: int) -> int | None:
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"`{key}` must be a whole number, not {value!r}")
    if not low <= value <= high:
        raise RequestError(f"`{key}` must lie between {low} and {high}, not {value}")
    return value


def _messages(data: dict[str, Any]) -> list[dict[str, str]]:
    raw = data.get("messages")
    if not isinstance(raw, list) or not raw:
        raise RequestError('`messages` must be a non-empty list of {"role", "content"} objects')
    messages = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise RequestError(f"messages[{index}] must be an object with `role` and `content`")
        role, content = item.get("role"), item.get("content")
        if role not in ROLES:
            raise RequestError(f"messages[{index}].role must be one of {', '.join(ROLES)}, not {role!r}")
        if not isinstance(content, str):
            raise RequestError(f"messages[{index}].content must be text, not {type(content).__name__}")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise RequestError("the last message must have role `user`, since the model answers it")
    return messages


def _text_field(data: dict[str, Any], key: str) -> str:
    value = data.get(key) or ""
    if not isinstance(value, str):
        raise RequestError(f"`{key}` must be text, not {value!r}")
    return value


def parse_request(line: str, seq: int) -> GenerateRequest | Control:
    """Validate one stdin line into a request; raises RequestError naming the problem."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RequestError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(data, dict):
        raise RequestError(f"a request must be a JSON object, not {type(data).__name__}")
    op = data.get("op")
    if op == "generate":
        request_id = data.get("id", f"r{seq}")
        if isinstance(request_id, bool) or not isinstance(request_id, (str, int)) or request_id == "":
            raise RequestError(f"`id` must be a non-empty string, not {request_id!r}")
        system = data.get("system")
        if system is not None and not isinstance(system, str):
            raise RequestError(f"`system` must be text, not {system!r}")
        compare = data.get("compare", False)
        if not isinstance(compare, bool):
            raise RequestError(f"`compare` must be true or false, not {compare!r}")
        return GenerateRequest(
            id=str(request_id),
            messages=_messages(data),
            system=system,
            max_new_tokens=_whole_number(data, "max_new_tokens", 256, 1, MAX_NEW_TOKENS_LIMIT) or 256,
            temperature=_number(data, "temperature", 0.0, 0.0, 5.0),
            top_p=_number(data, "top_p", 1.0, 0.01, 1.0),
            compare=compare,
            seed=_whole_number(data, "seed", None, 0, 2**32 - 1),
            seq=seq,
        )
    if op in ("stop", "quit"):
        return Control(op=op, seq=seq)
    if op == "load":
        spec = LoadSpec(
            base=_text_field(data, "base"),
            adapter=_text_field(data, "adapter"),
            run=_text_field(data, "run"),
            gguf=_text_field(data, "gguf"),
            device=_text_field(data, "device") or "auto",
        )
        return Control(op=op, seq=seq, spec=spec)
    raise RequestError(f"unknown op {op!r}; use generate, stop, load or quit")


def _failed_generate(line: str) -> tuple[str, bool] | None:
    """The id and compare flag of a generate line that failed validation, so its reply can be closed."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError:
        return None
    if isinstance(data, dict) and data.get("op") == "generate" and isinstance(data.get("id"), (str, int)):
        return str(data["id"]), data.get("compare") is True
    return None


# Checkpoints and runs


def checkpoint_kind(path: Path) -> str | None:
    """'adapter' for a complete LoRA checkpoint, 'full' for a whole model folder, None for anything else."""
    path = Path(path)
    if (path / ADAPTER_CONFIG_FILE).is_file():
        return "adapter" if (path / ADAPTER_WEIGHTS_FILE).is_file() else None
    if (path / MODEL_CONFIG_FILE).is_file() and any(path.glob("*.safetensors")):
        return "full"
    return None


def newest_usable_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of a run that holds loadable weights."""
    for path in reversed(checkpoint_dirs(run_dir)):
        if checkpoint_kind(path):
            return path
    return None


def _run_recipe(run_dir: Path) -> Any:
    """The recipe saved beside a run, or None when it is missing or unreadable (the run may predate it)."""
    path = Path(run_dir) / RUN_RECIPE_FILE
    if not path.is_file():
        return None
    from engine.recipes import load_recipe

    try:
        return load_recipe(path)
    except EngineError as exc:
        log.warning("could not read %s: %s", path, exc)
        return None


def _checkpoint_tokenizer(path: Path) -> Any:
    """The tokenizer a checkpoint folder carries, completed as engine.modeling does; None if it has none."""
    if not (Path(path) / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    from engine.template import DEFAULT_CHAT_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


# Backends


class HFBackend:
    """A transformers model, maybe wrapped by peft with one active adapter that can be swapped in place."""

    name = "hf"

    def __init__(
        self, model: Any, tokenizer: Any, label: str, adapter_path: Path | None, *, full: bool
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.label = label
        self.adapter_path = adapter_path
        # A full fine-tune checkpoint replaced the whole model: there is no adapter to switch off.
        self.full = full
        self._adapter_names: list[str] = []
        if adapter_path is not None and not full:
            self._adapter_names = [getattr(model, "active_adapter", "default") or "default"]

    def ready_event(self) -> ChatReady:
        return ChatReady(model=self.label, adapter=str(self.adapter_path or ""), backend=self.name)

    def slots(self, compare: bool) -> list[str]:
        return [SLOT_BASE, SLOT_ADAPTER] if compare and self.can_compare() else [SLOT_ADAPTER]

    def can_compare(self) -> bool:
        return self.adapter_path is not None and not self.full

    def swap_adapter(self, path: Path) -> None:
        """Make the LoRA checkpoint at `path` the active adapter, dropping the previous one."""
        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            self.model = PeftModel.from_pretrained(self.model, str(path), is_trainable=False)
            self.model.eval()
            self._adapter_names = [self.model.active_adapter]
            # The base tokenizer was a stand-in; the checkpoint's carries the template training used.
            self.tokenizer = _checkpoint_tokenizer(path) or self.tokenizer
        else:
            new_name = f"ckpt_{time.monotonic_ns()}"
            self.model.load_adapter(str(path), adapter_name=new_name, is_trainable=False)
            self.model.set_adapter(new_name)
            for old_name in self._adapter_names:
                self.model.delete_adapter(old_name)
            self._adapter_names = [new_name]
        self.adapter_path = path

    def fit(self, messages: list[dict[str, str]], max_new_tokens: int) -> list[dict[str, str]]:
        """The newest turns of the conversation that leave room for a reply of `max_new_tokens`."""
        from engine.generation import context_length, fit_messages, prompt_ids

        budget = context_length(self.model, self.tokenizer) - max_new_tokens
        if budget <= 0:
            return messages  # the reply alone fills the context; generate() shortens it instead
        return fit_messages(messages, lambda kept: len(prompt_ids(self.tokenizer, kept)), budget)

    def answer(
        self,
        messages: Sequence[dict[str, str]],
        request: GenerateRequest,
        slot: str,
        on_text: Callable[[str], None],
        should_stop: Callable[[], bool],
    ) -> Any:
        from engine.generation import generate

        switch_off = self.model.disable_adapter() if slot == SLOT_BASE and self.can_compare() else None
        with switch_off if switch_off is not None else contextlib.nullcontext():
            return generate(
                self.model,
                self.tokenizer,
                messages,
                max_new_tokens=request.max_new_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                on_text=on_text,
                should_stop=should_stop,
            )

    def seed(self, value: int) -> None:
        import torch

        torch.manual_seed(value)

    def close(self) -> None:
        import gc

        self.model = None
        self.tokenizer = None
        gc.collect()
        with contextlib.suppress(ImportError):
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _llama_cpp() -> Any:
    """The llama_cpp module with its log routed to Python logging (stderr), never onto the event stream."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise ModelError(
            f"llama-cpp-python is not installed ({exc}), so GGUF files cannot be served.",
            next_step="Run scripts/setup.sh, or `pip install llama-cpp-python==0.3.36`.",
        ) from None
    from engine.quantize import install_log_capture

    install_log_capture()
    return llama_cpp


@dataclasses.dataclass
class _GGUFResult:
    """A finished llama.cpp reply, shaped like engine.generation.GenerationResult (which needs torch)."""

    text: str
    tokens: int
    tokens_per_s: float
    stop_reason: str


class GGUFBackend:
    """A GGUF file served by llama.cpp, answering with the chat template stored in the file."""

    name = "gguf"

    def __init__(self, path: Path, n_ctx: int = DEFAULT_GGUF_CONTEXT) -> None:
        llama_cpp = _llama_cpp()
        self.path = path
        try:
            probe = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
            has_template = "tokenizer.chat_template" in (probe.metadata or {})
            train_ctx = _metadata_context_length(probe.metadata or {})
            del probe
            self.llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=min(n_ctx, train_ctx) if train_ctx else n_ctx,
                verbose=False,
                chat_format=None if has_template else "chatml",
            )
        except (ValueError, RuntimeError) as exc:
            # llama-cpp-python reports unreadable or truncated files as ValueError or RuntimeError.
            raise ModelError(
                f"llama.cpp could not load {path.name}: {exc}.",
                next_step="Check that the file is a complete GGUF written by `tunedeck export`.",
            ) from exc
        if not has_template:
            log.warning("%s has no chat template in its metadata; using ChatML", path.name)
        self.has_template = has_template

    def ready_event(self) -> ChatReady:
        return ChatReady(model=str(self.path), adapter="", backend=self.name)

    def slots(self, compare: bool) -> list[str]:
        return [SLOT_ADAPTER]

    def fit(self, messages: list[dict[str, str]], max_new_tokens: int) -> list[dict[str, str]]:
        """The conversation as is: llama.cpp reports a prompt longer than its context itself."""
        return messages

    def can_compare(self) -> bool:
        return False

    def answer(
        self,
        messages: Sequence[dict[str, str]],
        request: GenerateRequest,
        slot: str,
        on_text: Callable[[str], None],
        should_stop: Callable[[], bool],
    ) -> _GGUFResult:
        started = time.perf_counter()
        pieces: list[str] = []
        stop_reason = STOP_EOS
        if should_stop():
            return _GGUFResult("", 0, 0.0, STOP_STOPPED)
        try:
            stream = self.llm.create_chat_completion(
                messages=list(messages),
                stream=True,
                max_tokens=request.max_new_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                # top_k 1 is greedy, as engine.parity decodes; 0 switches top-k off so top_p alone trims.
                top_k=1 if request.temperature == 0 else 0,
                min_p=0.0,
                repeat_penalty=1.0,
                seed=request.seed if request.seed is not None else 0,
            )
            for chunk in stream:
                choice = chunk["choices"][0]
                piece = choice.get("delta", {}).get("content")
                if piece:
                    pieces.append(piece)
                    on_text(piece)
                if choice.get("finish_reason") == "length":
                    stop_reason = STOP_LENGTH
                if should_stop():
                    stop_reason = STOP_STOPPED
                    stream.close()
                    break
        except ValueError as exc:
            # llama-cpp-python raises ValueError when the prompt exceeds the context window.
            raise EngineError(
                f"llama.cpp refused the prompt: {exc}.",
                title="Reply failed",
                next_step="Start a new conversation or shorten the messages.",
            ) from exc
        elapsed = time.perf_counter() - started
        return _GGUFResult(
            "".join(pieces), len(pieces), len(pieces) / elapsed if elapsed > 0 else 0.0, stop_reason
        )

    def seed(self, value: int) -> None:
        """llama.cpp takes the seed per request."""

    def close(self) -> None:
        with contextlib.suppress(AttributeError):
            self.llm.close()
        self.llm = None


def _metadata_context_length(metadata: dict[str, str]) -> int:
    arch = metadata.get("general.architecture", "")
    try:
        return int(metadata.get(f"{arch}.context_length", 0))
    except ValueError:
        return 0


# Loading


def _load_hf(
    base: str, checkpoint: Path | None, device: str, workspace: Workspace | None, *, four_bit: bool = False
) -> tuple[Any, Any]:
    """Model and tokenizer through engine.modeling, so chat loads exactly as training and export do.

    `four_bit` (a QLoRA run) loads the base in 4 bits on a GPU, where the run's memory budget assumed it.
    """
    from engine.modeling import load_for_inference, resolve_device

    load_in_4bit = four_bit and resolve_device(device).startswith("cuda")
    model, tokenizer = load_for_inference(
        base or None, adapter_dir=checkpoint, device=device, workspace=workspace, load_in_4bit=load_in_4bit
    )
    return model, tokenizer


def _as_engine_error(exc: BaseException, what: str) -> EngineError:
    """An expected-failure form of an exception raised while loading `what`."""
    if isinstance(exc, EngineError):
        return exc
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return OutOfMemoryError(
            f"There is not enough memory to load {what}.",
            next_step="Close other programs, use a smaller model, or chat with a quantized GGUF export.",
        )
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
    return ModelError(
        f"Loading {what} failed: {first_line}.",
        next_step="Check that the path names a model folder (config.json, weights) or a complete adapter.",
    )


# The engine


class _Emitter:
    """Serialises event writes from the main thread and the stdin reader thread."""

    def __init__(self, writer: EventWriter) -> None:
        self.writer = writer
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self._lock:
            self.writer.emit(event)


class ChatEngine:
    """Holds the loaded backend, follows a run's checkpoints and serves requests in arrival order."""

    def __init__(
        self, emit: Callable[[Event], None], workspace: Workspace | None, poll_s: float = DEFAULT_POLL_S
    ):
        self.emit = emit
        self.workspace = workspace
        self.poll_s = poll_s
        self.backend: HFBackend | GGUFBackend | None = None
        self.base = ""
        self.device = "auto"
        self.run_dir: Path | None = None
        self.default_system = ""
        self._failed_checkpoint: Path | None = None
        # Every generate request with a sequence number below this one is to stop (set by the reader thread).
        self.stop_before_seq = 0
        self.requests: queue.Queue[GenerateRequest | Control] = queue.Queue()

    # paths

    def _existing_path(self, raw: str, what: str, *, folder: bool) -> Path:
        """A user-given path, tried as given and then inside the workspace."""
        candidates = [Path(raw).expanduser()]
        if self.workspace is not None and not candidates[0].is_absolute():
            candidates.append(self.workspace.root / raw)
        for candidate in candidates:
            if candidate.is_dir() if folder else candidate.is_file():
                return candidate.resolve()
        raise ModelError(
            f"The {what} {raw} does not exist.", next_step=f"Pass the path of an existing {what}."
        )

    def _run_folder(self, raw: str) -> Path:
        path = Path(raw).expanduser()
        if path.is_dir():
            return path.resolve()
        if self.workspace is not None and "/" not in raw:
            return self.workspace.run_dir(raw)
        raise ModelError(
            f"There is no run folder {raw}.", next_step="Pass a run folder or a run id with --workspace set."
        )

    # loading

    def load(self, spec: LoadSpec) -> bool:
        """Load what `spec` names (replacing the current model); emits chat_ready or run_failed."""
        try:
            plan = self._plan(spec)
        except EngineError as exc:
            self._fail(exc)
            return False
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        what = plan.label
        self.emit(Log(message=f"Loading {what}…"))
        try:
            self.backend = plan.load()
        except Exception as exc:
            log.exception("loading %s failed", what)
            self.run_dir = None
            self._fail(_as_engine_error(exc, what))
            return False
        self.base = plan.base
        self.run_dir = plan.run_dir
        self.default_system = plan.system
        self.device = spec.device
        self._failed_checkpoint = None
        self.emit(self.backend.ready_event())
        return True

    def _plan(self, spec: LoadSpec) -> _Plan:
        """Check paths and work out what to load before the current model is dropped."""
        if spec.gguf:
            if spec.adapter or spec.run:
                raise ModelError(
                    "A GGUF file already holds its adapter, so it cannot be combined with an adapter or run.",
                    next_step="Pass only --gguf, or --base with --adapter/--run.",
                )
            path = self._existing_path(spec.gguf, "GGUF file", folder=False)
            return _Plan(label=path.name, load=lambda: GGUFBackend(path))
        if spec.adapter and spec.run:
            raise ModelError(
                "Pass either an adapter or a run, not both.", next_step="Drop one of --adapter/--run."
            )
        run_dir = self._run_folder(spec.run) if spec.run else None
        recipe = _run_recipe(run_dir) if run_dir is not None else None
        adapter = self._existing_path(spec.adapter, "adapter folder", folder=True) if spec.adapter else None
        if adapter is not None and checkpoint_kind(adapter) != "adapter":
            raise ModelError(
                f"{adapter} holds no adapter_config.json with adapter weights.",
                next_step="Pass a checkpoint folder such as runs/<id>/checkpoints/step_<n>.",
            )
        checkpoint = adapter or (newest_usable_checkpoint(run_dir) if run_dir is not None else None)
        full = checkpoint is not None and checkpoint_kind(checkpoint) == "full"
        base = self._pick_base(spec.base, recipe.model.base if recipe is not None else "", checkpoint, full)
        four_bit = recipe is not None and recipe.train.method == "qlora"
        device, workspace = spec.device, self.workspace

        def load() -> HFBackend:
            model, tokenizer = _load_hf(base, checkpoint, device, workspace, four_bit=four_bit)
            label = str(checkpoint) if full else base
            return HFBackend(model, tokenizer, label, checkpoint, full=full)

        return _Plan(
            label=str(checkpoint) if full else base + (f" + {checkpoint}" if checkpoint else ""),
            load=load,
            base=base,
            run_dir=run_dir,
            system=recipe.data.system_prompt if recipe is not None else "",
        )

    def _pick_base(self, named: str, run_base: str, checkpoint: Path | None, full: bool) -> str:
        """The base model to load, checked to exist: a run's own base first (its adapter only fits that
        one), else the base named in the request, else the adapter's recorded base, else the current one."""
        if full:
            return named or run_base
        from engine.modeling import adapter_base_model, check_loadable, resolve_base_model

        recorded = adapter_base_model(checkpoint) if checkpoint is not None else ""
        candidates = [c for c in dict.fromkeys((run_base, named, recorded, self.base)) if c]
        if not candidates:
            raise ModelError(
                "No base model was named.", next_step="Pass --base with a model folder, hub id or demo."
            )
        errors: list[EngineError] = []
        for candidate in candidates:
            try:
                check_loadable(resolve_base_model(candidate, self.workspace))
            except EngineError as exc:
                errors.append(exc)
                continue
            if named and candidate != named:
                log.info("using the run's base model %s rather than %s", candidate, named)
            return candidate
        raise errors[0]

    def _fail(self, exc: EngineError) -> None:
        self.emit(
            RunFailed(
                title=exc.title, cause=exc.message, next_step=exc.next_step or "Send a new load request."
            )
        )

    # following a run

    def follow_run(self) -> None:
        """Switch to the run's newest checkpoint if one appeared since the last look (between replies)."""
        if self.run_dir is None or not isinstance(self.backend, HFBackend):
            return
        newest = newest_usable_checkpoint(self.run_dir)
        if newest is None or newest == self.backend.adapter_path or newest == self._failed_checkpoint:
            return
        if self.backend.adapter_path is not None and checkpoint_step(newest) <= checkpoint_step(
            self.backend.adapter_path
        ):
            return
        try:
            if checkpoint_kind(newest) == "full" or self.backend.full:
                # A full fine-tune replaces every weight: drop the old model first, memory is the constraint.
                self.backend.close()
                self.backend = None
                model, tokenizer = _load_hf("", newest, self.device, self.workspace)
                self.backend = HFBackend(model, tokenizer, str(newest), newest, full=True)
            else:
                self.backend.swap_adapter(newest)
        except Exception as exc:
            log.exception("switching to %s failed", newest)
            self._failed_checkpoint = newest
            self.emit(Log(message=f"Could not switch to checkpoint {newest.name}: {exc}", level="warning"))
            return
        self.emit(AdapterSwapped(path=str(newest), step=checkpoint_step(newest)))

    # generating

    def _conversation(self, request: GenerateRequest) -> list[dict[str, str]]:
        system = self.default_system if request.system is None else request.system
        messages = list(request.messages)
        if system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        return messages

    def reject(self, request_id: str, problem: str, slot: str = SLOT_ADAPTER) -> None:
        """Close a slot that cannot be answered: an error log line, then reply_done with stop_reason error."""
        self.emit(Log(message=f"Request {request_id}: {problem}", level="error"))
        self.emit(ReplyDone(request_id=request_id, stop_reason=STOP_ERROR, slot=slot))

    def reject_request(self, request_id: str, problem: str, *, compare: bool) -> None:
        """Close every slot of a request that cannot be served at all."""
        if compare:
            self.emit(ReplyDone(request_id=request_id, stop_reason=STOP_ERROR, slot=SLOT_BASE))
        self.reject(request_id, problem)

    def generate(self, request: GenerateRequest) -> None:
        """Answer one request, streaming token events for each slot and closing each with reply_done."""
        self.follow_run()
        backend = self.backend
        if backend is None:
            self.reject_request(
                request.id, "no model is loaded; send a load request first.", compare=request.compare
            )
            return
        conversation = self._conversation(request)
        try:
            messages = backend.fit(conversation, request.max_new_tokens)
        except EngineError as exc:
            self.reject_request(request.id, f"{exc.message} {exc.next_step}".strip(), compare=request.compare)
            return
        if len(messages) < len(conversation):
            self.emit(
                Log(
                    message=f"Request {request.id}: left out the {len(conversation) - len(messages)} oldest "
                    "messages to fit the model's context.",
                    level="warning",
                )
            )
        if request.compare and not backend.can_compare():
            # Compare requests always get both slots closed, so a client waiting on two panes never hangs.
            self.emit(
                Log(
                    message=f"Request {request.id}: there is no separate base model to compare with "
                    "(compare needs a base plus LoRA adapter); answering with the loaded model only.",
                    level="warning",
                )
            )
            self.emit(ReplyDone(request_id=request.id, stop_reason=STOP_ERROR, slot=SLOT_BASE))

        def should_stop() -> bool:
            return self.stop_before_seq > request.seq

        for slot in backend.slots(request.compare):
            if request.seed is not None:
                backend.seed(request.seed)

            def on_text(piece: str, slot: str = slot) -> None:
                self.emit(Token(request_id=request.id, text=piece, slot=slot))

            # A failed slot is closed with an error and the next still runs: "adapter" always ends a request.
            try:
                result = backend.answer(messages, request, slot, on_text, should_stop)
            except EngineError as exc:
                self.reject(request.id, f"{exc.message} {exc.next_step}".strip(), slot)
                continue
            except Exception as exc:
                log.exception("request %s failed", request.id)
                problem = (
                    "out of memory"
                    if type(exc).__name__ == "OutOfMemoryError"
                    else f"{type(exc).__name__}: {exc}"
                )
                self.reject(request.id, f"generation failed ({problem}).", slot)
                continue
            self.emit(
                ReplyDone(
                    request_id=request.id,
                    text=result.text,
                    tokens=result.tokens,
                    tokens_per_s=round(result.tokens_per_s, 2),
                    stop_reason=result.stop_reason,
                    slot=slot,
                )
            )

    # the loops

    def read_requests(self, lines: Iterator[str]) -> None:
        """Stdin reader thread: validates lines, applies stop at once, queues the rest; EOF means quit."""
        seq = 0
        for line in lines:
            if not line.strip():
                continue
            seq += 1
            try:
                request = parse_request(line, seq)
            except RequestError as exc:
                failed = _failed_generate(line)
                if failed is not None:
                    self.reject_request(failed[0], f"malformed request: {exc}.", compare=failed[1])
                else:
                    self.emit(Log(message=f"Malformed request line {seq}: {exc}.", level="error"))
                continue
            if isinstance(request, Control) and request.op in ("stop", "quit"):
                self.stop_before_seq = request.seq
                if request.op == "stop":
                    continue
            self.requests.put(request)
        self.stop_before_seq = seq + 1
        self.requests.put(Control(op="quit", seq=seq + 1))

    def serve(self) -> None:
        """Main loop: handle requests in order and look for new checkpoints while idle."""
        while True:
            try:
                request = self.requests.get(timeout=self.poll_s)
            except queue.Empty:
                self.follow_run()
                continue
            if isinstance(request, GenerateRequest):
                self.generate(request)
            elif request.op == "load" and request.spec is not None:
                self.load(request.spec)
            elif request.op == "quit":
                return

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of the chat engine process."""
    parser = argparse.ArgumentParser(prog="python -m engine.chat", description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="", help="base model: a local folder, a hub id or demo")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--adapter", default="", help="a LoRA adapter folder (e.g. runs/<id>/checkpoints/step_<n>)"
    )
    source.add_argument("--run", default="", help="a run folder or id: follow its newest checkpoint")
    source.add_argument("--gguf", default="", help="a GGUF file to serve with llama.cpp")
    parser.add_argument("--workspace", type=Path, default=None, help="workspace folder for run ids and demo")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--poll", type=float, default=DEFAULT_POLL_S, help="seconds between checkpoint checks"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the chat engine until quit or end of stdin."""
    event_stream = claim_stdout()
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    emit = _Emitter(EventWriter(event_stream))
    args = build_parser().parse_args(argv)
    workspace = None
    try:
        if args.workspace is not None:
            workspace = Workspace.open(args.workspace, create=False)
    except EngineError as exc:
        emit(RunFailed(title=exc.title, cause=exc.message, next_step=exc.next_step))
        return 2
    engine = ChatEngine(emit, workspace, poll_s=max(0.05, args.poll))
    reader = threading.Thread(target=engine.read_requests, args=(iter(sys.stdin.readline, ""),), daemon=True)
    reader.start()
    try:
        if args.base or args.adapter or args.run or args.gguf:
            spec = LoadSpec(
                base=args.base, adapter=args.adapter, run=args.run, gguf=args.gguf, device=args.device
            )
            engine.load(spec)
        engine.serve()
    except KeyboardInterrupt:
        # Run by hand in a terminal, Ctrl-C ends the engine quietly; clients send {"op": "stop"} instead.
        return 130
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
