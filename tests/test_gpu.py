"""QLoRA on a CUDA GPU through the real trainer subprocess; skipped where no GPU is present (CI)."""

from __future__ import annotations

import subprocess

import pytest

from engine.events import Eval, Log, RunFinished, Step, read_events
from engine.launch import _child_env, prepare_run, train_command
from engine.workspace import Workspace, latest_checkpoint

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU on this machine", allow_module_level=True)


def test_qlora_trains_in_bf16_on_the_gpu_and_reports_gpu_memory(tiny_workspace: Workspace) -> None:
    recipe = tiny_workspace.root / "recipes" / "tiny.toml"
    overrides = [
        "train.method=qlora",
        "train.max_steps=4",
        "train.device=cuda",
        "model.dtype=bfloat16",
        "quant.compute_dtype=bfloat16",
        "train.optimizer=paged_adamw_32bit",
    ]
    run_dir = prepare_run(tiny_workspace, recipe, overrides)
    result = subprocess.run(
        train_command(run_dir),
        capture_output=True,
        text=True,
        env=_child_env(run_dir),
        timeout=300,
        cwd=run_dir,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    events = read_events(run_dir / "events.jsonl")
    steps = [event for event in events if isinstance(event, Step)]
    assert [event.step for event in steps] == [1, 2, 3, 4]
    assert all(event.gpu_mem_gib and event.gpu_mem_gib > 0 for event in steps)
    assert isinstance(events[-1], RunFinished) and events[-1].status == "finished"
    assert (latest_checkpoint(run_dir) / "adapter_model.safetensors").is_file()


QLORA_ON_GPU = [
    "train.method=qlora",
    "train.device=cuda",
    "model.dtype=bfloat16",
    "quant.compute_dtype=bfloat16",
    "train.optimizer=paged_adamw_32bit",
]


def _train_run(workspace: Workspace, overrides: list[str]) -> list:
    run_dir = prepare_run(workspace, workspace.root / "recipes" / "tiny.toml", overrides)
    result = subprocess.run(
        train_command(run_dir),
        capture_output=True,
        text=True,
        env=_child_env(run_dir),
        timeout=300,
        cwd=run_dir,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (latest_checkpoint(run_dir) / "adapter_model.safetensors").is_file()
    return read_events(run_dir / "events.jsonl")


def test_qlora_on_packs_trains_like_padded_batches_through_the_trainer(tiny_workspace: Workspace) -> None:
    common = [
        *QLORA_ON_GPU,
        "train.max_steps=6",
        "train.batch_size=2",
        "train.grad_accum=2",
        "train.eval_steps=3",
        "data.eval_fraction=0.3",
        "train.gradient_checkpointing=true",
        "lora.dropout=0",
        'lora.target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]',
    ]
    padded = _train_run(tiny_workspace, [*common, "train.packing=false"])
    packed = _train_run(tiny_workspace, [*common, "train.packing=true", "train.max_tokens_per_batch=32"])
    assert any("Training on packs of up to 32 tokens" in e.message for e in packed if isinstance(e, Log))
    assert isinstance(packed[-1], RunFinished) and packed[-1].status == "finished"
    padded_steps = [e for e in padded if isinstance(e, Step)]
    packed_steps = [e for e in packed if isinstance(e, Step)]
    assert [e.step for e in packed_steps] == [1, 2, 3, 4, 5, 6]
    assert all(e.gpu_mem_gib and e.gpu_mem_gib > 0 and e.tokens_per_s for e in packed_steps)
    # bf16 compute on both paths: the same step losses up to rounding, not bit for bit.
    for a, b in zip(padded_steps, packed_steps, strict=True):
        assert b.loss == pytest.approx(a.loss, rel=2e-2), (a, b)
    assert packed_steps[-1].loss < packed_steps[0].loss
    padded_evals = [e.eval_loss for e in padded if isinstance(e, Eval)]
    packed_evals = [e.eval_loss for e in packed if isinstance(e, Eval)]
    assert len(packed_evals) == len(padded_evals) == 2
    assert packed_evals == pytest.approx(padded_evals, rel=2e-2)


def test_layer_graphs_replay_what_the_eager_backward_computes() -> None:
    """The packed path's CUDA graphs (padded packs, replayed recompute and backward) give the eager gradients."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine import fast

    def model_and_runner(graphs: bool) -> tuple[torch.nn.Module, fast.PackedCausalLM]:
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=512,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets)
        )
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.05)
        model.train()
        options = fast.FastOptions(max_tokens=300, cuda_graphs=graphs, graph_granularity=128)
        return model, fast.PackedCausalLM(model, options)

    generator = torch.Generator().manual_seed(1)
    examples = []
    for length, prompt in [(40, 10), (75, 30), (33, 5), (120, 60)]:
        ids = torch.randint(1, 512, (length,), generator=generator).tolist()
        examples.append((ids, [-100] * prompt + ids[prompt:]))

    grads = {}
    for graphs in (False, True):
        _, runner = model_and_runner(graphs)
        assert (runner.graphs is not None) == graphs
        runs = []
        for _ in range(3):  # eager first, then captured, then replayed
            packs = runner.pack(examples)
            assert all(bool(p.graph_tokens) == graphs for p in packs)
            for pack in packs:
                runner.loss_sum(pack).backward()
            runs.append(runner.flat.grad.clone())
            runner.flat.zero_grad()
        # FlashAttention's backward adds in nondeterministic order: equal up to rounding.
        for run in runs[1:]:
            assert _relative_difference(run, runs[0]) < 1e-2
        grads[graphs] = runs[-1]
        if graphs:
            assert runner.graphs.captured and runner.graph_pool_bytes() > 0
            assert {tokens for tokens, _ in runner.graphs.graphs} == {128, 256, 384}
    assert _relative_difference(grads[True], grads[False]) < 2e-2


def _relative_difference(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.float() - reference.float()).norm() / reference.float().norm())
