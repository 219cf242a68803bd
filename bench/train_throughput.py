"""Side-by-side QLoRA training throughput on one GPU: the seeds' recipe, Unsloth, and tunedeck's engine.

One invocation builds a random-init model of a given shape (7B Llama by default), draws synthetic QA-shaped data
with a fixed seed, and trains every arm in its own subprocess (Unsloth patches transformers globally) on 16 samples
per optimizer step; the engine arm is tunedeck's own trainer with the shipped qlora-7b recipe, one process per
token budget. Each arm reports real (non-pad) tokens/s over the steps after warm-up, peak GPU memory, MFU and its
per-step losses; the parent writes results.json / results.md with the ratios and the loss agreement.

    python bench/train_throughput.py --out /tmp/bench                   # all arms, 7B shape, needs a CUDA GPU
    python bench/train_throughput.py --out /tmp/b --shape tiny --arms seeds,engine-baseline,engine   # CPU smoke
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import itertools
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SHAPES = {
    "7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    ),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ARM_TITLES = {
    "seeds": "(a) seeds' recipe: HF Trainer + peft + bnb, padded batches of 4 × accumulation 4, random order",
    "unsloth": "(b) Unsloth: batches of 16 grouped by length, its gradient checkpointing, LoRA dropout 0",
    "engine-baseline": "(c0) tunedeck recipe through the plain HF forward: padded batch of 16, grouped",
    "engine": "(c) tunedeck's trainer (engine.train) with its qlora-7b recipe, which trains on packs "
    "(engine/fast.py): padding-free, varlen flash attention",
    "engine-runner": "engine/fast.py's runner in a bare loop, one row per option variant (experiments)",
}
DEFAULT_ARMS = "engine,unsloth,seeds,engine-baseline"
# Makes load_tokenizer find a template, so it adds no ChatML tokens: every arm trains the same vocabulary.
PLAIN_CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }} {% endfor %}"
H100_BF16_DENSE_FLOPS = 989.4e12  # datasheet, SXM; the measured 8192³ bf16 matmul ran at ~798 TFLOP/s here
LEARNING_RATE = 2e-4
SEED = 42


# ------------------------------------------------------------------------------------------------------------
# Shared helpers
# ------------------------------------------------------------------------------------------------------------


def param_count(shape: dict[str, int]) -> int:
    """Parameters of the bf16 model (embeddings, lm_head, layers, norms): the N in 6·N·tokens."""
    h, i, v, layers = (
        shape["hidden_size"],
        shape["intermediate_size"],
        shape["vocab_size"],
        shape["num_hidden_layers"],
    )
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return 2 * v * h + layers * per_layer + h


def make_data(shape: str, steps: int, samples_per_step: int, seed: int) -> dict[str, Any]:
    """QA-like samples: prompt 20–300 and answer 20–600 tokens (log-uniform), capped at 1,024; Zipf token
    ids."""
    from engine.fast import length_grouped_steps

    rng = random.Random(seed)
    vocab = SHAPES[shape]["vocab_size"]
    cap = 1024 if shape == "7b" else 96
    lo_p, hi_p, lo_a, hi_a = (20, 300, 20, 600) if shape == "7b" else (4, 30, 4, 60)
    # Zipf(1.1) over the non-special ids: a learnable unigram distribution, so losses move over a few steps.
    weights = [1.0 / (rank + 1) ** 1.1 for rank in range(vocab - 4)]
    ids = list(range(4, vocab))
    samples = []
    for _ in range(steps * samples_per_step):
        prompt = round(math.exp(rng.uniform(math.log(lo_p), math.log(hi_p))))
        answer = round(math.exp(rng.uniform(math.log(lo_a), math.log(hi_a))))
        answer = min(answer, cap - prompt)
        tokens = rng.choices(ids, weights=weights, k=prompt + answer)
        samples.append({"ids": tokens, "prompt_len": prompt})
    lengths = [len(s["ids"]) for s in samples]
    order = list(range(len(samples)))
    random.Random(seed + 1).shuffle(order)
    random_steps = [order[k : k + samples_per_step] for k in range(0, len(order), samples_per_step)]
    grouped_steps = length_grouped_steps(lengths, samples_per_step, seed=seed + 2)
    return {"samples": samples, "random_steps": random_steps, "grouped_steps": grouped_steps}


def labels_of(sample: dict[str, Any]) -> list[int]:
    """Labels with the prompt masked: loss on answer tokens only."""
    return [-100] * sample["prompt_len"] + sample["ids"][sample["prompt_len"] :]


class MemorySampler:
    """Samples device-wide used memory (cudaMemGetInfo) in a thread: counts what torch's allocator does not
    see,
    such as the paged optimizer's managed memory and the CUDA context."""

    def __init__(self, interval_s: float = 0.02) -> None:
        import torch

        self.torch = torch
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            free, total = self.torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            time.sleep(self.interval_s)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def summarize_steps(
    step_times: list[float],
    step_tokens: list[int],
    losses: list[float],
    warmup: int,
    shape: str,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Throughput over the steps after warm-up, plus MFU under the 6·N·tokens convention."""
    timed_time = sum(step_times[warmup:])
    timed_tokens = sum(step_tokens[warmup:])
    tok_s = timed_tokens / timed_time if timed_time > 0 else 0.0
    n_params = param_count(SHAPES[shape])
    return {
        "steps": len(step_times),
        "warmup_steps": warmup,
        "timed_steps": len(step_times) - warmup,
        "timed_tokens": timed_tokens,
        "timed_seconds": round(timed_time, 3),
        "tokens_per_s": round(tok_s, 1),
        "s_per_step": round(timed_time / max(1, len(step_times) - warmup), 4),
        "mfu": round(6 * n_params * tok_s / H100_BF16_DENSE_FLOPS, 4),
        "losses": [round(x, 5) for x in losses],
        "step_times": [round(x, 4) for x in step_times],
        "step_tokens": step_tokens,
        **extra,
    }


def memory_fields(torch: Any, sampler: MemorySampler | None, runner: Any = None) -> dict[str, Any]:
    """Peak GPU memory; an engine runner's CUDA-graph pool (reserved, never counted as allocated by the
    allocator, yet used by every replay) is added to its peak allocation and shown on its own."""
    gib = 1024**3
    if not torch.cuda.is_available():
        return {}
    pool = runner.graph_pool_bytes() if runner is not None else 0
    graphs = getattr(runner, "graphs", None)
    peak = runner.peak_memory_bytes() if runner is not None else torch.cuda.max_memory_allocated()
    return {
        "peak_allocated_gib": round(peak / gib, 3),
        "graph_pool_gib": round(pool / gib, 3),
        "graph_capture_s": round(graphs.capture_s, 1) if graphs is not None else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / gib, 3),
        "peak_device_used_gib": round(sampler.peak / gib, 3) if sampler else None,
    }


# ------------------------------------------------------------------------------------------------------------
# Model building
# ------------------------------------------------------------------------------------------------------------


def build_model(model_dir: Path, shape: str) -> dict[str, Any]:
    """Random-init bf16 model of the shape plus a word-level tokenizer covering the whole vocabulary."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    started = time.perf_counter()
    vocab = SHAPES[shape]["vocab_size"]
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = {name: i for i, name in enumerate(specials)}
    words.update({f"t{i}": i for i in range(len(specials), vocab)})
    tokenizer = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = PLAIN_CHAT_TEMPLATE
    config = LlamaConfig(
        **SHAPES[shape],
        max_position_embeddings=4096 if shape == "7b" else 256,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
    return {
        "build_s": round(time.perf_counter() - started, 1),
        "params": sum(p.numel() for p in model.parameters()),
    }


def load_4bit(model_dir: Path, torch: Any, device_index: int = 0) -> Any:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32,
    )
    return AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=quant,
        dtype=torch.bfloat16 if cuda else torch.float32,
        device_map={"": device_index} if cuda else "cpu",
        attn_implementation="sdpa",
    )


def lora_config(dropout: float) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=64,
        lora_alpha=16,
        lora_dropout=dropout,
        target_modules=LORA_TARGETS,
        bias="none",
        task_type="CAUSAL_LM",
    )


# ------------------------------------------------------------------------------------------------------------
# Arms run by the HF Trainer: (a) seeds, (b) unsloth
# ------------------------------------------------------------------------------------------------------------


class _ListDataset:
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]


def pad_collator(pad_id: int, multiple: int = 8) -> Any:
    import torch

    def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        longest = max(len(r["input_ids"]) for r in rows)
        longest = (longest + multiple - 1) // multiple * multiple
        ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for k, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[k, :n] = torch.tensor(r["input_ids"])
            labels[k, :n] = torch.tensor(r["labels"])
            mask[k, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


PROFILED_STEPS = 3


def step_recorder(torch: Any, timed_steps: int, profile: bool) -> Any:
    """A Trainer callback recording each step's wall time (GPU synchronised) and logged loss; with `profile`,
    it profiles the steps after the first `timed_steps` (extra steps, so the profiler never slows a timed
    one)."""
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()

    class StepRecorder(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[float] = []
            self.losses: list[float] = []
            self.profiler: Any = None
            self.profile_started = 0.0
            self.profile: dict[str, Any] | None = None

        def _sync(self) -> None:
            if cuda:
                torch.cuda.synchronize()

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            self._sync()
            self.marks.append(time.perf_counter())

        def on_step_begin(self, _args: Any, state: Any, *a: Any, **k: Any) -> None:
            if profile and cuda and state.global_step == timed_steps and self.profiler is None:
                from torch.profiler import ProfilerActivity

                self._sync()
                self.profiler = torch.profiler.profile(
                    activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]
                )
                self.profiler.__enter__()
                self.profile_started = time.perf_counter()

        def on_step_end(self, _args: Any, state: Any, *a: Any, **k: Any) -> None:
            self._sync()
            if state.global_step <= timed_steps:
                self.marks.append(time.perf_counter())
            elif self.profiler is not None and state.global_step == timed_steps + PROFILED_STEPS:
                wall = time.perf_counter() - self.profile_started
                self.profiler.__exit__(None, None, None)
                self.profile = profile_summary(self.profiler, wall)
                self.profiler = None

        def on_log(
            self, _args: Any, state: Any, _control: Any, logs: dict[str, Any] | None = None, **k: Any
        ) -> None:
            if logs and "loss" in logs and state.global_step <= timed_steps:
                self.losses.append(float(logs["loss"]))

    return StepRecorder()


def profile_summary(prof: Any, wall_s: float, tokens: int | None = None) -> dict[str, Any]:
    """GPU time by kernel, GPU time by the operator that launched it, host time by operator, and how busy the
    GPU was over the wall time (kernel events only: an operator's row repeats its kernels' time)."""
    from torch.autograd import DeviceType

    events = prof.key_averages()
    on_gpu = [e for e in events if e.device_type == DeviceType.CUDA]
    on_host = [e for e in events if e.device_type != DeviceType.CUDA]
    kernel_total = sum(e.self_device_time_total for e in on_gpu) or 1

    def gpu_rows(rows: list[Any], count: int) -> list[dict[str, Any]]:
        return [
            {
                "name": e.key[:110],
                "gpu_ms": round(e.self_device_time_total / 1000, 2),
                "share": round(e.self_device_time_total / kernel_total, 4),
                "calls": e.count,
            }
            for e in sorted(rows, key=lambda e: -e.self_device_time_total)[:count]
            if e.self_device_time_total > 0
        ]

    host = [
        {"name": e.key[:80], "self_cpu_ms": round(e.self_cpu_time_total / 1000, 2), "calls": e.count}
        for e in sorted(on_host, key=lambda e: -e.self_cpu_time_total)[:25]
    ]
    launch_names = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")
    return {
        "wall_ms": round(wall_s * 1000, 1),
        "gpu_kernel_ms": round(kernel_total / 1000, 1),
        "gpu_busy_share": round(kernel_total / 1000 / (wall_s * 1000), 3),
        "kernel_launches": sum(e.count for e in on_host if e.key in launch_names),
        "tokens": tokens,
        "kernels": gpu_rows(on_gpu, 30),
        "operators_by_gpu_time": gpu_rows(on_host, 20),
        "host": host,
    }


def run_trainer_arm(arm: str, args: argparse.Namespace, data: dict[str, Any]) -> dict[str, Any]:
    """Train with transformers' Trainer; per-step wall time is taken between consecutive step ends."""
    if arm == "unsloth":
        import unsloth  # noqa: F401  (must come before transformers)
    import torch
    from transformers import Trainer, TrainingArguments

    cuda = torch.cuda.is_available()
    samples = data["samples"]
    steps_order = data["grouped_steps"] if arm == "unsloth" else data["random_steps"]
    steps_order = steps_order[: args.steps]
    profiled = steps_order[args.warmup : args.warmup + PROFILED_STEPS] if args.profile and cuda else []
    flat = [i for step in [*steps_order, *profiled] for i in step]
    rows = [{"input_ids": samples[i]["ids"], "labels": labels_of(samples[i])} for i in flat]
    step_tokens = [sum(len(samples[i]["ids"]) for i in step) for step in steps_order]
    micro = 16 if arm == "unsloth" else 4
    load_started = time.perf_counter()
    if arm == "unsloth":
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(
            str(args.model_dir),
            load_in_4bit=True,
            dtype=torch.bfloat16,
            max_seq_length=1024,
            local_files_only=True,
        )
        model = FastLanguageModel.get_peft_model(
            model,
            r=64,
            lora_alpha=16,
            lora_dropout=0,
            target_modules=LORA_TARGETS,
            bias="none",
            use_gradient_checkpointing="unsloth",
            random_state=SEED,
        )
    else:
        from peft import get_peft_model, prepare_model_for_kbit_training

        torch.manual_seed(SEED)
        model = load_4bit(args.model_dir, torch)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        model = get_peft_model(model, lora_config(0.1))
    load_s = time.perf_counter() - load_started
    recorder = step_recorder(torch, len(steps_order), bool(profiled))

    fields = {f for f in TrainingArguments.__dataclass_fields__}
    extra_args: dict[str, Any] = {}
    if "train_sampling_strategy" in fields:
        extra_args["train_sampling_strategy"] = "sequential"
    training_args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix=f"bench-{arm}-"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=16 // micro,
        max_steps=len(steps_order) + len(profiled),
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="paged_adamw_32bit" if cuda else "adamw_torch",
        bf16=cuda,
        gradient_checkpointing=arm != "unsloth",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=SEED,
        **extra_args,
    )

    class OrderedTrainer(Trainer):
        def _get_train_sampler(self, *a: Any, **k: Any) -> Any:
            return torch.utils.data.SequentialSampler(self.train_dataset)

    trainer = OrderedTrainer(
        model=model,
        args=training_args,
        train_dataset=_ListDataset(rows),
        data_collator=pad_collator(0),
        callbacks=[recorder],
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sampler = MemorySampler() if cuda else None
    with sampler or contextlib.nullcontext():
        trainer.train()
    step_times = [b - a for a, b in itertools.pairwise(recorder.marks)]
    padded = [
        sum(
            math.ceil(max(len(samples[i]["ids"]) for i in step[k : k + micro]) / 8)
            * 8
            * len(step[k : k + micro])
            for k in range(0, len(step), micro)
        )
        for step in steps_order
    ]
    memory = memory_fields(torch, sampler)
    if recorder.profile is not None:
        recorder.profile["tokens"] = sum(len(samples[i]["ids"]) for step in profiled for i in step)
    return summarize_steps(
        step_times,
        step_tokens,
        recorder.losses,
        args.warmup,
        args.shape,
        {
            "load_s": round(load_s, 1),
            "padding_fraction": round(1 - sum(step_tokens) / max(1, sum(padded)), 3),
            "micro_batch": micro,
            "grad_accum": 16 // micro,
            "lora_dropout": 0.0 if arm == "unsloth" else 0.1,
            **memory,
            **({"profile": recorder.profile} if recorder.profile else {}),
        },
    )


# ------------------------------------------------------------------------------------------------------------
# Arms in a plain loop: (c0) engine recipe through the HF forward, (c) engine packed path
# ------------------------------------------------------------------------------------------------------------


def _optimizer(params: list[Any], torch: Any) -> Any:
    if torch.cuda.is_available():
        import bitsandbytes as bnb

        # What the Trainer's "paged_adamw_32bit" builds.
        return bnb.optim.PagedAdamW(
            params, lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, optim_bits=32
        )
    return torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)


def run_engine_baseline(args: argparse.Namespace, data: dict[str, Any]) -> dict[str, Any]:
    """The engine recipe without the packed path: one padded micro-batch of 16 per step, HF loss."""
    import torch
    from peft import get_peft_model

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    samples = data["samples"]
    steps_order = data["grouped_steps"][: args.steps]
    torch.manual_seed(SEED)
    started = time.perf_counter()
    model = load_4bit(args.model_dir, torch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = get_peft_model(model, lora_config(recipe_dropout()))
    model.train()
    load_s = time.perf_counter() - started
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(params, torch)
    collate = pad_collator(0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sampler = MemorySampler() if cuda else None
    step_times, step_tokens, losses = [], [], []
    with sampler or contextlib.nullcontext():
        mark = time.perf_counter()
        for step in steps_order:
            batch = collate([{"input_ids": samples[i]["ids"], "labels": labels_of(samples[i])} for i in step])
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.item()))
            now = time.perf_counter()
            step_times.append(now - mark)
            mark = now
            step_tokens.append(sum(len(samples[i]["ids"]) for i in step))
    return summarize_steps(
        step_times,
        step_tokens,
        losses,
        args.warmup,
        args.shape,
        {
            "load_s": round(load_s, 1),
            "micro_batch": 16,
            "grad_accum": 1,
            "lora_dropout": recipe_dropout(),
            **memory_fields(torch, sampler),
        },
    )


def parse_variant(text: str) -> dict[str, Any]:
    """`max_tokens:uncheckpointed_layers[:nodrop][:noliger][:nofuse][:noflat][:nodq][:nograph][:gN]`, e.g.
    4096:0 or 5120:0:nodrop:g512 (gN: CUDA-graph pack granularity)."""
    parts = text.split(":")
    flags = set(parts[2:])
    return {
        "name": text,
        "max_tokens": int(parts[0]),
        "uncheckpointed_layers": int(parts[1]) if len(parts) > 1 else 0,
        "dropout": 0.0 if "nodrop" in flags else 0.1,
        "use_liger": "noliger" not in flags,
        "fused_lora": "nofuse" not in flags,
        "flat_parameters": "noflat" not in flags,
        "fast_dequant": "nodq" not in flags,
        "cache_absmax": "noabsmax" not in flags,
        "liger_norm": "tnorm" not in flags,
        "offload_checkpoints": "off" in flags,
        "reentrant_checkpoint": "hooks" not in flags,
        "fuse_residual": "fuseres" in flags,
        "cuda_graphs": "nograph" not in flags,
        "graph_granularity": next((int(f[1:]) for f in flags if f[:1] == "g" and f[1:].isdigit()), 256),
    }


def parse_engine_spec(spec: str) -> tuple[int, list[str]]:
    """`BUDGET[/section.key=value…]`: a token budget for the trainer arm and extra recipe overrides, e.g.
    `5120/lora.dropout=0.1`."""
    budget, *overrides = spec.split("/")
    return int(budget), overrides


def engine_variant_name(spec: str) -> str:
    """How a trainer-arm variant is named in the results: the budget and any extra overrides."""
    budget, overrides = parse_engine_spec(spec)
    return f"recipe[{', '.join([f'max_tokens_per_batch={budget}', *overrides])}]"


def recipe_dropout() -> float:
    """The shipped qlora-7b recipe's LoRA dropout: the semantics the compared engine variant must keep."""
    from engine.recipes import find_recipe, load_recipe

    return load_recipe(find_recipe("qlora-7b"), []).lora.dropout


def run_engine_trainer(args: argparse.Namespace, data: dict[str, Any]) -> dict[str, Any]:
    """(c): tunedeck's own trainer (`TrainingJob.fit`, the code `tunedeck train` runs) with the shipped qlora-7b
    recipe, on the bench's samples in the grouped step order, once per token budget in `--engine-tokens`.

    Only what the comparison needs differs from the recipe: the bench's model, a constant learning rate of
    2e-4 without warm-up (as every arm), no eval split and no checkpoints before the last step.
    """
    import torch
    from transformers import set_seed

    from engine.events import EventWriter
    from engine.modeling import load_model, load_tokenizer
    from engine.recipes import find_recipe, load_recipe
    from engine.train import Examples, StopSignal, TrainingJob

    cuda = torch.cuda.is_available()
    samples = data["samples"]
    steps_order = data["grouped_steps"][: args.steps]
    profiled = steps_order[args.warmup : args.warmup + PROFILED_STEPS] if args.profile and cuda else []
    order = [i for step in [*steps_order, *profiled] for i in step]
    examples = Examples(train=[{"input_ids": s["ids"], "labels": labels_of(s)} for s in samples], eval=[])
    step_tokens = [sum(len(samples[i]["ids"]) for i in step) for step in steps_order]
    variants: dict[str, Any] = {}
    for spec in args.engine_tokens.split(","):
        budget, extra_overrides = parse_engine_spec(spec)
        recipe = load_recipe(
            find_recipe("qlora-7b"),
            [
                f"model.base={json.dumps(str(args.model_dir))}",
                f"train.max_steps={len(steps_order) + len(profiled)}",
                f"train.learning_rate={LEARNING_RATE}",
                'train.lr_scheduler="constant"',
                "train.warmup_ratio=0",
                "data.eval_fraction=0",
                "train.save_steps=0",
                f"train.max_tokens_per_batch={budget}",
                *extra_overrides,
            ],
        )
        run_dir = Path(tempfile.mkdtemp(prefix="bench-engine-run-"))
        with open(os.devnull, "w") as events_sink:
            job = TrainingJob(
                run_dir, EventWriter(events_sink, run_dir / "events.jsonl"), StopSignal(), resume=False
            )
            job.device = "cuda" if cuda else "cpu"
            job.sample_order = order
            set_seed(recipe.train.seed)
            started = time.perf_counter()
            tokenizer = load_tokenizer(args.model_dir, chat_template=recipe.model.chat_template)
            model = load_model(
                args.model_dir, recipe, tokenizer, device=job.device, packed=recipe.train.packing
            )
            load_s = time.perf_counter() - started
            recorder = step_recorder(torch, len(steps_order), bool(profiled))
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            sampler = MemorySampler() if cuda else None
            info = {"recipe": recipe.name, "method": recipe.train.method, "base_model": str(args.model_dir)}
            info |= {"dataset": "bench", "num_train": len(samples), "num_eval": 0}
            try:
                with sampler or contextlib.nullcontext():
                    status = job.fit(
                        recipe,
                        model,
                        tokenizer,
                        examples,
                        info,
                        packing=recipe.train.packing,
                        callbacks=[recorder],
                    )
                runner = job.runner
                result = summarize_steps(
                    [b - a for a, b in itertools.pairwise(recorder.marks)],
                    step_tokens,
                    recorder.losses,
                    args.warmup,
                    args.shape,
                    {
                        "status": status,
                        "load_s": round(load_s, 1),
                        "dropout": recipe.lora.dropout,
                        "packed": runner is not None,
                        "max_tokens": runner.options.max_tokens if runner is not None else None,
                        "liger": runner is not None and runner.kernels.liger is not None,
                        "fast_dequant_layers": runner.fast_dequant_layers if runner is not None else 0,
                        "flat": runner is not None and runner.flat is not None,
                        "graphs": runner is not None and runner.graphs is not None,
                        **memory_fields(torch, sampler, runner),
                        **({"profile": recorder.profile} if recorder.profile else {}),
                    },
                )
                if recorder.profile is not None:
                    recorder.profile["tokens"] = sum(
                        len(samples[i]["ids"]) for step in profiled for i in step
                    )
            except Exception as exc:  # one failing budget (say, out of memory) must not hide the others
                result = {"dropout": recipe.lora.dropout, "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
            job.writer.close()
        variants[engine_variant_name(spec)] = result
        del model, job, recorder
        _release_paged_state()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        shutil.rmtree(run_dir, ignore_errors=True)
    return {"variants": variants}


def _release_paged_state() -> None:
    """Drop bitsandbytes' references to paged optimizer buffers so one variant's state does not outlive it."""
    with contextlib.suppress(Exception):
        import bitsandbytes as bnb

        bnb.optim.GlobalPageManager.get_instance().paged_tensors.clear()


def run_engine(args: argparse.Namespace, data: dict[str, Any]) -> dict[str, Any]:
    """The packed path of engine/fast.py, once per variant on the same loaded model (adapters re-
    initialised)."""
    import torch
    from peft import get_peft_model

    from engine import fast

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    samples = data["samples"]
    steps_order = data["grouped_steps"][: args.steps]
    torch.manual_seed(SEED)
    started = time.perf_counter()
    model = load_4bit(args.model_dir, torch)
    model.config.use_cache = False
    model = get_peft_model(model, lora_config(0.1))
    model.train()
    load_s = time.perf_counter() - started
    initial = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    examples = [(s["ids"], labels_of(s)) for s in samples]
    if cuda:
        free, total = torch.cuda.mem_get_info()
        baseline_used = total - free
    parity = _parity_check(model, examples[:4], device, torch, fast)

    variants = {}
    for spec in args.variants.split(","):
        variant = parse_variant(spec)
        model.load_state_dict(initial, strict=False)
        for module in model.modules():
            if hasattr(module, "lora_dropout"):
                for drop in module.lora_dropout.values():
                    if isinstance(drop, torch.nn.Dropout):
                        drop.p = variant["dropout"]
        options = fast.FastOptions(
            max_tokens=variant["max_tokens"],
            uncheckpointed_layers=variant["uncheckpointed_layers"],
            use_liger=variant["use_liger"],
            fused_lora=variant["fused_lora"],
            flat_parameters=variant["flat_parameters"],
            fast_dequant=variant["fast_dequant"],
            cache_absmax=variant["cache_absmax"],
            liger_norm=variant["liger_norm"],
            offload_checkpoints=variant["offload_checkpoints"],
            reentrant_checkpoint=variant["reentrant_checkpoint"],
            fuse_residual=variant["fuse_residual"],
            cuda_graphs=variant["cuda_graphs"],
            graph_granularity=variant["graph_granularity"],
        )
        for module in model.modules():
            module.__dict__.pop("_tunedeck_dequant", None)
        runner = fast.PackedCausalLM(model, options)
        optimizer = _optimizer(runner.optimizer_parameters(), torch)
        torch.manual_seed(SEED)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            free, total = torch.cuda.mem_get_info()
            # What earlier variants left on the device (leaked paged buffers) is subtracted from this one's
            # peak.
            leftover = max(0, (total - free) - baseline_used)
        sampler = MemorySampler() if cuda else None
        step_times, step_tokens, losses, packs = [], [], [], []

        def plan(step: list[int], runner: Any = runner) -> list[fast.PackedBatch]:
            return runner.pack([examples[i] for i in step])

        try:
            with sampler or contextlib.nullcontext():
                if cuda:
                    torch.cuda.synchronize()
                mark = time.perf_counter()
                batches = plan(steps_order[0])
                for k in range(len(steps_order)):
                    stats = runner.train_step(optimizer, batches, max_grad_norm=1.0)
                    packs.append(len(batches))
                    if k + 1 < len(steps_order):
                        batches = plan(
                            steps_order[k + 1]
                        )  # host packing overlaps the GPU finishing this step
                    losses.append(float(stats.loss.item()))
                    now = time.perf_counter()
                    step_times.append(now - mark)
                    mark = now
                    step_tokens.append(stats.num_tokens)
            memory = memory_fields(torch, sampler, runner)
            if cuda and sampler is not None:
                memory["peak_device_used_gib"] = round((sampler.peak - leftover) / 1024**3, 3)
            result = summarize_steps(
                step_times,
                step_tokens,
                losses,
                args.warmup,
                args.shape,
                {
                    **variant,
                    "packs_per_step": packs,
                    "liger": runner.kernels.liger is not None,
                    "fast_dequant_layers": runner.fast_dequant_layers,
                    "flat": runner.flat is not None,
                    "graphs": runner.graphs is not None,
                    **memory,
                },
            )
            if args.profile and cuda and spec == args.variants.split(",")[0]:
                result["profile"] = _profile_steps(
                    runner, optimizer, [plan(s) for s in steps_order[3:6]], torch
                )
        except Exception as exc:  # one failing variant (say, out of memory) must not hide the others
            result = {**variant, "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
        variants[spec] = result
        del optimizer, runner
        _release_paged_state()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    # Last: an inference forward through bitsandbytes may repack 4-bit weights (seen on CPU), so nothing
    # trains after.
    host_costs = _host_costs(model, torch, fast) if cuda and args.profile else None
    return {"load_s": round(load_s, 1), "parity": parity, "host_costs_us": host_costs, "variants": variants}


def _host_costs(model: Any, torch: Any, fast: Any) -> dict[str, float]:
    """Host microseconds per call of the small operations a packed step issues thousands of times."""
    runner = fast.PackedCausalLM(model, fast.FastOptions())
    layer = runner.decoder.layers[0]
    x = torch.randn(4096, runner.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    small = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    base = layer.self_attn.q_proj.get_base_layer()
    liger_kernels = fast._Kernels(True, torch.device("cuda"))
    torch_kernels = fast._Kernels(False, torch.device("cuda"))
    cases = {
        "liger_rms_norm": lambda: liger_kernels.rms_norm(layer.input_layernorm, x),
        "torch_rms_norm": lambda: torch_kernels.rms_norm(layer.input_layernorm, x),
        "dequant_direct": lambda: fast._dense_weight(base, torch.bfloat16),
        "small_mm": lambda: torch.mm(small, small),
        "native_dropout": lambda: torch.native_dropout(small, 0.1, True),
    }
    costs = {}
    for name, fn in cases.items():
        with contextlib.suppress(Exception):
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(50):
                fn()
            costs[name] = round((time.perf_counter() - started) / 50 * 1e6, 1)
            torch.cuda.synchronize()
    return costs


def run_engine_ddp(args: argparse.Namespace, data: dict[str, Any]) -> dict[str, Any]:
    """The packed path on every GPU of the machine (torchrun): each process takes a token-balanced share of
    each step's 16 samples, gradients are summed across processes; tokens/s counts all processes' tokens."""
    import torch
    import torch.distributed as dist
    from peft import get_peft_model

    from engine import fast

    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    device = torch.device("cuda", local)
    samples = data["samples"]
    lengths = [len(s["ids"]) for s in samples]
    examples = [(s["ids"], labels_of(s)) for s in samples]
    steps_order = data["grouped_steps"][: args.steps]
    torch.manual_seed(SEED)
    model = load_4bit(args.model_dir, torch, local)
    model.config.use_cache = False
    model = get_peft_model(model, lora_config(0.1))
    model.train()
    variant = parse_variant(args.variants.split(",")[0])
    options = fast.FastOptions(
        max_tokens=variant["max_tokens"],
        cache_absmax=variant["cache_absmax"],
        offload_checkpoints=variant["offload_checkpoints"],
    )
    runner = fast.PackedCausalLM(model, options)
    # Same starting adapters on every process.
    dist.broadcast(runner.flat.param.data, src=0)
    optimizer = _optimizer(runner.optimizer_parameters(), torch)
    torch.cuda.reset_peak_memory_stats()
    step_times, step_tokens, losses = [], [], []
    dist.barrier()
    mark = time.perf_counter()
    for step in steps_order:
        share = fast.shard_for_rank(step, lengths, world, rank)
        batches = runner.pack([examples[i] for i in share])
        step_targets = sum(1 for i in step for x in examples[i][1][1:] if x != -100)
        stats = runner.train_step(
            optimizer,
            batches,
            max_grad_norm=1.0,
            num_targets=step_targets,
            grad_sync=fast.all_reduce_gradients,
        )
        loss = stats.loss.detach().clone()
        dist.all_reduce(loss)
        losses.append(float(loss.item()))
        now = time.perf_counter()
        step_times.append(now - mark)
        mark = now
        step_tokens.append(sum(lengths[i] for i in step))
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 1024**3], device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    dist.destroy_process_group()
    if rank != 0:
        return {}
    return summarize_steps(
        step_times,
        step_tokens,
        losses,
        args.warmup,
        args.shape,
        {**variant, "world_size": world, "peak_allocated_gib_max_rank": round(float(peak), 3)},
    )


def _parity_check(model: Any, examples: list[Any], device: Any, torch: Any, fast: Any) -> dict[str, float]:
    """Loss and final hidden states of a few samples through the HF forward (one at a time, SDPA) and
    through the
    packed path, adapters given random B so the LoRA branch counts, dropout off."""
    saved = {}
    with torch.no_grad():
        generator = torch.Generator(device="cpu").manual_seed(0)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                saved[name] = param.detach().clone()
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    model.eval()
    try:
        with (
            torch.no_grad(),
            torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"),
        ):
            # Packed path first: on CPU, bitsandbytes repacks 4-bit weights at its first inference forward.
            runner = fast.PackedCausalLM(model, fast.FastOptions())
            batch = fast.pack_examples(examples, device)
            packed_sum = float(runner.loss_sum(batch))
            packed_hidden = runner.hidden_states(batch).float()
            total, count, hf_hidden = 0.0, 0, []
            for ids, labels in examples:
                out = model(
                    input_ids=torch.tensor([ids], device=device),
                    labels=torch.tensor([labels], device=device),
                    output_hidden_states=True,
                )
                n = sum(1 for x in labels[1:] if x != -100)
                total += float(out.loss) * n
                count += n
                hf_hidden.append(out.hidden_states[-1][0].float())
            packed = packed_sum / count
            reference_hidden = torch.cat(hf_hidden)
            hidden_error = float((packed_hidden - reference_hidden).norm() / reference_hidden.norm())
    finally:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in saved:
                    param.copy_(saved[name])
        model.train()
    reference = total / count
    return {
        "hf_loss": round(reference, 5),
        "packed_loss": round(packed, 5),
        "relative_difference": round(abs(packed - reference) / reference, 6),
        "hidden_state_relative_error": round(hidden_error, 6),
    }


def _profile_steps(runner: Any, optimizer: Any, steps: list[Any], torch: Any) -> dict[str, Any]:
    """`profile_summary` of a few runner steps in a bare loop."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for batches in steps:
            runner.train_step(optimizer, batches, max_grad_norm=1.0).loss.item()
        torch.cuda.synchronize()
    tokens = sum(b.num_tokens for batches in steps for b in batches)
    return profile_summary(prof, time.perf_counter() - started, tokens)


# ------------------------------------------------------------------------------------------------------------
# Orchestration
# ------------------------------------------------------------------------------------------------------------


def child(args: argparse.Namespace) -> int:
    out = Path(args.result)
    data = json.loads(Path(args.data).read_text()) if args.data else None
    try:
        if args.arm == "build":
            result = build_model(args.model_dir, args.shape)
        elif args.arm in ("seeds", "unsloth"):
            result = run_trainer_arm(args.arm, args, data)
        elif args.arm == "engine-baseline":
            result = run_engine_baseline(args, data)
        elif args.arm == "engine":
            result = run_engine_trainer(args, data)
        elif args.arm == "engine-runner":
            result = run_engine(args, data)
        elif args.arm == "engine-ddp":
            result = run_engine_ddp(args, data)
            if not result:
                return 0
        else:
            raise ValueError(f"unknown arm {args.arm}")
        import torch

        if torch.cuda.is_available():
            result["gpu"] = torch.cuda.get_device_name(0)
        result["versions"] = _versions()
    except Exception as exc:
        import traceback

        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {str(exc)[:600]}"}
    out.write_text(json.dumps(result, indent=1))
    return 0


def _versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for name in (
        "torch",
        "transformers",
        "peft",
        "bitsandbytes",
        "accelerate",
        "unsloth",
        "unsloth_zoo",
        "trl",
        "liger-kernel",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def best_engine_variant(
    engine: dict[str, Any], memory_cap: float | None
) -> tuple[str | None, dict[str, Any] | None]:
    """Fastest variant with the shipped recipe's LoRA dropout whose peak allocation fits the cap."""
    best = None
    dropout = recipe_dropout()
    for name, v in engine.get("variants", {}).items():
        if "error" in v or v.get("dropout", dropout) != dropout:
            continue
        if memory_cap is not None and v.get("peak_allocated_gib", 0) > memory_cap:
            continue
        if best is None or v["tokens_per_s"] > best[1]["tokens_per_s"]:
            best = (name, v)
    return best if best else (None, None)


def summarize(results: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    arms = results
    unsloth = arms.get("unsloth", {})
    cap = unsloth.get("peak_allocated_gib") if "error" not in unsloth else None
    name, engine = best_engine_variant(arms.get("engine", {}), cap)
    table = []
    for arm in ("seeds", "unsloth", "engine-baseline"):
        r = arms.get(arm)
        if r and "error" not in r:
            table.append(
                {
                    "arm": arm,
                    **{
                        k: r.get(k)
                        for k in (
                            "tokens_per_s",
                            "peak_allocated_gib",
                            "peak_reserved_gib",
                            "peak_device_used_gib",
                            "mfu",
                            "s_per_step",
                        )
                    },
                }
            )
    for engine_arm, vname, v in [
        (name, vname, v)
        for name in ("engine", "engine-runner")
        for vname, v in arms.get(name, {}).get("variants", {}).items()
    ]:
        if "error" not in v:
            table.append(
                {
                    "arm": f"{engine_arm}[{vname}]",
                    **{
                        k: v.get(k)
                        for k in (
                            "tokens_per_s",
                            "peak_allocated_gib",
                            "peak_reserved_gib",
                            "peak_device_used_gib",
                            "mfu",
                            "s_per_step",
                        )
                    },
                }
            )
    ratios = {}
    if engine:
        for other in ("unsloth", "seeds", "engine-baseline"):
            r = arms.get(other, {})
            if r.get("tokens_per_s"):
                ratios[f"engine/{other}"] = round(engine["tokens_per_s"] / r["tokens_per_s"], 3)
    ddp = arms.get("engine-ddp", {})
    single = arms.get("engine", {}).get("variants", {}).get(ddp.get("name", ""), {})
    if ddp.get("tokens_per_s") and single.get("tokens_per_s"):
        ratios[f"engine-ddp x{ddp['world_size']} / engine x1 [{ddp['name']}]"] = round(
            ddp["tokens_per_s"] / single["tokens_per_s"], 3
        )
        table.append(
            {
                "arm": f"engine-ddp x{ddp['world_size']}[{ddp['name']}]",
                "tokens_per_s": ddp["tokens_per_s"],
                "peak_allocated_gib": ddp["peak_allocated_gib_max_rank"],
                "peak_reserved_gib": None,
                "peak_device_used_gib": None,
                "mfu": ddp["mfu"] / ddp["world_size"],
                "s_per_step": ddp["s_per_step"],
            }
        )
    agreement = {}
    if engine:
        for other in ("unsloth", "engine-baseline"):
            r = arms.get(other, {})
            if r.get("losses"):
                pairs = list(zip(engine["losses"], r["losses"], strict=False))
                agreement[f"engine vs {other} (same steps)"] = {
                    "first_step": [round(pairs[0][0], 4), round(pairs[0][1], 4)] if pairs else None,
                    "mean_abs_diff": round(sum(abs(a - b) for a, b in pairs) / max(1, len(pairs)), 4),
                    "max_abs_diff": round(max((abs(a - b) for a, b in pairs), default=0.0), 4),
                }
        seeds = arms.get("seeds", {})
        if seeds.get("losses"):
            tail = 5
            agreement["engine vs seeds (different step order: last-5 means)"] = [
                round(sum(engine["losses"][-tail:]) / tail, 4),
                round(sum(seeds["losses"][-tail:]) / tail, 4),
            ]
    return {
        **meta,
        "memory_cap_gib": cap,
        "engine_variant": name,
        "table": table,
        "ratios": ratios,
        "loss_agreement": agreement,
        "arms": arms,
    }


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"# QLoRA throughput, {summary['gpu']}, {summary['date']}",
        "",
        f"Shape {summary['shape']} ({summary['params'] / 1e9:.2f}B params), {summary['steps']} steps of "
        f"16 samples, first {summary['warmup']} untimed. MFU = 6 × N × real tokens/s ÷ "
        f"{H100_BF16_DENSE_FLOPS / 1e12:.0f} TFLOP/s (N = all {summary['params'] / 1e9:.2f}B params; the "
        "frozen base skips weight gradients (−2N) and checkpointing recomputes the forward (+2N), so the "
        "executed matmul work is also about 6N per token; LoRA and attention FLOPs are not counted).",
        "",
        "| arm | real tok/s | peak alloc GiB | peak reserved GiB | device used GiB | MFU | s/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in summary["table"]:
        lines.append(
            f"| {row['arm']} | {row['tokens_per_s']:,.0f} | {row['peak_allocated_gib']} | "
            f"{row['peak_reserved_gib']} | {row['peak_device_used_gib']} | {row['mfu']:.1%} | "
            f"{row['s_per_step']} |"
        )
    lines += [
        "",
        f"Engine variant used for ratios: `{summary['engine_variant']}` (fastest with the recipe's LoRA dropout "
        f"{recipe_dropout()} and peak allocation ≤ Unsloth's {summary['memory_cap_gib']} GiB).",
        "",
        "Ratios: " + ", ".join(f"{k} = {v}" for k, v in summary["ratios"].items()),
        "",
        "Loss agreement: " + json.dumps(summary["loss_agreement"]),
        "",
    ]
    for arm, title in ARM_TITLES.items():
        lines.append(f"- `{arm}`: {title}")
    return "\n".join(lines) + "\n"


def parent(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-work-"))
    logs = work / "logs"
    logs.mkdir()
    model_dir = Path(args.model_dir or work / f"model-{args.shape}")

    def run_child(arm: str, extra: list[str], timeout: float) -> dict[str, Any]:
        result_path = work / f"{arm}.json"
        launcher = [sys.executable]
        if arm == "engine-ddp":
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}"]
        cmd = [
            *launcher,
            __file__,
            "--arm",
            arm,
            "--result",
            str(result_path),
            "--model-dir",
            str(model_dir),
            "--shape",
            args.shape,
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--variants",
            args.variants,
            "--engine-tokens",
            args.engine_tokens,
            *extra,
        ]
        if args.profile:
            cmd.append("--profile")
        t0 = time.perf_counter()
        with open(logs / f"{arm}.log", "w") as log_file:
            try:
                subprocess.run(
                    cmd,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                    cwd=tempfile.mkdtemp(prefix=f"cwd-{arm}-"),
                    check=False,
                )
            except subprocess.TimeoutExpired:
                return {"error": f"timed out after {timeout:.0f} s"}
        result = (
            json.loads(result_path.read_text()) if result_path.exists() else {"error": "no result written"}
        )
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        print(
            f"[{time.perf_counter() - started:6.0f}s] {arm}: "
            + json.dumps(
                {
                    k: v
                    for k, v in result.items()
                    if k in ("tokens_per_s", "peak_allocated_gib", "error", "wall_s", "build_s", "parity")
                }
            ),
            flush=True,
        )
        if arm == "engine":
            for name, v in result.get("variants", {}).items():
                print(
                    f"    {name}: "
                    + json.dumps(
                        {
                            k: v.get(k)
                            for k in (
                                "tokens_per_s",
                                "peak_allocated_gib",
                                "peak_device_used_gib",
                                "mfu",
                                "error",
                            )
                        }
                    ),
                    flush=True,
                )
        return result

    data_path = work / "data.json"
    data = make_data(args.shape, args.steps, 16, SEED)
    data_path.write_text(json.dumps(data))
    if not (model_dir / "config.json").exists():
        run_child("build", [], 300)
    results: dict[str, Any] = {}
    for arm in args.arms.split(","):
        # The engine arm runs each token budget in a process of its own: memory one run leaves allocated
        # (the Trainer and accelerate keep references to the model) must not count in the next one's peak.
        parts = args.engine_tokens.split(",") if arm == "engine" else [None]
        for budget in parts:
            remaining = args.deadline_s - (time.perf_counter() - started)
            extra = ["--data", str(data_path)] + (["--engine-tokens", budget] if budget else [])
            out_of_time = {"error": "skipped: out of time"}
            result = out_of_time if remaining < 45 else run_child(arm, extra, remaining - 20)
            if budget is None:
                results[arm] = result
                continue
            merged = results.setdefault(arm, {"variants": {}})
            name = engine_variant_name(budget)
            variants = result.get("variants") or {name: {"error": result.get("error")}}
            # A budget run again is told apart: the first process also pays for compiling the Triton kernels
            # for each new pack shape, which later processes find in the on-disk cache.
            repeat = sum(1 for key in merged["variants"] if key.startswith(name))
            merged["variants"].update(
                {(f"{k} run {repeat + 1}" if repeat else k): v for k, v in variants.items()}
            )
            for key in ("gpu", "versions"):
                if key in result:
                    merged[key] = result[key]
        _write(out, args, results, data, logs)
    _write(out, args, results, data, logs)
    print(markdown(json.loads((out / "results.json").read_text())))
    return 0


def _write(
    out: Path, args: argparse.Namespace, results: dict[str, Any], data: dict[str, Any], logs: Path
) -> None:
    gpu = next((r.get("gpu") for r in results.values() if isinstance(r, dict) and r.get("gpu")), "cpu")
    lengths = [len(s["ids"]) for s in data["samples"]]
    meta = {
        "date": datetime.date.today().isoformat(),
        "gpu": gpu,
        "shape": args.shape,
        "params": param_count(SHAPES[args.shape]),
        "steps": args.steps,
        "warmup": args.warmup,
        "samples": len(lengths),
        "mean_sample_tokens": round(sum(lengths) / len(lengths), 1),
        "answer_token_share": round(
            sum(len(s["ids"]) - s["prompt_len"] for s in data["samples"]) / sum(lengths), 3
        ),
    }
    summary = summarize(results, meta)
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text(markdown(summary))
    with tarfile.open(out / "logs.tgz", "w:gz") as tar:
        tar.add(logs, arcname="logs")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/latest")
    parser.add_argument("--arms", default=DEFAULT_ARMS)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--steps", type=int, default=18)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--variants",
        default="4096:0,5120:0,4096:0:nodrop",
        help="engine variants: max_tokens:uncheckpointed_layers[:nodrop][:noliger][:nofuse]",
    )
    parser.add_argument(
        "--engine-tokens",
        default="0",
        help="engine-arm variants, each BUDGET[/section.key=value...]: train.max_tokens_per_batch (0 = the "
        "recipe's automatic budget) and extra recipe overrides, e.g. 0,5120,0/lora.dropout=0.1",
    )
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--deadline-s", type=float, default=560)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--gpus", type=int, default=2, help="processes for the engine-ddp arm")
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.arm:
        return child(args)
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
