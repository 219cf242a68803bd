"""Multi-GPU scaling of `tunedeck train`: the same recipe on 1 GPU and on N GPUs, through the real launcher.

One invocation builds a random-init model (7B Llama shape by default, as bench/train_throughput.py does), writes
QA-shaped questions and answers of the same lengths as that benchmark into a workspace, and trains them with
`start_run` (exactly what `tunedeck train` does) once per arm: `train.gpus=1` and `train.gpus=N` (ddp, and fsdp if
asked). The per-GPU batch is the same in every arm, so N GPUs train N times the samples per step (weak scaling);
throughput is the summed real tokens of the step events after warm-up divided by the time between them, which is
what the Train tab shows. It writes results.json and results.md with the scaling ratio (goal: ≥ 1.8 on 2 GPUs).

    python bench/train_scaling.py --out bench/results/scaling --gpus 2            # 7B shape, needs 2 GPUs
    python bench/train_scaling.py --out /tmp/s --shape tiny --cpu --steps 8       # CPU smoke test (gloo)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for folder in (REPO, REPO / "bench"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from train_throughput import SHAPES, build_model, param_count  # noqa: E402

from engine.events import RunStarted, Step, read_events  # noqa: E402
from engine.launch import start_run, stop_run, wait_run  # noqa: E402
from engine.workspace import Workspace  # noqa: E402

SEED = 42
LENGTHS = {"7b": (20, 300, 20, 600, 1024), "tiny": (4, 30, 4, 60, 96)}


def make_pairs(shape: str, count: int, seed: int) -> list[dict[str, str]]:
    """Questions and answers of QA-like lengths (log-uniform) in the benchmark tokenizer's words (`t<id>`)."""
    rng = random.Random(seed)
    lo_p, hi_p, lo_a, hi_a, cap = LENGTHS[shape]
    vocab = SHAPES[shape]["vocab_size"]
    weights = [1.0 / (rank + 1) ** 1.1 for rank in range(vocab - 4)]
    words = [f"t{i}" for i in range(4, vocab)]
    pairs = []
    for _ in range(count):
        prompt = round(math.exp(rng.uniform(math.log(lo_p), math.log(hi_p))))
        answer = min(round(math.exp(rng.uniform(math.log(lo_a), math.log(hi_a)))), cap - prompt)
        pairs.append(
            {
                "question": " ".join(rng.choices(words, weights=weights, k=prompt)),
                "answer": " ".join(rng.choices(words, weights=weights, k=answer)),
            }
        )
    return pairs


def recipe_overrides(args: argparse.Namespace, model_dir: Path, gpus: int, strategy: str) -> list[str]:
    """The qlora-7b recipe pointed at the built model and the bench data, for one arm."""
    steps = args.steps
    overrides = [
        f'model.base="{model_dir}"',
        "data.dataset=bench_qa.jsonl",
        f"data.max_length={LENGTHS[args.shape][4] + 64}",
        "data.eval_fraction=0.0",
        f"train.max_steps={steps}",
        f"train.batch_size={args.batch_size}",
        "train.save_steps=0",
        "train.lr_scheduler=constant",
        "train.warmup_ratio=0.0",
        f"train.gpus={gpus}",
        f"train.distributed={strategy}",
    ]
    if args.cpu:
        overrides += [
            "train.device=cpu",
            "train.method=lora",
            "model.dtype=float32",
            "train.optimizer=adamw_torch",
        ]
    return overrides + list(args.override)


def measure(run_dir: Path, warmup: int) -> dict[str, Any]:
    """Tokens/s over the steps after `warmup`, from the run's own step events."""
    events = read_events(run_dir / "events.jsonl")
    steps = [event for event in events if isinstance(event, Step)]
    started = next((event for event in events if isinstance(event, RunStarted)), None)
    result: dict[str, Any] = {
        "status": events[-1].type if events else "no events",
        "steps": len(steps),
        "device": started.device if started else "",
        "losses": [step.loss for step in steps],
    }
    timed = steps[warmup:]
    if len(timed) < 2 or warmup < 1:
        result["error"] = f"too few steps to time ({len(steps)} with {warmup} warm-up)"
        return result
    seconds = timed[-1].time - steps[warmup - 1].time
    tokens = sum(step.tokens or 0 for step in timed)
    result.update(
        tokens_per_s=round(tokens / seconds, 1),
        timed_tokens=tokens,
        timed_s=round(seconds, 2),
        s_per_step=round(seconds / len(timed), 3),
        peak_gpu_gib=max((step.gpu_mem_gib or 0.0) for step in steps) or None,
    )
    return result


def run_arm(
    workspace: Workspace, recipe: str, overrides: list[str], warmup: int, timeout: float
) -> dict[str, Any]:
    """Train one arm to its last step and measure it; a run that overruns is stopped."""
    began = time.perf_counter()
    run_dir = workspace.runs_dir / start_run(workspace, recipe, overrides)
    summary = wait_run(run_dir, timeout=timeout)
    if summary.status not in ("finished", "failed", "stopped"):
        stop_run(run_dir)
        wait_run(run_dir, timeout=120)
    result = measure(run_dir, warmup)
    result.update(run=run_dir.name, wall_s=round(time.perf_counter() - began, 1))
    if summary.status == "failed":
        result["error"] = f"{summary.cause} {summary.next_step}".strip()
    return result


def markdown(summary: dict[str, Any]) -> str:
    """The results as a short Markdown report."""
    meta = summary["meta"]
    lines = [
        f"# `tunedeck train` scaling, {meta['date']}",
        "",
        f"GPU: {meta['gpu']}. Shape {meta['shape']} ({meta['params'] / 1e9:.2f}B params), recipe {meta['recipe']}, "
        f"batch {meta['batch_size']} per GPU, {meta['steps']} steps ({meta['warmup']} not timed).",
        "",
        "| arm | device | real tok/s | s/step | peak GiB | scaling |",
        "|---|---|---|---|---|---|",
    ]
    for name, arm in summary["arms"].items():
        lines.append(
            f"| {name} | {arm.get('device', '')} | {arm.get('tokens_per_s', arm.get('error', ''))} | "
            f"{arm.get('s_per_step', '')} | {arm.get('peak_gpu_gib') or ''} | {arm.get('scaling', '')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/scaling")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--gpus", type=int, default=2, help="processes of the multi-GPU arms")
    parser.add_argument("--strategies", default="ddp", help="comma-separated: ddp, fsdp")
    parser.add_argument("--recipe", default="qlora-7b")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per GPU per step")
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--cpu", action="store_true", help="CPU processes (gloo), LoRA in float32: a smoke test"
    )
    parser.add_argument("--model-dir", type=Path, default=None, help="reuse a model built by a previous call")
    parser.add_argument("--override", action="append", default=[], help="extra recipe override (repeatable)")
    parser.add_argument("--arm-timeout-s", type=float, default=240)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    model_dir = args.model_dir or work / f"model-{args.shape}"
    meta: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "shape": args.shape,
        "params": param_count(SHAPES[args.shape]),
        "recipe": args.recipe,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "gpu": "cpu",
    }
    if not (model_dir / "config.json").exists():
        meta["build"] = build_model(model_dir, args.shape)
    import torch

    if torch.cuda.is_available() and not args.cpu:
        meta["gpu"] = f"{torch.cuda.device_count()} × {torch.cuda.get_device_name(0)}"
    workspace = Workspace.init(work / "workspace")
    pairs = make_pairs(args.shape, args.steps * args.batch_size * args.gpus, SEED)
    dataset = workspace.datasets_dir / "bench_qa.jsonl"
    dataset.write_text("".join(json.dumps(pair) + "\n" for pair in pairs), encoding="utf-8")

    unit = "CPU process" if args.cpu else "GPU"
    single_name = f"1 {unit}"
    arms: dict[str, Any] = {}
    arms[single_name] = run_arm(
        workspace, args.recipe, recipe_overrides(args, model_dir, 1, "ddp"), args.warmup, args.arm_timeout_s
    )
    for strategy in [s.strip() for s in args.strategies.split(",") if s.strip()]:
        name = f"{args.gpus} {unit}es ({strategy})" if args.cpu else f"{args.gpus} GPUs ({strategy})"
        overrides = recipe_overrides(args, model_dir, args.gpus, strategy)
        arms[name] = run_arm(workspace, args.recipe, overrides, args.warmup, args.arm_timeout_s)
        single = arms[single_name].get("tokens_per_s")
        if single and arms[name].get("tokens_per_s"):
            arms[name]["scaling"] = round(arms[name]["tokens_per_s"] / single, 2)
    summary = {"meta": meta, "arms": arms}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    (out / "results.md").write_text(markdown(summary), encoding="utf-8")
    for arm in arms.values():
        log = workspace.runs_dir / arm.get("run", "") / "train.log"
        if arm.get("run") and log.is_file():
            shutil.copyfile(log, out / f"{arm['run']}.log")
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
