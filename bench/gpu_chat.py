"""Chat speed of a QLoRA run on one GPU: the random 7B base in 4-bit NF4 plus a random LoRA r=64, served by
tunedeck's own chat engine.

One invocation builds the random-init 7B Llama shape on the GPU and saves it with a tokenizer
(bench/train_throughput.py's build_model), makes a qlora-7b run whose checkpoint holds a random LoRA adapter (r=64,
alpha=16, all linear layers, non-zero B: bench/random_run.py), and loads that run through engine.chat's ChatEngine
(what `python -m engine.chat --run RUN` does: a QLoRA run's base loads in 4-bit NF4 with double quantization on a
GPU, the adapter stays unmerged). After one warm-up reply it times greedy replies of batch 1: replies of one token
(the prefill) and of --new-tokens tokens, so decode speed = (tokens - 1) / (full reply - one-token reply). It
reports those, the engine's own tokens/s (what the Chat tab shows) and peak GPU memory, into --out/results.json.

    python bench/gpu_chat.py --out /tmp/chat                # CUDA GPU with bitsandbytes; about 2 minutes
    python bench/gpu_chat.py --out /tmp/chat-tiny --tiny    # CPU smoke test; the chat engine quantizes on GPUs only

The random weights answer gibberish: only the speed and memory mean anything.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for folder in (REPO, REPO / "bench"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from random_run import make_run  # noqa: E402
from train_throughput import SHAPES, build_model  # noqa: E402

from engine.chat import ChatEngine, GenerateRequest, LoadSpec  # noqa: E402
from engine.events import ChatReady, Event, ReplyDone, RunFailed, Token  # noqa: E402
from engine.workspace import Workspace  # noqa: E402

SEED = 0
GIB = 1024**3


class Recorder:
    """The chat engine's event sink: keeps every event with the time it arrived."""

    def __init__(self) -> None:
        self.events: list[tuple[float, Event]] = []

    def __call__(self, event: Event) -> None:
        self.events.append((time.perf_counter(), event))

    def since(self, mark: int) -> list[tuple[float, Event]]:
        """Events recorded after the first `mark` ones."""
        return self.events[mark:]


def prompt_text(vocab_size: int, words: int, seed: int) -> str:
    """A question of `words` tokens of the benchmark's word-level vocabulary (t4 … t<vocab-1>)."""
    rng = random.Random(seed)
    return " ".join(f"t{rng.randrange(4, vocab_size)}" for _ in range(words))


def reply(engine: ChatEngine, recorder: Recorder, request: GenerateRequest) -> dict[str, Any]:
    """Answer one request through the engine; returns its wall time, tokens and the engine's tokens/s."""
    mark = len(recorder.events)
    started = time.perf_counter()
    engine.generate(request)
    wall = time.perf_counter() - started
    events = recorder.since(mark)
    done = [e for _, e in events if isinstance(e, ReplyDone) and e.request_id == request.id]
    if not done or done[-1].stop_reason == "error":
        logs = [getattr(e, "message", "") for _, e in events]
        raise SystemExit(f"request {request.id} failed: {logs}")
    token_times = [t for t, e in events if isinstance(e, Token)]
    return {
        "wall_s": round(wall, 4),
        "tokens": done[-1].tokens,
        "engine_tokens_per_s": done[-1].tokens_per_s,
        "stop_reason": done[-1].stop_reason,
        "first_text_s": round(token_times[0] - started, 4) if token_times else None,
        "text_pieces": len(token_times),
    }


def gpu_memory(torch: Any) -> dict[str, float]:
    """Peak and current GPU memory since the last reset, in GiB (empty on a CPU)."""
    if not torch.cuda.is_available():
        return {}
    return {
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2),
        "allocated_gib": round(torch.cuda.memory_allocated() / GIB, 2),
    }


def main() -> int:
    """Build, load through the chat engine, time replies, write results.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json")
    parser.add_argument("--tiny", action="store_true", help="tiny random model (a CPU smoke test)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-words", type=int, default=64, help="prompt length in tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, help="folder for the model and run (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the model and run files")
    args = parser.parse_args()

    import torch

    shape = "tiny" if args.tiny else "7b"
    cuda = torch.cuda.is_available()
    work = args.work or Path(tempfile.mkdtemp(prefix="tunedeck-gpu-chat-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "shape": shape,
        "shape_config": SHAPES[shape],
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({_cpu_model()})",
        # The chat engine loads a QLoRA run's base in 4 bits on a GPU only; on a CPU it loads 16/32-bit weights.
        "four_bit_expected": cuda,
        "versions": _versions(),
    }
    try:
        model_dir = work / "base"
        print(f"building the random {shape} model on {'the GPU' if cuda else 'the CPU'}", flush=True)
        results["build"] = build_model(model_dir, shape)
        # build_model's model is gone once it returns; its GPU memory goes back before the measured load.
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        run_dir, adapter = make_run(work / "workspace", model_dir, recipe="qlora-7b", seed=SEED)
        results["adapter"] = adapter
        print(f"run {run_dir.name}: adapter {adapter['parameters'] / 1e6:.1f}M parameters", flush=True)

        recorder = Recorder()
        engine = ChatEngine(recorder, Workspace.open(work / "workspace", create=False))
        started = time.perf_counter()
        loaded = engine.load(LoadSpec(run=str(run_dir), device="auto"))
        load_s = time.perf_counter() - started
        failed = [e for _, e in recorder.events if isinstance(e, RunFailed)]
        if not loaded or failed:
            reason = f"{failed[-1].title}: {failed[-1].cause}" if failed else "no chat_ready"
            raise SystemExit(f"the chat engine could not load the run: {reason}")
        ready = next(e for _, e in recorder.events if isinstance(e, ChatReady))
        model = engine.backend.model
        four_bit = sum(1 for m in model.modules() if "4bit" in type(m).__name__)
        lora = sum(1 for name, _ in model.named_modules() if name.endswith("lora_A.default"))
        results["load"] = {
            "seconds": round(load_s, 1),
            "backend": ready.backend,
            "linear_4bit_modules": four_bit,
            "lora_modules": lora,
            "memory_after_load": gpu_memory(torch),
        }
        print(f"loaded in {load_s:.1f} s: {four_bit} 4-bit linear layers, {lora} LoRA modules", flush=True)
        if cuda and four_bit == 0:
            raise SystemExit("the chat engine loaded the base without 4-bit layers on a GPU")

        messages = [
            {"role": "user", "content": prompt_text(SHAPES[shape]["vocab_size"], args.prompt_words, SEED)}
        ]

        def request(name: str, new_tokens: int) -> GenerateRequest:
            return GenerateRequest(id=name, messages=messages, max_new_tokens=new_tokens, temperature=0.0)

        results["warmup"] = reply(engine, recorder, request("warmup", 16))
        prefill = [reply(engine, recorder, request(f"prefill{i}", 1)) for i in range(args.repeats)]
        full = [reply(engine, recorder, request(f"full{i}", args.new_tokens)) for i in range(args.repeats)]
        prompt_tokens = len(_prompt_ids(engine, messages))
        one_token_s = statistics.median(r["wall_s"] for r in prefill)
        full_s = statistics.median(r["wall_s"] for r in full)
        tokens = statistics.median(r["tokens"] for r in full)
        results["generation"] = {
            "batch": 1,
            "greedy": True,
            "prompt_tokens": prompt_tokens,
            "new_tokens_asked": args.new_tokens,
            "new_tokens_median": tokens,
            "repeats": args.repeats,
            "prefill_s": round(one_token_s, 4),
            "prefill_tokens_per_s": round(prompt_tokens / one_token_s, 1),
            "reply_s": round(full_s, 3),
            "decode_tokens_per_s": round((tokens - 1) / (full_s - one_token_s), 2)
            if tokens > 1 and full_s > one_token_s
            else None,
            "engine_tokens_per_s": statistics.median(r["engine_tokens_per_s"] for r in full),
            "prefill_runs": prefill,
            "full_runs": full,
        }
        results["memory"] = gpu_memory(torch)
        engine.close()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    generation = results["generation"]
    print(
        f"\n{results['device']}: prompt {generation['prompt_tokens']} tokens, prefill "
        f"{generation['prefill_s'] * 1000:.0f} ms ({generation['prefill_tokens_per_s']:,.0f} tok/s); decode "
        f"{generation['decode_tokens_per_s']} tok/s over {generation['new_tokens_median']} tokens; the engine's "
        f"own figure {generation['engine_tokens_per_s']} tok/s; peak GPU memory "
        f"{results['memory'].get('peak_allocated_gib', 'n/a')} GiB allocated"
    )
    print(f"wrote {args.out / 'results.json'}")
    return 0


def _prompt_ids(engine: ChatEngine, messages: list[dict[str, str]]) -> list[int]:
    """The prompt's token ids exactly as the engine's generate() encodes them."""
    from engine.generation import prompt_ids

    return prompt_ids(engine.backend.tokenizer, messages)


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            found[name] = str(__import__(name).__version__)
        except Exception as exc:  # a missing or broken optional library is recorded, not fatal
            found[name] = f"unavailable ({type(exc).__name__})"
    return found


if __name__ == "__main__":
    sys.exit(main())
