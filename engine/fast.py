"""Padding-free QLoRA/LoRA training steps: length-grouped steps, token-budget packing, varlen attention.

engine.train uses this path when a recipe sets `train.packing` and the model has the Llama layout: its
Trainer collates each micro-batch into an `ExampleBatch`, and `PackedCausalLM.backward_examples` packs it into
token-budget rows and runs forward and backward. Semantics match the padded path: the same model and LoRA
adapters, loss on answer tokens only, averaged over every answer token of the optimizer step.

Importing this module needs only torch; bitsandbytes and liger-kernel are used when present.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from engine.recipes import Recipe

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Architectures whose decoder layer is norm → q/k/v → RoPE → attention → o → norm → gate/up → SiLU·mul → down.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
DEFAULT_MAX_TOKENS = 4096


# ------------------------------------------------------------------------------------------------------------
# Step composition and micro-batching (pure Python, shared by every device)
# ------------------------------------------------------------------------------------------------------------


def length_grouped_steps(
    lengths: Sequence[int], samples_per_step: int, seed: int, megabatch_steps: int = 50
) -> list[list[int]]:
    """Indices of each optimizer step: shuffled, sorted by length inside mega-batches, steps in shuffled
    order.

    Samples of like length share a step (little padding, similar packs); the step order is random so that the
    loss curve does not walk from long to short samples.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    megabatch = max(1, samples_per_step * megabatch_steps)
    steps: list[list[int]] = []
    for start in range(0, len(order), megabatch):
        chunk = sorted(order[start : start + megabatch], key=lambda i: -lengths[i])
        steps += [chunk[i : i + samples_per_step] for i in range(0, len(chunk), samples_per_step)]
    rng.shuffle(steps)
    return steps


def plan_micro_batches(indices: Sequence[int], lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Split one step's samples into as few packs as fit `max_tokens` each, balanced by token count.

    A sample longer than the budget gets a pack of its own. Longest-first into the lightest pack keeps the
    packs
    even, which keeps peak memory near `max_tokens` worth of activations.
    """
    if not indices:
        return []
    total = sum(lengths[i] for i in indices)
    count = max(1, math.ceil(total / max(1, max_tokens)))
    while True:
        packs: list[list[int]] = [[] for _ in range(count)]
        loads = [0] * count
        for i in sorted(indices, key=lambda j: -lengths[j]):
            slot = min(range(count), key=loads.__getitem__)
            packs[slot].append(i)
            loads[slot] += lengths[i]
        overfull = any(load > max_tokens and len(pack) > 1 for load, pack in zip(loads, packs, strict=True))
        if not overfull or count >= len(indices):
            return [sorted(pack) for pack in packs if pack]
        count += 1


def shard_for_rank(indices: Sequence[int], lengths: Sequence[int], world_size: int, rank: int) -> list[int]:
    """This rank's share of one step's samples, balanced by token count across ranks (deterministic)."""
    loads = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(indices, key=lambda j: (-lengths[j], j)):
        slot = min(range(world_size), key=lambda r: (loads[r], r))
        shares[slot].append(i)
        loads[slot] += lengths[i]
    return sorted(shares[rank])


# ------------------------------------------------------------------------------------------------------------
# Packing
# ------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PackedBatch:
    """Several samples concatenated into one row, with what attention and the loss need to keep them apart."""

    input_ids: torch.Tensor  # (tokens,) int64
    position_ids: torch.Tensor  # (1, tokens) int64, restarting at 0 for each sample
    cu_seqlens: torch.Tensor  # (samples + 1,) int32, sample boundaries
    seq_lengths: list[int]
    max_seqlen: int
    target_positions: torch.Tensor  # (targets,) int64: positions whose next token is an answer token
    targets: torch.Tensor  # (targets,) int64: that next token
    num_tokens: int
    num_targets: int
    # The padded size when the pack was padded for CUDA-graph replay (0: not padded).
    graph_tokens: int = 0

    def to(self, device: torch.device | str) -> PackedBatch:
        """The same batch on `device` (pinned host memory makes the copy asynchronous)."""
        move = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in move.items():
            if isinstance(value, torch.Tensor):
                move[name] = value.to(device, non_blocking=True)
        return PackedBatch(**move)


def pack_examples(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]],
    device: torch.device | str | None = None,
    pad_to: int | None = None,
    num_sequences: int | None = None,
) -> PackedBatch:
    """Pack (input_ids, labels) pairs, labels -100 where no loss is taken, into one padding-free row.

    Position j predicts token j+1 of the same sample; a sample's last position predicts nothing, so no loss
    ever crosses into the next sample. `pad_to` appends a filler sequence without targets up to that many
    tokens and `num_sequences` repeats the last boundary up to that many sequences (empty ones), which gives
    every pack of one size the same shapes (what a CUDA graph replays); `num_tokens` still counts real tokens.
    """
    ids: list[int] = []
    positions: list[int] = []
    target_positions: list[int] = []
    targets: list[int] = []
    seq_lengths: list[int] = []
    for input_ids, labels in examples:
        length = len(input_ids)
        if length != len(labels):
            raise ValueError("input_ids and labels differ in length")
        if length == 0:
            continue
        offset = len(ids)
        ids.extend(int(t) for t in input_ids)
        positions.extend(range(length))
        seq_lengths.append(length)
        for j in range(length - 1):
            label = int(labels[j + 1])
            if label != IGNORE_INDEX:
                target_positions.append(offset + j)
                targets.append(label)
    if not ids:
        raise ValueError("cannot pack an empty batch")
    real_tokens = len(ids)
    if pad_to is not None and pad_to > real_tokens:
        filler = pad_to - real_tokens
        ids.extend([0] * filler)
        positions.extend(range(filler))
        seq_lengths.append(filler)
    cu = [0]
    for length in seq_lengths:
        cu.append(cu[-1] + length)
    if num_sequences is not None:
        cu.extend([cu[-1]] * max(0, num_sequences + 1 - len(cu)))
    pin = torch.cuda.is_available()

    def tensor(values: list[int], dtype: torch.dtype) -> torch.Tensor:
        out = torch.tensor(values, dtype=dtype)
        return out.pin_memory() if pin else out

    batch = PackedBatch(
        input_ids=tensor(ids, torch.long),
        position_ids=tensor(positions, torch.long).unsqueeze(0),
        cu_seqlens=tensor(cu, torch.int32),
        seq_lengths=seq_lengths,
        max_seqlen=len(ids) if pad_to is not None else max(seq_lengths),
        target_positions=tensor(target_positions, torch.long),
        targets=tensor(targets, torch.long),
        num_tokens=real_tokens,
        num_targets=len(targets),
    )
    return batch.to(device) if device is not None else batch


@dataclasses.dataclass(frozen=True)
class ExampleBatch:
    """One micro-batch of (input_ids, labels) samples, kept as lists until the runner packs them.

    A plain object rather than a list or tensor, so data loaders neither move it to a device nor walk it
    element by element.
    """

    examples: list[tuple[list[int], list[int]]]

    @property
    def num_tokens(self) -> int:
        """Tokens in the batch (no padding exists on this path)."""
        return sum(len(ids) for ids, _ in self.examples)

    @property
    def num_targets(self) -> int:
        """Answer tokens that carry loss: labels after the first position that are not IGNORE_INDEX."""
        return sum(1 for _, labels in self.examples for label in labels[1:] if label != IGNORE_INDEX)


EXAMPLES_KEY = "examples"


class PackedCollator:
    """A Trainer collator for the packed path: `{EXAMPLES_KEY: ExampleBatch}`; the runner packs the samples."""

    def __call__(self, features: Sequence[dict[str, Sequence[int]]]) -> dict[str, ExampleBatch]:
        return {EXAMPLES_KEY: ExampleBatch([(list(f["input_ids"]), list(f["labels"])) for f in features])}


# ------------------------------------------------------------------------------------------------------------
# Kernels: LoRA over a (4-bit) base linear, attention over packed samples, norms, loss
# ------------------------------------------------------------------------------------------------------------


class _FastDequant:
    """Dequantizes one bitsandbytes NF4/FP4 weight by calling its CUDA library directly.

    Same kernels and arguments as `bitsandbytes.functional.dequantize_4bit`, without its Python and custom-op
    dispatch, which costs more host time than the kernels take on the GPU once per linear layer per pass.
    """

    def __init__(self, weight: torch.Tensor, cache_absmax: bool = False) -> None:
        from bitsandbytes.backends.cuda import ops as bnb_cuda_ops
        from bitsandbytes.cextension import lib

        state = weight.quant_state
        self.weight = weight
        self.state = state
        self.stream = bnb_cuda_ops._get_raw_stream
        kind = state.quant_type
        self.dequant_4bit = {
            torch.bfloat16: getattr(lib, f"cdequantize_blockwise_bf16_{kind}"),
            torch.float16: getattr(lib, f"cdequantize_blockwise_fp16_{kind}"),
        }
        self.dequant_absmax = lib.cdequantize_blockwise_fp32
        self.cache_absmax = cache_absmax
        self.absmax_cache: torch.Tensor | None = None

    def __call__(self, dtype: torch.dtype) -> torch.Tensor:
        state = self.state
        device = self.weight.device
        stream = self.stream(device.index)
        absmax = state.absmax
        if self.absmax_cache is not None:
            absmax = self.absmax_cache
        elif state.nested:
            nested = state.state2
            absmax_u8 = state.absmax
            absmax = torch.empty(absmax_u8.shape, dtype=torch.float32, device=device)
            self.dequant_absmax(
                nested.code.data_ptr(),
                absmax_u8.data_ptr(),
                nested.absmax.data_ptr(),
                absmax.data_ptr(),
                nested.blocksize,
                absmax_u8.numel(),
                stream,
            )
            absmax += state.offset
            # Not while a CUDA graph is being captured: the capture records kernels without running them, so
            # the cached tensor would never be filled.
            if self.cache_absmax and not torch.cuda.is_current_stream_capturing():
                self.absmax_cache = absmax
        out = torch.empty(state.shape, dtype=dtype, device=device)
        self.dequant_4bit[dtype](
            None,
            self.weight.data_ptr(),
            absmax.data_ptr(),
            out.data_ptr(),
            state.blocksize,
            out.numel(),
            stream,
        )
        return out


def _dense_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's weight as a dense (out, in) tensor, dequantizing a bitsandbytes 4-bit weight."""
    weight = base.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        return weight.to(dtype)
    fast = base.__dict__.get("_tunedeck_dequant")
    if fast is not None and dtype in (torch.bfloat16, torch.float16):
        return fast(dtype)
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.dequantize_4bit(weight, quant_state).to(dtype)


def enable_fast_dequant(model: nn.Module, cache_absmax: bool = False) -> int:
    """Give every CUDA 4-bit layer the direct dequantizer, after checking it matches bitsandbytes bit for bit.

    `cache_absmax` keeps each weight's double-quantized scales in float32 after first use (one kernel per
    dequantization instead of three, for ~1/16 byte per weight). Returns how many layers got it (0 when the
    check
    fails or bitsandbytes' internals differ from the expected).
    """
    layers = [
        m
        for m in model.modules()
        if getattr(getattr(m, "weight", None), "quant_state", None) is not None
        and m.weight.device.type == "cuda"
    ]
    if not layers:
        return 0
    try:
        import bitsandbytes.functional as bnb_functional

        probe = _FastDequant(layers[0].weight)
        expected = bnb_functional.dequantize_4bit(layers[0].weight, layers[0].weight.quant_state).to(
            torch.bfloat16
        )
        if not torch.equal(probe(torch.bfloat16), expected):
            log.warning("direct 4-bit dequantization differs from bitsandbytes; using bitsandbytes")
            return 0
        for layer in layers:
            layer.__dict__["_tunedeck_dequant"] = _FastDequant(layer.weight, cache_absmax)
    except (ImportError, AttributeError, RuntimeError) as exc:
        log.info("direct 4-bit dequantization unavailable (%s)", exc)
        return 0
    return len(layers)


def _accumulate_grad(param: torch.Tensor, grad: torch.Tensor, alpha: float = 1.0) -> None:
    """param.grad += alpha·grad in the parameter's dtype (one kernel once the gradient exists)."""
    if param.grad is None:
        param.grad = (grad * alpha if alpha != 1.0 else grad).to(param.dtype)
    else:
        param.grad.add_(grad, alpha=alpha)


class _LoraLinear(torch.autograd.Function):
    """y = residual + x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ in one node.

    Saves only x, the dropout mask and x·Aᵀ (not a copy of the base output); the frozen base weight is
    dequantized
    again in backward rather than kept, as bitsandbytes does. Adding the residual here saves a pass over the
    output.
    The adapter weights are used in the compute dtype (`a_low`, `b_low`, cast once per layer by the caller)
    and their
    gradients are added straight into the float32 `.grad` buffers, which saves casts and autograd bookkeeping.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        base: nn.Module,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        a_low: torch.Tensor | None,
        b_low: torch.Tensor | None,
        scaling: float,
        dropout_p: float,
    ) -> torch.Tensor:
        dtype = x.dtype
        a = a_low if a_low is not None else lora_a.detach().to(dtype)
        b = b_low if b_low is not None else lora_b.detach().to(dtype)
        weight = _dense_weight(base, dtype)
        out = torch.mm(x, weight.t()) if residual is None else torch.addmm(residual, x, weight.t())
        del weight
        if base.bias is not None:
            out += base.bias.to(dtype)
        keep = None
        dropped = x
        if dropout_p > 0:
            dropped, keep = torch.native_dropout(x, dropout_p, True)
        hidden = torch.mm(dropped, a.t())
        del dropped
        out.addmm_(hidden, b.t(), alpha=scaling)
        ctx.base = base
        ctx.scaling = scaling
        ctx.dropout_p = dropout_p
        ctx.has_residual = residual is not None
        ctx.lora_a = lora_a
        ctx.lora_b = lora_b
        ctx.save_for_backward(x, keep, hidden, a, b)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, keep, hidden, a, b = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        inverse_keep = 1.0 / (1.0 - ctx.dropout_p)
        # s·(grad_out·B) without a separate scaling pass (beta=0 ignores the uninitialised input).
        grad_hidden = torch.addmm(
            grad_out.new_empty(grad_out.shape[0], b.shape[1]), grad_out, b, beta=0, alpha=ctx.scaling
        )
        if ctx.lora_b.requires_grad:
            _accumulate_grad(ctx.lora_b, torch.mm(grad_out.t(), hidden), ctx.scaling)
        if ctx.lora_a.requires_grad:
            dropped = x if keep is None else torch.ops.aten.native_dropout_backward(x, keep, inverse_keep)
            _accumulate_grad(ctx.lora_a, torch.mm(grad_hidden.t(), dropped))
            del dropped
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = _dense_weight(ctx.base, grad_out.dtype)
            if keep is None:
                grad_x = torch.mm(grad_out, weight)
                grad_x.addmm_(grad_hidden, a)
            else:
                lora_part = torch.ops.aten.native_dropout_backward(
                    torch.mm(grad_hidden, a), keep, inverse_keep
                )
                grad_x = torch.addmm(lora_part, grad_out, weight)
            del weight
        return grad_x, grad_out if ctx.has_residual else None, None, None, None, None, None, None, None


def _lora_parts(module: nn.Module) -> tuple[nn.Module, torch.Tensor, torch.Tensor, float, float] | None:
    """(base layer, A, B, scaling, dropout p) of a plain single-adapter peft LoRA linear, else None."""
    if not hasattr(module, "lora_A") or not hasattr(module, "base_layer"):
        return None
    if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
        return None
    active = list(getattr(module, "active_adapters", []))
    if len(active) != 1 or active[0] not in module.lora_A:
        return None
    name = active[0]
    if getattr(module, "use_dora", {}).get(name, False) or name in getattr(module, "lora_variant", {}):
        return None
    base = module.get_base_layer()
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    if getattr(weight, "quant_state", None) is None and not weight.is_floating_point():
        return None  # 8-bit and other packed formats keep their own forward
    dropout = module.lora_dropout[name]
    dropout_p = float(dropout.p) if isinstance(dropout, nn.Dropout) and module.training else 0.0
    return (
        base,
        module.lora_A[name].weight,
        module.lora_B[name].weight,
        float(module.scaling[name]),
        dropout_p,
    )


def linear(
    module: nn.Module,
    x: torch.Tensor,
    fused_lora: bool = True,
    residual: torch.Tensor | None = None,
    low: dict[int, torch.Tensor] | None = None,
    parts_cache: dict[int, Any] | None = None,
) -> torch.Tensor:
    """Apply a (possibly LoRA-wrapped, possibly 4-bit) linear layer to a 2-D input, plus `residual` if given.

    `low` maps id(adapter weight) to that weight already cast to the compute dtype; `parts_cache` memoises the
    module inspection (keyed by id and training mode), which otherwise costs more host time than a kernel
    launch.
    """
    if not fused_lora:
        parts = None
    elif parts_cache is None:
        parts = _lora_parts(module)
    else:
        key = (id(module), module.training)
        if key not in parts_cache:
            parts_cache[key] = _lora_parts(module)
        parts = parts_cache[key]
    if parts is None:
        out = module(x)
        return out if residual is None else residual + out
    base, lora_a, lora_b, scaling, dropout_p = parts
    a_low = low.get(id(lora_a)) if low else None
    b_low = low.get(id(lora_b)) if low else None
    return _LoraLinear.apply(x, residual, base, lora_a, lora_b, a_low, b_low, scaling, dropout_p)


def _flash_attention_available(device: torch.device) -> bool:
    return device.type == "cuda" and hasattr(torch.ops.aten, "_flash_attention_forward")


class _FlashVarlen(torch.autograd.Function):
    """Causal attention of packed samples through PyTorch's built-in FlashAttention-2 varlen kernels."""

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        scale: float,
    ) -> torch.Tensor:
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, True, False, scale=scale
        )
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, rng_state, unused)
        ctx.max_seqlen = max_seqlen
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse, cu_seqlens, rng_state, unused = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad_out.contiguous(),
            q,
            k,
            v,
            out,
            lse,
            cu_seqlens,
            cu_seqlens,
            ctx.max_seqlen,
            ctx.max_seqlen,
            0.0,
            True,
            rng_state,
            unused,
            scale=ctx.scale,
        )
        return dq, dk, dv, None, None, None


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch, scale: float
) -> torch.Tensor:
    """Causal attention within each packed sample; q is (tokens, heads, dim), k/v may have fewer heads."""
    if _flash_attention_available(q.device) and q.dtype in (torch.float16, torch.bfloat16):
        return _FlashVarlen.apply(q, k, v, batch.cu_seqlens, batch.max_seqlen, scale)
    # Reference path (CPU, tests): one SDPA call per sample.
    groups = q.shape[1] // k.shape[1]
    outputs = []
    start = 0
    for length in batch.seq_lengths:
        end = start + length
        qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        if groups > 1:
            ks = ks.repeat_interleave(groups, dim=1)
            vs = vs.repeat_interleave(groups, dim=1)
        outputs.append(
            F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)[0].transpose(0, 1)
        )
        start = end
    return torch.cat(outputs, dim=0)


class _StoredTensor:
    """A checkpointed layer input kept on the GPU, or copied to pinned host memory and brought back on
    demand."""

    def __init__(
        self,
        tensor: torch.Tensor | None = None,
        host: torch.Tensor | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.tensor = tensor
        self.host = host
        self.device = device
        self.ready: torch.cuda.Event | None = None


class _Offloader:
    """Moves checkpointed layer inputs to pinned host memory on a side stream, and back one layer ahead of
    use.

    Copies overlap the layers' compute (separate copy engines), so a pack's activations cost one layer's
    input of
    GPU memory instead of one per layer, which lets packs grow at the same peak memory.
    """

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.enabled = enabled and device.type == "cuda"
        self.device = device
        self.stream = torch.cuda.Stream(device) if self.enabled else None

    def store(self, tensor: torch.Tensor) -> _StoredTensor:
        if not self.enabled:
            return _StoredTensor(tensor=tensor)
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            host.copy_(tensor, non_blocking=True)
        tensor.record_stream(self.stream)  # keep the allocator from reusing it before the copy has read it
        return _StoredTensor(host=host, device=tensor.device)

    def prefetch(self, stored: _StoredTensor) -> None:
        if stored.host is None or stored.tensor is not None:
            return
        with torch.cuda.stream(self.stream):
            stored.tensor = stored.host.to(stored.device, non_blocking=True)
            stored.ready = torch.cuda.Event()
            stored.ready.record(self.stream)

    def load(self, stored: _StoredTensor) -> torch.Tensor:
        if stored.host is None:
            return stored.tensor
        self.prefetch(stored)
        current = torch.cuda.current_stream(self.device)
        current.wait_event(stored.ready)
        tensor = stored.tensor
        tensor.record_stream(current)
        stored.tensor = None
        return tensor


class _CheckpointedLayer(torch.autograd.Function):
    """Runs a decoder layer without keeping its activations, and recomputes them in backward (reentrant
    style).

    Only the layer input is kept (possibly on the host); the dropout RNG state is restored for the
    recompute, so
    backward sees exactly the forward's masks. Lower host overhead than hook-based (non-reentrant)
    checkpointing.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        runner: PackedCausalLM,
        index: int,
        layer: nn.Module,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: PackedBatch,
        stored: list[_StoredTensor],
    ) -> torch.Tensor:
        ctx.runner, ctx.index, ctx.layer, ctx.cos, ctx.sin, ctx.batch, ctx.stored = (
            runner,
            index,
            layer,
            cos,
            sin,
            batch,
            stored,
        )
        device = hidden.device
        ctx.rng_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()
        stored.append(runner.offloader.store(hidden.detach()))
        with torch.no_grad():
            return runner._layer(layer, hidden, cos, sin, batch)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        runner = ctx.runner
        hidden = runner.offloader.load(ctx.stored[ctx.index])
        if ctx.index > 0:
            runner.offloader.prefetch(ctx.stored[ctx.index - 1])
        graphs = runner.graphs
        if graphs is not None and graphs.has(ctx.batch.graph_tokens, ctx.index):
            grad_in = graphs.backward(ctx.index, hidden, grad_out, ctx.batch.graph_tokens)
            return grad_in, None, None, None, None, None, None, None
        hidden = hidden.detach().requires_grad_(True)
        device = hidden.device
        cuda = device.type == "cuda"
        with torch.random.fork_rng(devices=[device] if cuda else [], device_type=device.type):
            if cuda:
                torch.cuda.set_rng_state(ctx.rng_state, device)
            else:
                torch.set_rng_state(ctx.rng_state)
            with (
                torch.enable_grad(),
                torch.autocast(device_type=device.type, dtype=runner.dtype, enabled=cuda),
            ):
                out = runner._layer(ctx.layer, hidden, ctx.cos, ctx.sin, ctx.batch)
        torch.autograd.backward(out, grad_out)
        return hidden.grad, None, None, None, None, None, None, None


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class _LayerGraphs:
    """Each checkpointed decoder layer's recompute-and-backward captured as one CUDA graph per pack size.

    That part of a step issues about two thirds of its ~3,000 kernels per pack from Python, which on a slow host
    takes longer than the GPU needs to run them; a replay issues them in one call. Packs are padded to a multiple
    of `granularity` tokens and to `max_sequences` sequences, so that a few shapes cover every pack; graphs for
    every size are captured before the second pack (the first runs eagerly). They share one memory pool: graphs
    run one at a time and leave nothing in it (inputs and outputs live in the static buffers below), so it holds
    one layer's working memory.
    """

    def __init__(self, runner: PackedCausalLM, max_tokens: int, granularity: int, max_sequences: int) -> None:
        self.runner = runner
        self.granularity = granularity
        self.max_sequences = max_sequences
        self.capacity = _round_up(max(1, max_tokens), granularity)
        width = runner.config.hidden_size
        self.hidden_in = torch.zeros(self.capacity, width, device=runner.device, dtype=runner.dtype)
        self.grad_in = torch.zeros_like(self.hidden_in)
        self.grad_out = torch.zeros_like(self.hidden_in)
        self.cu_seqlens = torch.zeros(max_sequences + 1, device=runner.device, dtype=torch.int32)
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.pool: Any = None
        self.stream = torch.cuda.Stream(runner.device)
        self.captured = False
        # Packs trained eagerly so far: the first one initialises what a capture cannot (library handles,
        # kernels loaded on first launch, the cached 4-bit scales).
        self.eager_packs = 0
        self.capture_s = 0.0
        self.pool_bytes = 0
        self.peak_before = 0

    def bucket(self, tokens: int, sequences: int) -> int:
        """The padded size of a pack of `tokens` tokens in `sequences` samples, or 0 when no graph fits it."""
        size = _round_up(tokens, self.granularity)
        filler = 1 if size > tokens else 0
        if size > self.capacity or sequences + filler > self.max_sequences:
            return 0
        return size

    def has(self, tokens: int, index: int) -> bool:
        return (tokens, index) in self.graphs

    def load(self, batch: PackedBatch, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Copy a padded pack's rotary tables and sample boundaries into the graphs' static inputs."""
        tokens = batch.graph_tokens
        if self.cos is None:
            shape = (cos.shape[0], self.capacity, cos.shape[-1])
            self.cos = torch.zeros(shape, device=cos.device, dtype=cos.dtype)
            self.sin = torch.zeros(shape, device=sin.device, dtype=sin.dtype)
        self.cos[:, :tokens].copy_(cos)
        self.sin[:, :tokens].copy_(sin)
        self.cu_seqlens.copy_(batch.cu_seqlens)

    def capture_all(self, layers: Sequence[nn.Module], count: int) -> None:
        """Capture graphs of the first `count` layers (the checkpointed ones) for every pack size."""
        import time

        started = time.perf_counter()
        device = self.runner.device
        self.peak_before = torch.cuda.max_memory_allocated(device)
        current = torch.cuda.current_stream(device)
        self.stream.wait_stream(current)
        # Largest first: smaller captures then reuse the pool's big blocks instead of growing it.
        sizes = range(self.capacity, 0, -self.granularity)
        for tokens in sizes:
            for index in reversed(range(count)):
                self.graphs[(tokens, index)] = self._capture(layers[index], tokens)
        current.wait_stream(self.stream)
        torch.cuda.synchronize(device)
        self.captured = True
        self.capture_s = time.perf_counter() - started
        self.pool_bytes = self._pool_bytes()
        log.info(
            "captured %d layer graphs in %.1f s (pool %.2f GiB)",
            len(self.graphs),
            self.capture_s,
            self.pool_bytes / 2**30,
        )
        # What a replay needs lives in the pool, counted by `peak_bytes`; the allocator's own peak restarts so
        # that the capture's transient allocations are not counted twice.
        torch.cuda.reset_peak_memory_stats(device)

    def peak_bytes(self) -> int:
        """Peak GPU memory of training with graphs: the allocator's peak since capture plus the pool."""
        device = self.runner.device
        if not self.captured:
            return torch.cuda.max_memory_allocated(device)
        return max(self.peak_before, torch.cuda.max_memory_allocated(device) + self.pool_bytes)

    def _batch(self, tokens: int) -> PackedBatch:
        """A stand-in pack of `tokens` padded tokens whose boundaries are the static `cu_seqlens`."""
        return PackedBatch(
            input_ids=self.cu_seqlens,
            position_ids=self.cu_seqlens,
            cu_seqlens=self.cu_seqlens,
            seq_lengths=[],
            max_seqlen=tokens,
            target_positions=self.cu_seqlens,
            targets=self.cu_seqlens,
            num_tokens=tokens,
            num_targets=0,
            graph_tokens=tokens,
        )

    def _pool_bytes(self) -> int:
        """GPU memory the graphs' private pool holds (torch counts it as reserved, not as allocated)."""
        if self.pool is None:
            return 0
        segments = torch.cuda.memory._snapshot(self.runner.device)["segments"]
        return sum(
            s["total_size"] for s in segments if tuple(s.get("segment_pool_id", ())) == tuple(self.pool)
        )

    def _capture(self, layer: nn.Module, tokens: int) -> torch.cuda.CUDAGraph:
        runner = self.runner
        batch = self._batch(tokens)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(self.stream):
            graph.capture_begin(pool=self.pool)
            try:
                hidden = self.hidden_in[:tokens].detach().requires_grad_(True)
                with (
                    torch.enable_grad(),
                    torch.autocast(device_type="cuda", dtype=runner.dtype),
                ):
                    out = runner._layer(layer, hidden, self.cos[:, :tokens], self.sin[:, :tokens], batch)
                torch.autograd.backward(out, self.grad_in[:tokens])
                self.grad_out[:tokens].copy_(hidden.grad)
                del hidden, out
            finally:
                graph.capture_end()
        if self.pool is None:
            self.pool = graph.pool()
        return graph

    def backward(self, index: int, hidden: torch.Tensor, grad_out: torch.Tensor, tokens: int) -> torch.Tensor:
        """Replay layer `index`'s recompute-and-backward for a padded pack; returns the layer input's grad."""
        self.hidden_in[:tokens].copy_(hidden)
        self.grad_in[:tokens].copy_(grad_out)
        self.graphs[(tokens, index)].replay()
        grad = self.grad_out[:tokens]
        # The next layer down copies this buffer before its replay overwrites it; the embeddings' grad does not.
        return grad.clone() if index == 0 else grad


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Kernels:
    """Norm, RoPE, SwiGLU and the loss: liger-kernel's Triton versions where importable, else PyTorch."""

    def __init__(self, use_liger: bool, device: torch.device, liger_norm: bool = True) -> None:
        self.liger = None
        self.liger_norm = liger_norm
        if use_liger and device.type == "cuda":
            try:
                from liger_kernel.transformers import functional as liger_functional

                self.liger = liger_functional
            except ImportError as exc:
                log.info("liger-kernel not available (%s); using PyTorch kernels", exc)

    def rms_norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        if self.liger is not None and self.liger_norm:
            return self.liger.liger_rms_norm(x, norm.weight, eps, casting_mode="llama")
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return norm.weight * x32.to(dtype)

    def rope(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k: (tokens, heads, dim); cos, sin: (1, tokens, dim)."""
        if self.liger is not None:
            q4, k4 = self.liger.liger_rope(
                q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2), cos, sin
            )
            return q4.transpose(1, 2)[0], k4.transpose(1, 2)[0]
        cos_t = cos[0].unsqueeze(1)
        sin_t = sin[0].unsqueeze(1)
        return q * cos_t + _rotate_half(q) * sin_t, k * cos_t + _rotate_half(k) * sin_t

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.liger is not None:
            return self.liger.liger_swiglu(gate, up)
        return F.silu(gate) * up

    def loss_sum(
        self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 4096
    ) -> torch.Tensor:
        """Summed cross-entropy of hidden·weightᵀ against targets, never holding all the logits at once."""
        if self.liger is not None:
            return self.liger.liger_fused_linear_cross_entropy(hidden, weight, targets, reduction="sum")
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            total = total + checkpoint(
                _chunk_ce,
                hidden[start : start + chunk],
                weight,
                targets[start : start + chunk],
                use_reentrant=False,
            )
        return total


def _chunk_ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((hidden @ weight.t()).float(), targets, reduction="sum")


# ------------------------------------------------------------------------------------------------------------
# The runner
# ------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FastOptions:
    """Knobs of the packed path; the defaults fit a 7B QLoRA step of 16 QA samples in under 8 GiB."""

    # Tokens per packed micro-batch; activation memory grows with it, per-micro-batch overhead shrinks.
    max_tokens: int = DEFAULT_MAX_TOKENS
    # Recompute each decoder layer in backward (activation checkpointing), except the last N layers.
    gradient_checkpointing: bool = True
    uncheckpointed_layers: int = 0
    use_liger: bool = True
    fused_lora: bool = True
    # One flat fp32 buffer for all adapter weights and one for their gradients: the optimizer then updates one
    # tensor (bitsandbytes' paged optimizers synchronise the GPU after every parameter they update).
    flat_parameters: bool = True
    # Call bitsandbytes' dequantization kernels directly (checked bit-exact against bitsandbytes first).
    fast_dequant: bool = True
    # Keep the double-quantized 4-bit scales in float32 once computed: one dequantization kernel instead of
    # three (~25% faster steps on a 7B without layer graphs, measured) for ~0.4 GiB (1/16 byte per weight).
    # None: cache unless layer graphs replay the backward, where the saved launches matter far less than memory.
    cache_absmax: bool | None = None
    # RMSNorm through liger-kernel (True) or PyTorch (False); liger's other kernels follow `use_liger`.
    liger_norm: bool = True
    # Keep checkpointed layer inputs in pinned host memory (CUDA): ~1.7 GiB less at 8k-token packs on a 7B;
    # measured ~14% slower per token there without layer graphs (host-bound), so off unless memory limits.
    offload_checkpoints: bool = False
    # Recompute through the reentrant checkpoint function (fewer hooks); False uses torch's hook-based one.
    reentrant_checkpoint: bool = True
    # Add the residual inside the o_proj / down_proj node (saves a pass over the hidden states). Off: in bf16 the
    # sum residual + x·Wᵀ is rounded at the residual's scale before the adapter's term is added, so the small
    # adapter updates of early training are rounded away (a 7B's loss curve lagged peft's by up to 0.6 nats).
    fuse_residual: bool = False
    # Replay each checkpointed layer's recompute and backward as a CUDA graph (CUDA, LoRA dropout 0, flat
    # parameters, reentrant checkpointing): packs are padded to a multiple of
    # `graph_granularity` tokens and at most `graph_max_sequences` samples, and graphs for every pack size up to
    # `max_tokens` are captured after the first pack.
    cuda_graphs: bool = True
    graph_granularity: int = 256
    graph_max_sequences: int = 64


class FlatParameters:
    """Views every trainable tensor into one buffer (its gradient into another): optimizers see one tensor.

    Element-wise optimizers (AdamW, SGD) compute exactly what they compute per tensor, and so does global-norm
    clipping. Gradients stay allocated between steps (zeroed, not freed) and are accumulated into in place.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter]) -> None:
        first = params[0]
        total = sum(p.numel() for p in params)
        data = torch.empty(total, dtype=first.dtype, device=first.device)
        grad = torch.zeros(total, dtype=first.dtype, device=first.device)
        offset = 0
        self.slots: list[tuple[torch.nn.Parameter, int, int]] = []
        for param in params:
            count = param.numel()
            data[offset : offset + count].copy_(param.detach().reshape(-1))
            param.data = data[offset : offset + count].view_as(param)
            param.grad = grad[offset : offset + count].view_as(param)
            self.slots.append((param, offset, count))
            offset += count
        self.param = nn.Parameter(data)
        self.param.grad = grad
        self.grad = grad
        self.params = list(params)

    @staticmethod
    def supported(params: Sequence[torch.nn.Parameter]) -> bool:
        """All tensors share one dtype and device (the usual fp32 adapters)."""
        return bool(params) and len({(p.dtype, p.device) for p in params}) == 1

    def zero_grad(self) -> None:
        self.param.grad.zero_()

    def relink(self) -> None:
        """Re-attach tensors whose storage was replaced and gradient views that were set to None.

        Wrapping the model for data-parallel training (accelerate's DDP preparation) gives the parameters new
        storage once, after the optimizer already holds the flat tensor: their current values move back into
        the flat buffer. transformers' Trainer calls `model.zero_grad()` after each optimizer step: the
        gradient views come back, starting from zero.
        """
        data = self.param.data
        base, size = data.data_ptr(), data.element_size()
        for param, offset, count in self.slots:
            if param.data_ptr() != base + offset * size:
                data[offset : offset + count].copy_(param.detach().reshape(-1))
                param.data = data[offset : offset + count].view_as(param)
        if self.param.grad is None:
            self.param.grad = self.grad
        if any(param.grad is None for param, _, _ in self.slots):
            self.grad.zero_()
            for param, offset, count in self.slots:
                param.grad = self.grad[offset : offset + count].view_as(param)


@dataclasses.dataclass
class StepStats:
    """One optimizer step: mean loss over answer tokens, gradient norm before clipping, token counts."""

    loss: torch.Tensor
    grad_norm: torch.Tensor | None
    num_tokens: int
    num_targets: int


def output_weight(head: nn.Module) -> torch.Tensor:
    """The output layer's effective weight: a plain lm_head's, or with peft's trainable token rows swapped in."""
    adapter = getattr(head, "token_adapter", None)
    if adapter is None:
        return head.weight
    active = list(adapter.active_adapters)
    if adapter.disable_adapters or adapter.merged or not active:
        return adapter.base_layer.weight
    return adapter.get_merged_weights(active)


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the packed path cannot run this model, or None when it can."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", "")
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
        return f"activation {config.hidden_act!r} is not SiLU"
    layer_types = getattr(config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        return "sliding-window layers are not supported"
    if getattr(config, "use_sliding_window", False):
        return "sliding-window attention is not supported"
    decoder = getattr(base, "model", None)
    if decoder is None or not hasattr(decoder, "layers") or not hasattr(base, "lm_head"):
        return "the model has no decoder layers / lm_head where a causal LM keeps them"
    head = base.lm_head
    if hasattr(head, "lora_A") or hasattr(head, "modules_to_save"):
        return "the output layer (lm_head) carries a LoRA adapter or is trained in full"
    if getattr(head, "token_adapter", None) is None and not isinstance(head, nn.Linear):
        return f"the output layer is a {type(head).__name__}, not a linear layer"
    for layer in decoder.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        needed = [
            (attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
            (mlp, ("gate_proj", "up_proj", "down_proj")),
            (layer, ("input_layernorm", "post_attention_layernorm")),
        ]
        for owner, names in needed:
            if owner is None or not all(hasattr(owner, name) for name in names):
                return "a decoder layer does not have the Llama layout"
    return None


class PackedCausalLM:
    """Runs a (peft-wrapped) Llama-layout causal LM over packed batches and takes optimizer steps."""

    def __init__(self, model: nn.Module, options: FastOptions | None = None) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"packed training path unavailable: {reason}")
        self.model = model
        self.options = options or FastOptions()
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.config = base.config
        self.decoder = base.model
        self.lm_head = base.lm_head
        # The final norm is never wrapped by an adapter, unlike the embeddings and lm_head (trainable tokens).
        self.device = self.decoder.norm.weight.device
        self.dtype = self.decoder.norm.weight.dtype
        if self.dtype not in (torch.float16, torch.bfloat16):
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.kernels = _Kernels(self.options.use_liger, self.device, self.options.liger_norm)
        self.head_dim = getattr(self.config, "head_dim", None) or (
            self.config.hidden_size // self.config.num_attention_heads
        )
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.flat = None
        if self.options.flat_parameters and FlatParameters.supported(self.trainable):
            self.flat = FlatParameters(self.trainable)
        self.layer_chunks = self._layer_chunks() if self.flat is not None else {}
        self.parts_cache: dict[Any, Any] = {}
        self.offloader = _Offloader(self.device, self.options.offload_checkpoints)
        self.graphs: _LayerGraphs | None = None
        reason = self.graphs_unavailable_reason()
        if reason is None:
            self.graphs = _LayerGraphs(
                self,
                self.options.max_tokens,
                self.options.graph_granularity,
                self.options.graph_max_sequences,
            )
        elif self.options.cuda_graphs and self.device.type == "cuda":
            log.info("CUDA graphs off: %s", reason)
        cache_absmax = self.options.cache_absmax
        if cache_absmax is None:
            cache_absmax = self.graphs is None
        self.fast_dequant_layers = (
            enable_fast_dequant(model, cache_absmax) if self.options.fast_dequant else 0
        )

    def graph_pool_bytes(self) -> int:
        """Memory held by the layer graphs' pool (reserved; the allocator's peak does not count it)."""
        return self.graphs.pool_bytes if self.graphs is not None else 0

    def peak_memory_bytes(self) -> int:
        """Peak GPU memory of training, the layer graphs' pool included (CUDA only)."""
        if self.graphs is not None:
            return self.graphs.peak_bytes()
        return torch.cuda.max_memory_allocated(self.device)

    def graphs_unavailable_reason(self) -> str | None:
        """Why layer graphs cannot be used with this model and these options, or None when they can."""
        options = self.options
        if not options.cuda_graphs:
            return "turned off"
        if self.device.type != "cuda":
            return "not on a CUDA device"
        if not (options.gradient_checkpointing and options.reentrant_checkpoint):
            return "they need reentrant gradient checkpointing"
        if self.flat is None or not options.fused_lora:
            return "they need flat adapter parameters and the fused LoRA kernels"
        for module in self.model.modules():
            for dropout in getattr(module, "lora_dropout", {}).values() if hasattr(module, "lora_A") else ():
                if isinstance(dropout, nn.Dropout) and dropout.p > 0:
                    return "LoRA dropout is above 0 (a replay would repeat one dropout mask)"
        return None

    def _layer_chunks(self) -> dict[int, tuple[int, int, list[tuple[torch.Tensor, int]]]]:
        """Each decoder layer's flat-buffer slice and members, where its adapters are adjacent."""
        flat = self.flat.param
        base_ptr = flat.data_ptr()
        size = flat.element_size()
        chunks = {}
        for layer in self.decoder.layers:
            members = [(p, (p.data_ptr() - base_ptr) // size) for p in layer.parameters() if p.requires_grad]
            if not members:
                continue
            start = min(offset for _, offset in members)
            end = max(offset + p.numel() for p, offset in members)
            if end - start == sum(p.numel() for p, _ in members):
                chunks[id(layer)] = (start, end, members)
        return chunks

    def _low_precision(self, layer: nn.Module) -> dict[int, torch.Tensor] | None:
        """The layer's adapter weights cast to the compute dtype in one kernel, keyed by id(parameter)."""
        chunk = self.layer_chunks.get(id(layer))
        if chunk is None or self.dtype == self.flat.param.dtype:
            return None
        start, end, members = chunk
        low = self.flat.param.detach()[start:end].to(self.dtype)
        return {
            id(p): low[offset - start : offset - start + p.numel()].view(p.shape) for p, offset in members
        }

    def optimizer_parameters(self) -> list[torch.nn.Parameter]:
        """The tensors to give the optimizer (one flat tensor when flattening is on)."""
        return [self.flat.param] if self.flat is not None else list(self.trainable)

    # -- forward ---------------------------------------------------------------------------------------------

    def _layer(
        self, layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: PackedBatch
    ) -> torch.Tensor:
        fused = self.options.fused_lora
        low = self._low_precision(layer) if fused else None
        pc = self.parts_cache
        tokens = hidden.shape[0]
        attn = layer.self_attn
        x = self.kernels.rms_norm(layer.input_layernorm, hidden)
        q = linear(attn.q_proj, x, fused, low=low, parts_cache=pc).view(tokens, -1, self.head_dim)
        k = linear(attn.k_proj, x, fused, low=low, parts_cache=pc).view(tokens, -1, self.head_dim)
        v = linear(attn.v_proj, x, fused, low=low, parts_cache=pc).view(tokens, -1, self.head_dim)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = self.kernels.rope(q, k, cos, sin)
        scale = float(getattr(attn, "scaling", self.head_dim**-0.5))
        attended = packed_attention(q, k, v, batch, scale).reshape(tokens, -1)
        if self.options.fuse_residual:
            hidden = linear(attn.o_proj, attended, fused, residual=hidden, low=low, parts_cache=pc)
        else:
            hidden = hidden + linear(attn.o_proj, attended, fused, low=low, parts_cache=pc)
        x = self.kernels.rms_norm(layer.post_attention_layernorm, hidden)
        mlp = layer.mlp
        act = self.kernels.swiglu(
            linear(mlp.gate_proj, x, fused, low=low, parts_cache=pc),
            linear(mlp.up_proj, x, fused, low=low, parts_cache=pc),
        )
        if self.options.fuse_residual:
            return linear(mlp.down_proj, act, fused, residual=hidden, low=low, parts_cache=pc)
        return hidden + linear(mlp.down_proj, act, fused, low=low, parts_cache=pc)

    def hidden_states(self, batch: PackedBatch) -> torch.Tensor:
        """Final-norm hidden states of every packed token, (tokens, hidden)."""
        hidden = self.decoder.embed_tokens(batch.input_ids).to(self.dtype)
        cos, sin = self.decoder.rotary_emb(hidden.unsqueeze(0), batch.position_ids)
        layers = list(self.decoder.layers)[: self.config.num_hidden_layers]
        keep = self.options.uncheckpointed_layers if self.options.gradient_checkpointing else len(layers)
        recompute_below = len(layers) - max(0, keep)
        use_checkpoint = torch.is_grad_enabled() and self.model.training
        if use_checkpoint and not hidden.requires_grad:
            # The checkpoint function needs an input that requires grad for backward to reach layer 0's
            # adapters; embeddings with trainable rows already provide one (detaching would freeze those rows).
            hidden = hidden.detach().requires_grad_(True)
        stored: list[_StoredTensor] = []
        graphs = self.graphs if use_checkpoint and batch.graph_tokens else None
        if graphs is not None:
            graphs.load(batch, cos, sin)
            if graphs.captured:
                pass
            elif graphs.eager_packs == 0:
                graphs.eager_packs += 1
            else:
                self._capture_graphs(layers, recompute_below)
        for index, layer in enumerate(layers):
            if use_checkpoint and index < recompute_below and self.options.reentrant_checkpoint:
                hidden = _CheckpointedLayer.apply(hidden, self, index, layer, cos, sin, batch, stored)
            elif use_checkpoint and index < recompute_below:
                hidden = checkpoint(self._layer, layer, hidden, cos, sin, batch, use_reentrant=False)
            else:
                hidden = self._layer(layer, hidden, cos, sin, batch)
        return self.kernels.rms_norm(self.decoder.norm, hidden)

    def _capture_graphs(self, layers: list[nn.Module], count: int) -> None:
        """Capture the layer graphs, or fall back to eager steps for good if the capture fails."""
        try:
            self.graphs.capture_all(layers, count)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:  # eager steps compute the same
            log.warning("CUDA graph capture failed, training without graphs: %s", exc)
            self.graphs = None

    def loss_sum(self, batch: PackedBatch) -> torch.Tensor:
        """Summed cross-entropy over the batch's answer tokens (float32 scalar)."""
        with torch.autocast(
            device_type=self.device.type, dtype=self.dtype, enabled=self.device.type == "cuda"
        ):
            hidden = self.hidden_states(batch)
            if batch.num_targets == 0:
                return hidden.sum() * 0.0
            selected = hidden.index_select(0, batch.target_positions)
            weight = output_weight(self.lm_head).to(self.dtype)
            return self.kernels.loss_sum(selected, weight, batch.targets).float()

    # -- optimisation ----------------------------------------------------------------------------------------

    def pack(self, examples: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[PackedBatch]:
        """This step's samples as token-budget packs on the model's device."""
        lengths = [len(ids) for ids, _ in examples]
        plan = plan_micro_batches(list(range(len(examples))), lengths, self.options.max_tokens)
        packs = []
        for indices in plan:
            size = 0
            if self.graphs is not None and self.model.training and torch.is_grad_enabled():
                size = self.graphs.bucket(sum(lengths[i] for i in indices), len(indices))
            chosen = [examples[i] for i in indices]
            if size:
                batch = pack_examples(chosen, self.device, size, self.graphs.max_sequences)
                batch.graph_tokens = size
            else:
                batch = pack_examples(chosen, self.device)
            packs.append(batch)
        return packs

    def backward_examples(
        self,
        examples: Sequence[tuple[Sequence[int], Sequence[int]]],
        num_items: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Forward and backward of samples given as (input_ids, labels), for a Trainer's `training_step`.

        Gradients accumulate normalised by `num_items` (the answer tokens of the whole optimizer step, as
        transformers' Trainer counts them from `shift_labels`) or else by these samples' own count; in a
        multi-process run (torch.distributed initialised, no DDP wrapper in the way) they are summed across
        processes here. Returns the mean loss, detached.
        """
        if self.flat is not None:
            self.flat.relink()
        batches = self.pack(examples)
        local = sum(b.num_targets for b in batches)
        normalizer = num_items if num_items is not None else local
        if isinstance(normalizer, torch.Tensor):
            normalizer = normalizer.to(self.device, torch.float32).clamp_min(1)
        else:
            normalizer = max(1, normalizer)
        total = torch.zeros((), device=self.device, dtype=torch.float32)
        for batch in batches:
            loss = self.loss_sum(batch)
            (loss / normalizer).backward()
            total += loss.detach()
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            all_reduce_gradients(self.optimizer_parameters())
            dist.all_reduce(total)
        return total / normalizer

    @torch.no_grad()
    def eval_loss(self, examples: Sequence[tuple[Sequence[int], Sequence[int]]]) -> torch.Tensor:
        """Mean answer-token loss of samples without gradients (for the eval curve)."""
        was_training = self.model.training
        self.model.eval()
        try:
            batches = self.pack(examples)
            total = sum(self.loss_sum(batch) for batch in batches)
            return total / max(1, sum(b.num_targets for b in batches))
        finally:
            self.model.train(was_training)

    def train_step(
        self,
        optimizer: torch.optim.Optimizer,
        batches: Sequence[PackedBatch],
        *,
        max_grad_norm: float = 1.0,
        num_targets: int | None = None,
        grad_sync: Callable[[list[torch.nn.Parameter]], None] | None = None,
    ) -> StepStats:
        """Accumulate the packs' gradients, normalised by the step's answer-token count, then clip and step.

        `num_targets` is the whole step's count when several processes share the step (data parallel);
        `grad_sync` then sums the gradients across them before clipping. The optimizer must have been built
        over `optimizer_parameters()`.
        """
        normalizer = num_targets if num_targets is not None else sum(b.num_targets for b in batches)
        normalizer = max(1, normalizer)
        total = torch.zeros((), device=self.device, dtype=torch.float32)
        for batch in batches:
            loss = self.loss_sum(batch)
            (loss / normalizer).backward()
            total += loss.detach()
        params = self.optimizer_parameters()
        if grad_sync is not None:
            grad_sync(params)
        grad_norm = None
        if max_grad_norm and max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        if self.flat is not None:
            self.flat.zero_grad()
        else:
            optimizer.zero_grad(set_to_none=True)
        return StepStats(
            loss=total / normalizer,
            grad_norm=grad_norm,
            num_tokens=sum(b.num_tokens for b in batches),
            num_targets=sum(b.num_targets for b in batches),
        )

    @torch.no_grad()
    def eval_loss_sum(self, batch: PackedBatch) -> torch.Tensor:
        """Summed answer-token loss of one pack without gradients (for the eval curve)."""
        was_training = self.model.training
        self.model.eval()
        try:
            return self.loss_sum(batch)
        finally:
            self.model.train(was_training)


def all_reduce_gradients(params: list[torch.nn.Parameter], bucket_bytes: int = 64 << 20) -> None:
    """Sum gradients over the default process group in flat buckets (data-parallel step)."""
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    if len(grads) == 1:
        dist.all_reduce(grads[0])
        return
    bucket: list[torch.Tensor] = []
    size = 0
    for grad in [*grads, None]:
        if grad is not None:
            bucket.append(grad)
            size += grad.numel() * grad.element_size()
        if bucket and (grad is None or size >= bucket_bytes):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
            bucket, size = [], 0


def options_from_recipe(recipe: Recipe) -> FastOptions:
    """Packed-path options of a recipe: its token budget (0 = the default, or one whole longest sample) and
    its gradient checkpointing."""
    train = recipe.train
    automatic = max(DEFAULT_MAX_TOKENS, recipe.data.max_length)
    return FastOptions(
        max_tokens=train.max_tokens_per_batch if train.max_tokens_per_batch > 0 else automatic,
        gradient_checkpointing=train.gradient_checkpointing,
        offload_checkpoints=train.offload_activations,
    )
