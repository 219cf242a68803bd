"""Times `tunedeck export` of a random-init 7B-shaped Llama on this CPU, then llama.cpp's q4_0 decode speed.

One invocation builds (or reuses, --model-dir) a bf16 Llama of the 7B shape (hidden 4096, intermediate 11008,
32 layers, 32 heads, 32 kv heads, vocab 32000) with a SentencePiece tokenizer of 32,000 pieces, written layer by
layer into safetensors shards so the build never holds the model in memory; makes a qlora-7b run whose checkpoint
holds a random LoRA adapter (r=64, alpha=16, all linear layers, non-zero B: bench/random_run.py); runs
`python -m engine.export` on it (the process `tunedeck export` and the TUI start) with f16 + q4_0 + q5_1 + q8_0,
timing each stage from its Progress events; then loads the q4_0 GGUF with llama-cpp-python and times prompt
evaluation and greedy decoding separately. It writes results.json and results.md into --out.

    python bench/export_7b.py --out /tmp/e7 --work /tmp/e7-work --keep     # ~55 GB of disk, ~10 minutes on 2 cores
    python bench/export_7b.py --out /tmp/e7 --model-dir /tmp/e7-work/base  # reuse a built base model
    python bench/export_7b.py --out /tmp/e7-tiny --shape tiny              # smoke test, seconds

The export's parity stage is skipped with its own flag (--no-parity): it answers 30 training and 30 held-out
questions with the adapter and with every GGUF, hours for a 7B on a 2-core CPU, and random weights answer
gibberish anyway. The weights being random, only the speeds and sizes mean anything.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import platform
import random
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for folder in (REPO, REPO / "bench"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from export_demo import export  # noqa: E402
from random_run import make_run  # noqa: E402
from train_throughput import SHAPES, param_count  # noqa: E402

from engine.workspace import latest_checkpoint  # noqa: E402

SEED = 0
QUANTS = "q4_0,q5_1,q8_0"
# Close to what a person asks; the random model's answer is gibberish, only the speed matters.
PROMPT = (
    "[INST] How do I resume a fine-tuning run after my SSH session dropped in the middle of training? [/INST]"
)
# A Llama-2-chat style template over the vocabulary's own <s> and </s>: no tokens to add, as in a real Llama.
LLAMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<<SYS>>\\n' + message['content'] + '\\n<</SYS>>\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)
GB = 1e9
GIB = 1024**3


# ------------------------------------------------------------------------------------------------------------
# The machine and its memory
# ------------------------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory and library versions of this machine."""
    cpu_model, flags = "", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu_model:
                cpu_model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    meminfo = _meminfo()
    versions: dict[str, str] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "safetensors", "sentencepiece", "llama_cpp"):
        with contextlib.suppress(Exception):
            versions[name] = str(__import__(name).__version__)
    llama_features = ""
    with contextlib.suppress(Exception):
        import llama_cpp

        llama_features = llama_cpp.llama_print_system_info().decode().strip()
    return {
        "cpu_model": cpu_model,
        "cpu_flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c"))),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "memory_total_gib": round(meminfo.get("MemTotal", 0) / GIB, 1),
        "memory_available_gib_at_start": round(meminfo.get("MemAvailable", 0) / GIB, 1),
        "kernel": platform.release(),
        "gpu": "none (CPU only)",
        "llama_cpp_system_info": llama_features,
        "versions": versions,
    }


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    values: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                values[key] = int(parts[0]) * 1024
    return values


def _status_bytes(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of one process, in bytes (empty when it is gone)."""
    found: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                found[key] = int(rest.split()[0]) * 1024
    return found


class TreeMemory:
    """Samples the resident memory of this process and its descendants; keeps the peaks of each phase."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.phase = "setup"
        self.peaks: dict[str, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                processes = [me, *me.children(recursive=True)]
                rows = [(p.pid, p.name(), _status_bytes(p.pid)) for p in processes]
                self._record(rows)
            self._stop.wait(self.interval_s)

    def _record(self, rows: list[tuple[int, str, dict[str, int]]]) -> None:
        peak = self.peaks.setdefault(
            self.phase, {"tree_rss": 0, "tree_anon": 0, "process_rss": 0, "process_anon": 0, "process": ""}
        )
        peak["tree_rss"] = max(peak["tree_rss"], sum(r[2].get("VmRSS", 0) for r in rows))
        peak["tree_anon"] = max(peak["tree_anon"], sum(r[2].get("RssAnon", 0) for r in rows))
        for pid, name, values in rows:
            if values.get("VmRSS", 0) > peak["process_rss"]:
                peak["process_rss"], peak["process"] = values["VmRSS"], f"{name} (pid {pid})"
            peak["process_anon"] = max(peak["process_anon"], values.get("RssAnon", 0))

    def report(self) -> dict[str, dict[str, Any]]:
        """Peaks per phase in GiB: summed over the process tree, and of the largest single process."""
        out = {}
        for phase, peak in self.peaks.items():
            out[phase] = {
                "tree_rss_gib": round(peak["tree_rss"] / GIB, 2),
                "tree_anon_gib": round(peak["tree_anon"] / GIB, 2),
                "largest_process_rss_gib": round(peak["process_rss"] / GIB, 2),
                "largest_process_anon_gib": round(peak["process_anon"] / GIB, 2),
                "largest_process": peak["process"],
            }
        return out


# ------------------------------------------------------------------------------------------------------------
# The base model: random bf16 weights written shard by shard, and a SentencePiece tokenizer
# ------------------------------------------------------------------------------------------------------------


def build_tokenizer(model_dir: Path, vocab_size: int, seed: int) -> dict[str, Any]:
    """Train a Llama-style SentencePiece BPE (byte fallback, <unk> <s> </s>) of `vocab_size` pieces into
    `model_dir` as tokenizer.model plus the transformers files, with a Llama-2-chat style template."""
    import sentencepiece
    from transformers import AutoTokenizer

    started = time.perf_counter()
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    # Enough distinct made-up words, with Zipf-like frequencies, that BPE finds all the merges it needs.
    lexicon = sorted(
        {"".join(rng.choices(letters, k=rng.randint(2, 11))) for _ in range(max(2000, vocab_size * 2))}
    )
    rng.shuffle(lexicon)
    cumulative, total = [], 0.0
    for rank in range(len(lexicon)):
        total += 1.0 / (rank + 10)
        cumulative.append(total)
    lines = []
    for _ in range(max(2000, vocab_size + vocab_size // 4)):
        words = rng.choices(lexicon, cum_weights=cumulative, k=rng.randint(5, 25))
        lines.append(" ".join(words) + rng.choice(".?!,") + f" {rng.randint(0, 9999)}")
    with tempfile.TemporaryDirectory(prefix="tunedeck-spm-") as scratch:
        corpus = Path(scratch) / "corpus.txt"
        corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
        prefix = Path(scratch) / "spm"
        sentencepiece.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            character_coverage=1.0,
            split_digits=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            normalization_rule_name="identity",
            add_dummy_prefix=True,
            remove_extra_whitespaces=False,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
        staging = Path(scratch) / "hf"
        staging.mkdir()
        shutil.copy2(f"{prefix}.model", staging / "tokenizer.model")
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
        }
        (staging / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        # transformers builds its fast tokenizer from tokenizer.model; llama.cpp's converter reads tokenizer.model.
        tokenizer = AutoTokenizer.from_pretrained(str(staging))
        tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
        tokenizer.save_pretrained(str(model_dir))
        shutil.copy2(staging / "tokenizer.model", model_dir / "tokenizer.model")
    if len(tokenizer) != vocab_size:
        raise SystemExit(f"the tokenizer has {len(tokenizer)} tokens, not {vocab_size}")
    return {
        "kind": "sentencepiece bpe",
        "pieces": len(tokenizer),
        "seconds": round(time.perf_counter() - started, 1),
    }


def build_base(model_dir: Path, shape: str, seed: int) -> dict[str, Any]:
    """A random-init bf16 Llama of `shape` saved as a Hugging Face folder, one safetensors shard per layer."""
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    started = time.perf_counter()
    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(model_dir, SHAPES[shape]["vocab_size"], seed)
    config = LlamaConfig(
        **SHAPES[shape],
        max_position_embeddings=4096 if shape == "7b" else 256,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.bfloat16
    # The meta device gives every tensor's name and shape without allocating the weights.
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in LlamaForCausalLM(config).state_dict().items()}
    groups: dict[int, list[str]] = {}
    layers = config.num_hidden_layers
    for name in shapes:
        if name.startswith("model.embed_tokens."):
            index = 0
        elif name.startswith("model.layers."):
            index = int(name.split(".")[2]) + 1
        else:
            index = layers + 1
        groups.setdefault(index, []).append(name)
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total_bytes = 0
    count = len(groups)
    for number, index in enumerate(sorted(groups), start=1):
        tensors = {}
        for name in sorted(groups[index]):
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                tensor = torch.empty(shapes[name], dtype=torch.bfloat16)
                tensors[name] = tensor.normal_(0.0, config.initializer_range, generator=generator)
        shard = f"model-{number:05d}-of-{count:05d}.safetensors"
        save_file(tensors, str(model_dir / shard), metadata={"format": "pt"})
        for name, tensor in tensors.items():
            weight_map[name] = shard
            total_bytes += tensor.numel() * tensor.element_size()
        # Only one shard's tensors are alive at a time: that is the build's whole memory.
        del tensors
    index_file = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2) + "\n")
    config.save_pretrained(str(model_dir))
    GenerationConfig.from_model_config(config).save_pretrained(str(model_dir))
    return {
        "seconds": round(time.perf_counter() - started, 1),
        "parameters": sum(_numel(s) for s in shapes.values()),
        "bytes": total_bytes,
        "shards": count,
        "tokenizer": tokenizer,
    }


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


# ------------------------------------------------------------------------------------------------------------
# The export, as `tunedeck export` runs it
# ------------------------------------------------------------------------------------------------------------


def stage_steps(timeline: list[dict[str, Any]], stage: str) -> dict[str, float]:
    """Seconds from each progress message of `stage` to the next (its last step ends at "done")."""
    rows = [row for row in timeline if row["stage"] == stage]
    return {
        row["message"]: round(following["t_s"] - row["t_s"], 1)
        for row, following in itertools.pairwise(rows)
        if row["message"] != "done"
    }


def flush_to_disk() -> float:
    """Write every dirty page to disk (the export leaves tens of GB in the page cache); returns the seconds."""
    # Background writeback competes for the 2 cores and would slow the decode timings that follow.
    started = time.perf_counter()
    os.sync()
    return round(time.perf_counter() - started, 1)


# ------------------------------------------------------------------------------------------------------------
# llama.cpp decoding
# ------------------------------------------------------------------------------------------------------------


def decode_speed(gguf: Path, *, threads: int, new_tokens: int, repeats: int) -> dict[str, Any]:
    """Prompt evaluation and greedy decoding speed of `gguf` in llama-cpp-python, EOS ignored (random weights
    would stop anywhere); the median of `repeats` runs after one warm-up run."""
    import llama_cpp
    import numpy as np

    from engine.quantize import install_log_capture

    install_log_capture()  # llama.cpp's log goes to Python logging, not over this script's table
    started = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=str(gguf),
        n_ctx=512,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    load_s = time.perf_counter() - started
    prompt = llm.tokenize(PROMPT.encode(), add_bos=True, special=True)
    n_vocab = llm.n_vocab()

    def next_token() -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        return int(np.argmax(logits))

    def one_run(count: int) -> dict[str, Any]:
        llm.reset()
        llama_cpp.llama_perf_context_reset(llm.ctx)
        began = time.perf_counter()
        llm.eval(prompt)
        prompt_done = time.perf_counter()
        generated = []
        for _ in range(count):
            token = next_token()
            generated.append(token)
            llm.eval([token])
        finished = time.perf_counter()
        perf = llama_cpp.llama_perf_context(llm.ctx)
        return {
            "prompt_s": prompt_done - began,
            "decode_s": finished - prompt_done,
            "prompt_tokens_per_s": len(prompt) / (prompt_done - began),
            "decode_tokens_per_s": count / (finished - prompt_done),
            "llama_cpp_prompt_tokens_per_s": perf.n_p_eval / (perf.t_p_eval_ms / 1000)
            if perf.t_p_eval_ms
            else 0,
            "llama_cpp_decode_tokens_per_s": perf.n_eval / (perf.t_eval_ms / 1000) if perf.t_eval_ms else 0,
            "llama_cpp_counts": {"n_p_eval": perf.n_p_eval, "n_eval": perf.n_eval},
            "text": llm.detokenize(generated).decode("utf-8", errors="replace"),
        }

    # The warm-up faults in every page of the mapped file and settles llama.cpp's buffers.
    warmup = one_run(16)
    runs = [one_run(new_tokens) for _ in range(repeats)]
    llm.close()

    def median(key: str) -> float:
        return round(statistics.median(run[key] for run in runs), 2)

    def spread(key: str) -> list[float]:
        return [round(min(run[key] for run in runs), 2), round(max(run[key] for run in runs), 2)]

    return {
        "file": gguf.name,
        "threads": threads,
        "n_ctx": 512,
        "load_s": round(load_s, 2),
        "prompt_tokens": len(prompt),
        "new_tokens": new_tokens,
        "repeats": repeats,
        "prompt_tokens_per_s": median("prompt_tokens_per_s"),
        "decode_tokens_per_s": median("decode_tokens_per_s"),
        "llama_cpp_prompt_tokens_per_s": median("llama_cpp_prompt_tokens_per_s"),
        "llama_cpp_decode_tokens_per_s": median("llama_cpp_decode_tokens_per_s"),
        "prompt_tokens_per_s_min_max": spread("prompt_tokens_per_s"),
        "decode_tokens_per_s_min_max": spread("decode_tokens_per_s"),
        "warmup": {k: round(v, 2) if isinstance(v, float) else v for k, v in warmup.items() if k != "text"},
        "runs": [{k: round(v, 3) if isinstance(v, float) else v for k, v in run.items()} for run in runs],
    }


# ------------------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------------------


def markdown(summary: dict[str, Any]) -> str:
    """results.md: the stage table, file sizes and decode speeds, with what was measured and how."""
    machine = summary["machine"]
    export = summary["export"]
    lines = [
        f"# Export of a 7B-shaped model and llama.cpp decoding on a CPU ({summary['date']})",
        "",
        f"Machine: {machine['cpu_model']}, {machine['usable_cpus']} cores, {machine['memory_total_gib']} GiB "
        f"memory, no GPU. llama.cpp features: {machine['llama_cpp_system_info']}",
        "",
        f"Model: random-init Llama, shape `{summary['shape']}` ({summary['base']['parameters'] / 1e9:.2f}B "
        f"parameters, bf16, {summary['base']['bytes'] / GB:.1f} GB), SentencePiece tokenizer of "
        f"{summary['base']['tokenizer']['pieces']} pieces; adapter LoRA r={summary['adapter']['r']} "
        f"alpha={summary['adapter']['alpha']} on every {', '.join(summary['adapter']['module_kinds'])} with random "
        f"non-zero A and B ({summary['adapter']['parameters'] / 1e6:.0f}M parameters, float32), in a "
        f"`{summary['adapter']['recipe']}` run.",
        "",
        f"## `tunedeck export` ({summary['command']})",
        "",
        f"Merge in {export['merge_dtype']}, saved as {export['saved_dtype']}; llama.cpp threads for quantizing: "
        f"{summary['threads']}.",
        "",
        "| stage | seconds | share |",
        "| --- | ---: | ---: |",
    ]
    for name, seconds in export["stages_s"].items():
        lines.append(f"| {name} | {seconds:,.1f} | {seconds / export['wall_s'] * 100:.0f}% |")
    lines += [f"| **total (wall)** | **{export['wall_s']:,.1f}** | |", "", "| file | size | llama.cpp type |"]
    lines.append("| --- | ---: | --- |")
    for check in export["files"].values():
        lines.append(f"| {check['file']} | {check['size_bytes'] / GB:.2f} GB | {check['llama_cpp_desc']} |")
    for warning in export["warnings"]:
        lines.append(f"\nWarning from the export: {warning}")
    memory = summary["memory"]
    lines += ["", "Peak resident memory (GiB; RSS counts memory-mapped file pages too, anon does not):", ""]
    lines += ["| phase | largest process RSS | its anon | whole tree RSS | process |"]
    lines.append("| --- | ---: | ---: | ---: | --- |")
    for phase, peak in memory.items():
        lines.append(
            f"| {phase} | {peak['largest_process_rss_gib']} | {peak['largest_process_anon_gib']} | "
            f"{peak['tree_rss_gib']} | {peak['largest_process']} |"
        )
    lines += ["", "## llama.cpp decoding (llama-cpp-python)", ""]
    lines.append(
        "| file | threads | prompt tokens | prompt eval tok/s | decode tok/s | llama.cpp's counters |"
    )
    lines.append("| --- | ---: | ---: | ---: | ---: | --- |")
    for result in summary["decode"]:
        lines.append(
            f"| {result['file']} | {result['threads']} | {result['prompt_tokens']} | "
            f"{result['prompt_tokens_per_s']:.1f} | {result['decode_tokens_per_s']:.2f} | "
            f"{result['llama_cpp_prompt_tokens_per_s']:.1f} / {result['llama_cpp_decode_tokens_per_s']:.2f} |"
        )
    if summary["decode"]:
        first = summary["decode"][0]
        lines += [
            "",
            f"Each figure is the median of {first['repeats']} runs after a warm-up run: the prompt "
            f"({first['prompt_tokens']} tokens) evaluated in one batch, then {first['new_tokens']} tokens decoded "
            "one at a time by greedy argmax over the logits, EOS ignored, n_ctx 512.",
        ]
    lines += ["", "## What was skipped", "", *[f"- {item}" for item in summary["skipped"]], ""]
    return "\n".join(lines)


def print_table(summary: dict[str, Any]) -> None:
    """The same figures on stdout."""
    export = summary["export"]
    print(f"\n{'stage':<28}{'seconds':>10}{'share':>8}")
    for name, seconds in export["stages_s"].items():
        print(f"{name:<28}{seconds:>10.1f}{seconds / export['wall_s'] * 100:>7.0f}%")
    print(f"{'total (wall)':<28}{export['wall_s']:>10.1f}")
    print("\n" + ", ".join(f"{k} {v['size_bytes'] / GB:.2f} GB" for k, v in export["files"].items()))
    for result in summary["decode"]:
        print(
            f"{result['file']}: prompt eval {result['prompt_tokens_per_s']:.1f} tok/s "
            f"({result['prompt_tokens']} tokens), decode {result['decode_tokens_per_s']:.2f} tok/s "
            f"({result['new_tokens']} tokens, {result['threads']} threads)"
        )
    for phase, peak in summary["memory"].items():
        print(f"peak RSS {phase}: {peak['largest_process_rss_gib']} GiB ({peak['largest_process']})")


def _disk_needed(parameters: int, build: bool) -> int:
    """Bytes the run writes: the base (when built), merged f16, f16 GGUF and the three quantized files."""
    from engine.quantize import estimated_size

    quants = sum(estimated_size(parameters, q) for q in QUANTS.split(","))
    return int(((2 * parameters if build else 0) + 4 * parameters + quants) * 1.1)


def main() -> int:
    """Build the model and run, export it, measure decoding, write results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json and results.md")
    parser.add_argument(
        "--work", type=Path, help="folder for the model, run and export (default: a temp folder)"
    )
    parser.add_argument("--model-dir", type=Path, help="reuse this base model folder instead of building one")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--quant", default=QUANTS)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp threads")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode", default="q4_0", help="comma-separated GGUF types to time decoding of")
    parser.add_argument("--keep", action="store_true", help="keep the model, run and export files")
    parser.add_argument("--build-only", action="store_true", help="build the base model into --work and stop")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="tunedeck-export-7b-"))
    work.mkdir(parents=True, exist_ok=True)
    created: list[Path] = []
    parameters = param_count(SHAPES[args.shape])
    needed = _disk_needed(parameters, args.model_dir is None)
    free = shutil.disk_usage(work).free
    if free < needed:
        raise SystemExit(f"{work} has {free / GB:.0f} GB free; this run writes about {needed / GB:.0f} GB")
    machine = machine_info()
    print(
        f"{machine['cpu_model']}, {machine['usable_cpus']} cores, {machine['memory_total_gib']} GiB",
        flush=True,
    )
    summary: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "shape": args.shape,
        "shape_config": SHAPES[args.shape],
        "machine": machine,
        "threads": args.threads,
        "seed": SEED,
    }
    with TreeMemory() as memory:
        try:
            if args.model_dir is None:
                memory.phase = "build base"
                model_dir = work / "base"
                created.append(model_dir)
                print(f"building the random {args.shape} base in {model_dir}", flush=True)
                summary["base"] = build_base(model_dir, args.shape, SEED)
            else:
                model_dir = args.model_dir.resolve()
                summary["base"] = {
                    "reused": str(model_dir),
                    "parameters": parameters,
                    "bytes": sum(p.stat().st_size for p in model_dir.glob("*.safetensors")),
                    "tokenizer": {"pieces": SHAPES[args.shape]["vocab_size"]},
                }
            print(f"base ready: {json.dumps(summary['base'])}", flush=True)
            if args.build_only:
                created.clear()  # the base is what was asked for: never cleaned up
                return 0
            memory.phase = "adapter"
            workspace = work / "workspace"
            created.append(workspace)
            run_dir, adapter = make_run(workspace, model_dir, recipe="qlora-7b", seed=SEED)
            # The checkpoint's tokenizer was saved as the Trainer saves it (transformers 5 writes no
            # tokenizer.model), and export pre-flight then fingerprints its tokenizer.json as an unknown BPE
            # and refuses; with the base's tokenizer.model beside it, it reads it as SentencePiece, as the
            # converter does. See the results file: that refusal is a finding about the engine.
            shutil.copy2(model_dir / "tokenizer.model", latest_checkpoint(run_dir) / "tokenizer.model")
            summary["adapter"] = adapter
            print(f"run {run_dir.name}: adapter {adapter['parameters'] / 1e6:.1f}M parameters", flush=True)
            memory.phase = "export"
            export_dir = work / "export"
            created.append(export_dir)
            summary["command"] = (
                f"python -m engine.export --quant {args.quant} --no-parity --threads {args.threads}"
            )
            print(f"exporting: {summary['command']}", flush=True)
            wall, stages, report, timeline = export(
                run_dir,
                export_dir,
                args.quant,
                ["--no-parity", "--threads", str(args.threads)],
                log_path=work / "export.stderr.log",
                echo=True,
            )
            memory.phase = "sync"
            synced = flush_to_disk()
            print(f"os.sync() after the export: {synced} s", flush=True)
            summary["export"] = {
                "wall_s": round(wall, 1),
                "stages_s": {name: round(value, 1) for name, value in stages.items()},
                "merge_steps_s": stage_steps(timeline, "merge"),
                "sync_after_export_s": synced,
                "timeline": timeline,
                "report_durations_s": report["durations_s"],
                "merge_dtype": report["merge_dtype"],
                "saved_dtype": report["saved_dtype"],
                "parameters": report["parameters"],
                "files": report["files"],
                "warnings": report["warnings"],
                "chat": report["chat"],
            }
            summary["decode"] = []
            for kind in [k.strip() for k in args.decode.split(",") if k.strip()]:
                memory.phase = f"decode {kind}"
                gguf = export_dir / report["files"][kind]["file"]
                flush_to_disk()
                print(f"timing llama.cpp decoding of {gguf.name}", flush=True)
                summary["decode"].append(
                    decode_speed(gguf, threads=args.threads, new_tokens=args.new_tokens, repeats=args.repeats)
                )
        finally:
            memory.phase = "cleanup"
            if not args.keep:
                for path in created:
                    shutil.rmtree(path, ignore_errors=True)
                with contextlib.suppress(OSError):
                    work.rmdir()  # only when empty: a --work folder the user filled is left alone
    summary["memory"] = {k: v for k, v in memory.report().items() if k != "cleanup"}
    summary["ru_maxrss_gib"] = {
        "this process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 2),
        "largest child (export, converter)": round(
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / GIB, 2
        ),
    }
    summary["skipped"] = [
        "The export's parity stage (`--no-parity`, the export's own option): it answers up to 30 training and "
        "30 held-out questions with the adapter (transformers) and with every GGUF, hours for a 7B on 2 cores, "
        "and random weights make the comparison meaningless.",
        "Training: the adapter is random (non-zero A and B), written straight into a checkpoint of a "
        "`qlora-7b` run made by `prepare_run`; the export cannot tell it from a trained one.",
        "A GPU: none here, and the GPU machine has no llama-cpp-python; every figure is this CPU's.",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (args.out / "results.md").write_text(markdown(summary), encoding="utf-8")
    print_table(summary)
    print(f"\nwrote {args.out / 'results.json'} and results.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
