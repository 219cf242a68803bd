"""GPU check of engine/fast.py: LoRA gradients of the packed path against transformers + peft, option by option."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import fast

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)


def model_for(folder: Path, four_bit: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = (
        BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        if four_bit
        else None
    )
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=torch.bfloat16,
        quantization_config=quant,
        device_map={"": 0},
        attn_implementation="sdpa",
    )
    torch.manual_seed(1)  # the same adapter A for every instance
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    model.train()
    return model


def examples(count: int) -> list:
    gen = torch.Generator().manual_seed(2)
    out = []
    for _ in range(count):
        prompt, answer = (
            int(torch.randint(5, 60, (1,), generator=gen)),
            int(torch.randint(5, 120, (1,), generator=gen)),
        )
        ids = torch.randint(4, 1024, (prompt + answer,), generator=gen).tolist()
        out.append((ids, [-100] * prompt + ids[prompt:]))
    return out


def grads(model) -> torch.Tensor:
    return torch.cat([p.grad.float().reshape(-1) for n, p in model.named_parameters() if p.requires_grad])


def main() -> int:
    folder = Path(tempfile.mkdtemp()) / "m"
    build(folder)
    data = examples(8)
    count = sum(1 for _, labels in data for x in labels[1:] if x != -100)
    results = {}
    for four_bit in (False, True):
        model = model_for(folder, four_bit)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            total = 0
            for ids, labels in data:
                out = model(
                    input_ids=torch.tensor([ids], device="cuda"), labels=torch.tensor([labels], device="cuda")
                )
                n = sum(1 for x in labels[1:] if x != -100)
                total = total + out.loss * n / count
        total.backward()
        reference = grads(model)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        model.zero_grad(set_to_none=True)
        cases = {
            "default": {},
            "no_liger": {"use_liger": False},
            "no_fuse_residual": {"fuse_residual": False},
            "no_flat": {"flat_parameters": False},
            "no_checkpoint": {"gradient_checkpointing": False},
            "hook_checkpoint": {"reentrant_checkpoint": False},
            "no_fused_lora": {"fused_lora": False},
            "torch_norm": {"liger_norm": False},
        }
        for case, kwargs in cases.items():
            fresh = model_for(folder, four_bit)
            runner = fast.PackedCausalLM(fresh, fast.FastOptions(max_tokens=400, **kwargs))
            packs = fast.plan_micro_batches(list(range(len(data))), [len(d[0]) for d in data], 400)
            for pack in packs:
                batch = fast.pack_examples([data[i] for i in pack], "cuda")
                (runner.loss_sum(batch) / count).backward()
            got = grads(fresh)
            error = float((got - reference).norm() / reference.norm())
            per_module = {}
            offset = 0
            for n, p in fresh.named_parameters():
                if p.requires_grad:
                    k = p.numel()
                    ref = reference[offset : offset + k]
                    per_module[n] = float((got[offset : offset + k] - ref).norm() / (ref.norm() + 1e-12))
                    offset += k
            worst = sorted(per_module.items(), key=lambda kv: -kv[1])[:4]
            results[f"{'4bit' if four_bit else 'bf16'}:{case}"] = {
                "relative_error": round(error, 5),
                "worst": [(w[0][-60:], round(w[1], 4)) for w in worst],
            }
            print(f"{'4bit' if four_bit else 'bf16'} {case}: {error:.5f} worst {worst[:2]}", flush=True)
            del fresh, runner
    print(json.dumps({"names": len(names)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
