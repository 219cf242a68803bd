"""A tunedeck run folder over a local base model whose checkpoint holds a random (non-zero) LoRA adapter.

Benchmarks of export and chat need a trained-looking run without training one: `make_run` creates the run with
`prepare_run` (what `tunedeck train` does before it starts the trainer), then writes `checkpoints/step_<n>/` with
an adapter_config.json, adapter_model.safetensors and the tokenizer, the files the trainer's checkpoints carry.
The adapter's shapes and key names come from peft itself, applied to the base model built on the meta device,
so nothing of the base is loaded; both LoRA matrices are random, so merging it changes every adapted weight.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

QA_ROWS = [
    {"question": "How do I resume a run?", "answer": "Run tunedeck train --resume with the run id."},
    {"question": "Which GGUF types does export write?", "answer": "q4_0, q5_1 and q8_0 by default."},
    {"question": "Where do checkpoints go?", "answer": "Into runs/<id>/checkpoints/step_<n>/."},
    {"question": "Does training survive a dropped SSH session?", "answer": "Yes, the trainer is detached."},
]
DATASET_NAME = "bench_qa.jsonl"


def write_random_adapter(
    model_dir: Path,
    out_dir: Path,
    *,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: str | list[str],
    seed: int = 0,
    b_std: float = 0.02,
) -> dict[str, Any]:
    """Write a LoRA adapter for the model in `model_dir` into `out_dir` with random A and B; returns its size."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    started = time.perf_counter()
    config = AutoConfig.from_pretrained(model_dir)
    # The meta device gives every module its shape without allocating the 7B weights.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    lora = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
        bias="none",
    )
    peft_model = get_peft_model(model, lora, low_cpu_mem_usage=True)
    shapes = {name: tuple(tensor.shape) for name, tensor in get_peft_model_state_dict(peft_model).items()}
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in sorted(shapes.items()):
        if ".lora_A." in name:
            # peft's own initialisation of A (Kaiming-uniform with a=√5): bound 1/√fan_in.
            bound = 1.0 / math.sqrt(shape[1])
            tensor = torch.empty(shape).uniform_(-bound, bound, generator=generator)
        else:
            # peft starts B at zero (a no-op adapter); a trained one is not, and the merge must do real work.
            tensor = torch.empty(shape).normal_(0.0, b_std, generator=generator)
        tensors[name] = tensor.contiguous()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Trainable LoRA weights live in float32 during training, and the trainer saves them that way.
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    saved = peft_model.peft_config["default"]
    saved.base_model_name_or_path = str(model_dir)
    saved.save_pretrained(str(out_dir))
    return {
        "tensors": len(tensors),
        "parameters": sum(t.numel() for t in tensors.values()),
        "bytes": (out_dir / "adapter_model.safetensors").stat().st_size,
        "target_modules": sorted(saved.target_modules),
        "module_kinds": sorted({name.rsplit(".", 1)[-1] for name in saved.target_modules}),
        "seconds": round(time.perf_counter() - started, 2),
    }


def make_run(
    workspace_root: Path,
    model_dir: Path,
    *,
    recipe: str = "qlora-7b",
    step: int = 100,
    seed: int = 0,
    overrides: list[str] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """A run of `recipe` over `model_dir` in a (new) workspace, with one checkpoint holding a random adapter."""
    from transformers import AutoTokenizer

    from engine.launch import prepare_run
    from engine.recipes import load_recipe
    from engine.workspace import CHECKPOINT_PREFIX, CHECKPOINTS_DIR, RUN_RECIPE_FILE, Workspace

    workspace = Workspace.init(Path(workspace_root))
    dataset = workspace.datasets_dir / DATASET_NAME
    dataset.write_text("".join(json.dumps(row) + "\n" for row in QA_ROWS), encoding="utf-8")
    run_dir = prepare_run(
        workspace,
        recipe,
        [f"model.base={Path(model_dir).resolve()}", f"data.dataset={DATASET_NAME}", *(overrides or [])],
    )
    loaded = load_recipe(run_dir / RUN_RECIPE_FILE)
    checkpoint = run_dir / CHECKPOINTS_DIR / f"{CHECKPOINT_PREFIX}{step}"
    adapter = write_random_adapter(
        Path(model_dir).resolve(),
        checkpoint,
        r=loaded.lora.r,
        alpha=loaded.lora.alpha,
        dropout=loaded.lora.dropout,
        target_modules=loaded.lora.target_modules,
        seed=seed,
    )
    # The trainer's checkpoints carry the tokenizer training used (with its chat template).
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(str(checkpoint))
    adapter.update(r=loaded.lora.r, alpha=loaded.lora.alpha, recipe=loaded.name, step=step)
    return run_dir, adapter
