"""The export engine: pre-flight, merge, GGUF conversion, quantization, checks and a parity report.

`python -m engine.export --run-dir DIR [--checkpoint N] [--quant q4_0,q5_1,q8_0] [--out DIR]` writes into
`<workspace>/exports/<run_id>-step<N>/`: merged/ (a 16-bit Hugging Face folder), one f16 GGUF, one GGUF per
quantization type, a Modelfile for Ollama, report.md and report.json. Every output is written under a temp
name and renamed when its stage succeeds, so an interrupted or failed export leaves only complete earlier
outputs. report.json is written last: its presence means the export finished. Events go to stdout and
<export dir>/events.jsonl, as every engine process does.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import os
import shutil
import signal
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from engine import convert, quantize
from engine.atomic import atomic_directory, atomic_write_text, is_disk_full, is_partial
from engine.errors import DiskFullError, EngineError, ExportError, OutOfMemoryError
from engine.events import (
    Event,
    EventWriter,
    Log,
    Progress,
    RunFailed,
    RunFinished,
    RunStarted,
    claim_stdout,
)
from engine.recipes import Recipe, load_recipe
from engine.workspace import (
    MARKER_FILE,
    RUN_RECIPE_FILE,
    Workspace,
    checkpoint_dirs,
    checkpoint_step,
    latest_checkpoint,
    pid_alive,
)

log = logging.getLogger(__name__)

STAGES = ("preflight", "merge", "convert", "quantize", "verify", "parity")
FAULT_ENV = "TUNEDECK_FAULT"
FREE_DISK_ENV = "TUNEDECK_FREE_DISK_BYTES"
FREE_MEMORY_ENV = "TUNEDECK_FREE_MEMORY_BYTES"

MERGED_DIR = "merged"
EVENTS_FILE = "events.jsonl"
LOG_FILE = "export.log"
PID_FILE = "pid"
STDERR_FILE = "stderr.log"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
MODELFILE = "Modelfile"
# Files that are the log of an export, not its outputs; they survive a re-export.
LOG_NAMES = frozenset({EVENTS_FILE, LOG_FILE, PID_FILE, STDERR_FILE})
# Headroom over the estimates: converters and savers need scratch space and memory beyond the raw weights.
DISK_MARGIN = 1.10
MEMORY_MARGIN = 1.30
ADAPTER_CONFIG = "adapter_config.json"
# Weights beyond this would overflow float16 (its largest finite value is 65504).
FLOAT16_LIMIT = 65000.0


# ----------------------------------------------------------------------------------------------------
# Options and the plan pre-flight produces


@dataclasses.dataclass
class ExportOptions:
    """What the user asked for."""

    run_dir: Path
    checkpoint: int | None = None
    quants: list[str] = dataclasses.field(default_factory=lambda: list(quantize.DEFAULT_QUANTS))
    out_dir: Path | None = None
    base: str | None = None
    parity: bool = True
    parity_questions: int = 30
    max_new_tokens: int = 0
    force: bool = False
    threads: int | None = None


@dataclasses.dataclass
class ExportPlan:
    """Everything pre-flight established; later stages only read it."""

    run_id: str
    run_dir: Path
    workspace: Workspace
    recipe: Recipe
    checkpoint_dir: Path
    step: int
    export_dir: Path
    method: str
    base: str
    base_dir: Path
    architecture: str
    parameters: int
    quants: list[str]
    converter: convert.Converter
    tokenizer: convert.TokenizerCheck
    merge_dtype: str
    save_dtype: str
    disk_needed: int
    disk_free: int
    memory_needed: int
    memory_free: int
    # The tokenizer files the merged folder gets (name → the file copied), as pre-flight checked them.
    tokenizer_files: dict[str, Path] = dataclasses.field(default_factory=dict)

    @property
    def is_adapter(self) -> bool:
        return (self.checkpoint_dir / ADAPTER_CONFIG).is_file()

    @property
    def unquantized_kind(self) -> str:
        """The type of the converter's GGUF, which the quantized files are made from."""
        return "f16" if self.save_dtype == "float16" else "bf16"

    @property
    def stem(self) -> str:
        return f"{self.run_id}-step{self.step}"

    def gguf_path(self, kind: str) -> Path:
        """The final path of the GGUF of type `kind` (f16, q4_0, …)."""
        return self.export_dir / f"{self.stem}-{kind}.gguf"


def default_export_dir(workspace: Workspace, run_id: str, step: int) -> Path:
    """`<workspace>/exports/<run_id>-step<N>/`."""
    return workspace.exports_dir / f"{run_id}-step{step}"


# ----------------------------------------------------------------------------------------------------
# Progress: one Progress event stream per stage, with an ETA


class StageClock:
    """Emits Progress events for the current stage (a few per second at most) and records stage durations."""

    def __init__(self, writer: EventWriter | None, *, min_interval: float = 0.25) -> None:
        self.writer = writer
        self.min_interval = min_interval
        self.durations: dict[str, float] = {}
        self.name = ""
        self.total = 1.0
        self.started = 0.0
        self.estimate: float | None = None
        self._last_emit = 0.0

    @contextlib.contextmanager
    def stage(
        self, name: str, total: float = 1.0, message: str = "", estimate_s: float | None = None
    ) -> Iterator[StageClock]:
        """Time the block as stage `name`; progress inside it goes through `update`."""
        self.name, self.total, self.estimate = name, max(total, 1e-9), estimate_s
        self.started = time.monotonic()
        log.info("stage %s: %s", name, message or "started")
        self._emit(0.0, message or "started", force=True)
        yield self
        self.durations[name] = time.monotonic() - self.started
        self._emit(self.total, "done", force=True)

    def update(self, current: float, message: str = "") -> None:
        """Report that `current` of the stage's `total` is done."""
        self._emit(min(current, self.total), message)

    def _emit(self, current: float, message: str, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_emit < self.min_interval:
            return
        self._last_emit = now
        elapsed = now - self.started
        if current >= self.total:
            eta: float | None = 0.0
        elif current > 0:
            eta = elapsed / current * (self.total - current)
        else:
            eta = max(0.0, self.estimate - elapsed) if self.estimate is not None else None
        if self.writer is not None:
            self.writer.emit(
                Progress(stage=self.name, current=current, total=self.total, eta_s=eta, message=message)
            )


def inject_fault(stage: str) -> None:
    """Fail on purpose at `stage` if $TUNEDECK_FAULT is `export:<stage>` (tests: nothing half-done stays)."""
    wanted = os.environ.get(FAULT_ENV, "")
    if not wanted.startswith("export:"):
        return
    target = wanted.removeprefix("export:")
    if target == stage or (":" in stage and target == stage.split(":", 1)[0]):
        raise ExportError(
            f"A failure was injected at the {stage} stage ({FAULT_ENV}={wanted}).",
            next_step=f"Unset {FAULT_ENV}.",
        )


# ----------------------------------------------------------------------------------------------------
# Pre-flight helpers


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def free_disk_bytes(folder: Path) -> int:
    """Free bytes on the disk of `folder` (or its nearest parent); $TUNEDECK_FREE_DISK_BYTES overrides."""
    override = os.environ.get(FREE_DISK_ENV, "").strip()
    if override:
        return int(float(override))
    probe = Path(folder)
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def free_memory_bytes() -> int:
    """Memory available to a new allocation (MemAvailable); `$TUNEDECK_FREE_MEMORY_BYTES` overrides."""
    override = os.environ.get(FREE_MEMORY_ENV, "").strip()
    if override:
        return int(float(override))
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return 0


def _safetensors_headers(folder: Path) -> Iterator[dict[str, Any]]:
    for path in sorted(Path(folder).glob("*.safetensors")):
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100_000_000:
                continue
            yield json.loads(handle.read(length))


def count_parameters(folder: Path) -> int:
    """Number of weights in a folder's safetensors files, read from their headers (nothing is loaded)."""
    total = 0
    for header in _safetensors_headers(folder):
        for name, entry in header.items():
            if name == "__metadata__" or not isinstance(entry, dict):
                continue
            count = 1
            for dim in entry.get("shape", []):
                count *= int(dim)
            total += count
    return total


_BNB_MARKERS = (".absmax", ".quant_map", ".quant_state.", ".nested_absmax", ".SCB")


def four_bit_only_reason(folder: Path) -> str:
    """Why `folder` holds no 16-bit weights to merge into ('' when it does): GGUF-only, or pre-quantized."""
    folder = Path(folder)
    if folder.is_file() and folder.suffix == ".gguf":
        return "gguf"
    weights = list(folder.glob("*.safetensors")) + list(folder.glob("*.bin"))
    if not weights and list(folder.glob("*.gguf")):
        return "gguf"
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        quant = config.get("quantization_config") or {}
        method = str(quant.get("quant_method", "")).lower()
        if method == "bitsandbytes":
            return "bitsandbytes 8-bit" if quant.get("load_in_8bit") else "bitsandbytes 4-bit"
        if method in ("gptq", "awq", "aqlm", "hqq", "eetq", "quanto", "bitnet"):
            return method.upper()
    for header in _safetensors_headers(folder):
        if any(name.endswith(_BNB_MARKERS) or _BNB_MARKERS[2] in name for name in header):
            return "bitsandbytes 4-bit"
        break
    return ""


def _local_base_dir(resolved: str) -> Path:
    """A local folder for a resolved base: itself, or the hub cache's snapshot of a hub id."""
    if Path(resolved).is_absolute():
        return Path(resolved)
    from engine.modeling import check_hub_model

    check_hub_model(resolved)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(resolved, local_files_only=True))
    except Exception as exc:
        raise ExportError(
            f"The base model {resolved} is not in the local Hugging Face cache ({type(exc).__name__}).",
            next_step=f"Download it (`hf download {resolved}`) or pass --base with a local folder.",
        ) from None


def _workspace_of(run_dir: Path) -> Workspace:
    root = run_dir.parent.parent
    if (root / MARKER_FILE).is_file():
        return Workspace(root)
    return Workspace.open(None, create=False)


def _pick_checkpoint(run_dir: Path, step: int | None) -> Path:
    found = checkpoint_dirs(run_dir)
    if not found:
        raise ExportError(
            f"The run {run_dir.name} has no complete checkpoint to export.",
            next_step="Wait for its first checkpoint (train.save_steps), or train it longer.",
        )
    if step is None:
        return latest_checkpoint(run_dir) or found[-1]
    for path in found:
        if checkpoint_step(path) == step:
            return path
    steps = ", ".join(str(checkpoint_step(p)) for p in found[-8:])
    raise ExportError(
        f"The run {run_dir.name} has no checkpoint at step {step}.",
        next_step=f"Pick one of its checkpoints: {steps}.",
    )


def locate(options: ExportOptions) -> tuple[Path, Workspace, Recipe, Path, int, Path]:
    """Cheap first checks: the run, its recipe, the checkpoint and the export folder (no heavy imports)."""
    run_dir = Path(options.run_dir).expanduser().resolve()
    if not (run_dir / RUN_RECIPE_FILE).is_file():
        raise ExportError(
            f"{run_dir} is not a tunedeck run folder (it has no {RUN_RECIPE_FILE}).",
            next_step="Pass a folder under <workspace>/runs/, e.g. `tunedeck export RUN_ID`.",
        )
    workspace = _workspace_of(run_dir)
    recipe = load_recipe(run_dir / RUN_RECIPE_FILE)
    checkpoint = _pick_checkpoint(run_dir, options.checkpoint)
    step = checkpoint_step(checkpoint)
    export_dir = (
        Path(options.out_dir).expanduser().resolve()
        if options.out_dir
        else default_export_dir(workspace, run_dir.name, step)
    )
    return run_dir, workspace, recipe, checkpoint, step, export_dir


def preflight(
    options: ExportOptions,
    *,
    free_disk: Callable[[Path], int] = free_disk_bytes,
    free_memory: Callable[[], int] = free_memory_bytes,
    clock: StageClock | None = None,
) -> ExportPlan:
    """Every check that can fail before heavy work: each failure is one sentence with the fix."""
    run_dir, workspace, recipe, checkpoint, step, export_dir = locate(options)
    quants = quantize.parse_quant_types(options.quants)
    step_of = clock.update if clock else (lambda *_: None)
    step_of(1, "checking the base model")
    method = "full" if not (checkpoint / ADAPTER_CONFIG).is_file() else recipe.train.method
    from engine.modeling import resolve_base_model

    base = options.base or recipe.model.base
    if method == "full":
        base_dir = checkpoint
        resolved = str(checkpoint)
    else:
        resolved = resolve_base_model(base, workspace)
        base_dir = _local_base_dir(resolved)
    reason = four_bit_only_reason(base_dir)
    if reason == "gguf":
        raise ExportError(
            f"The base model {base} is only a GGUF file, so there are no 16-bit weights to merge the adapter "
            "into.",
            next_step="Pass --base (or set model.base) to the model's Hugging Face folder with safetensors "
            "weights and export again.",
        )
    if reason:
        raise ExportError(
            f"The base model {base} holds only {reason} weights, and merging into quantized weights gives "
            "tensors llama.cpp cannot convert.",
            next_step="Pass --base with the original 16-bit model it was quantized from (the adapter still "
            "applies) and export again.",
        )
    if not (base_dir / "config.json").is_file():
        raise ExportError(
            f"The base model folder {base_dir} has no config.json.",
            next_step="Pass --base with a complete Hugging Face model folder.",
        )
    step_of(2, "checking the converter")
    converter = convert.find_converter()
    architecture = convert.model_architecture(base_dir)
    supported = convert.supported_architectures(converter)
    if architecture not in supported:
        raise ExportError(
            f"llama.cpp's converter ({converter.source}, {converter.root}) cannot convert "
            f"{architecture or 'a model without an architecture in config.json'}.",
            next_step=f"Point {convert.CONVERTER_DIR_ENV} at a newer llama.cpp checkout that supports it, or "
            "fine-tune a supported family (Llama, Mistral, Qwen2/3, Gemma, Phi-3, GPT-2, StableLM…).",
        )
    step_of(3, "checking the tokenizer")
    bases = [base_dir]
    recipe_base = _recipe_base_dir(recipe, workspace) if method == "full" else None
    if recipe_base is not None:
        # A full run's checkpoint is its own base; the model it started from still holds the files
        # transformers does not save (tokenizer.model).
        bases.append(recipe_base)
    tokenizer_files = plan_tokenizer_files(checkpoint, bases)
    tokenizer = check_tokenizer_files(tokenizer_files, converter, checkpoint)
    step_of(4, "checking disk and memory")
    parameters = count_parameters(base_dir)
    if parameters <= 0:
        raise ExportError(
            f"No safetensors weights were found in {base_dir}.",
            next_step="Pass --base with a folder that holds *.safetensors weights.",
        )
    sizes = {"merged model": parameters * 2, "f16 GGUF": quantize.estimated_size(parameters, "f16")}
    for quant in quants:
        sizes[f"{quant} GGUF"] = quantize.estimated_size(parameters, quant)
    disk_needed = int(sum(sizes.values()) * DISK_MARGIN)
    disk_free = int(free_disk(export_dir))
    if disk_free < disk_needed:
        parts = ", ".join(f"{name} {_human(size)}" for name, size in sizes.items())
        raise DiskFullError(
            f"The export needs about {_human(disk_needed)} free on the disk holding {export_dir} ({parts}), "
            f"but only {_human(disk_free)} is free.",
            next_step="Free some space, pass --out with a folder on a bigger disk, or ask for fewer --quant "
            "types.",
        )
    memory_free = int(free_memory())
    full_precision = int(parameters * 4 * MEMORY_MARGIN)
    half_precision = int(parameters * 2 * MEMORY_MARGIN)
    if memory_free >= full_precision:
        merge_dtype, memory_needed = "float32", full_precision
    elif memory_free >= half_precision:
        merge_dtype, memory_needed = "bfloat16", half_precision
    else:
        raise OutOfMemoryError(
            f"Merging the adapter needs about {_human(half_precision)} of memory for this "
            f"{parameters / 1e9:.2f}B-parameter model, but only {_human(memory_free)} is available.",
            next_step="Stop other processes (a running chat or training), or export on a machine with more "
            "memory.",
        )
    save_dtype = _save_dtype(base_dir)
    return ExportPlan(
        run_id=run_dir.name,
        run_dir=run_dir,
        workspace=workspace,
        recipe=recipe,
        checkpoint_dir=checkpoint,
        step=step,
        export_dir=export_dir,
        method=method,
        base=resolved,
        base_dir=base_dir,
        architecture=architecture,
        parameters=parameters,
        quants=quants,
        converter=converter,
        tokenizer=tokenizer,
        merge_dtype=merge_dtype,
        save_dtype=save_dtype,
        disk_needed=disk_needed,
        disk_free=disk_free,
        memory_needed=memory_needed,
        memory_free=memory_free,
        tokenizer_files=tokenizer_files,
    )


def _save_dtype(folder: Path) -> str:
    """The dtype the merged model is saved in: float16 whatever the base was published in (see below)."""
    # The f16 GGUF holds float16 anyway, and rounding the merged weights through bfloat16 first costs the
    # adapter's small updates precision (on the demo: 8x the logit error of float16). merge_stage falls back
    # to bfloat16 only for weights beyond float16's range.
    del folder
    return "float16"


# ----------------------------------------------------------------------------------------------------
# Merge


def _recipe_base_dir(recipe: Recipe, workspace: Workspace) -> Path | None:
    """The local folder of the recipe's base model, or None where it cannot be found without a download."""
    from engine.modeling import resolve_base_model

    try:
        folder = _local_base_dir(resolve_base_model(recipe.model.base, workspace))
    except EngineError:
        return None
    return folder if folder.is_dir() else None


def plan_tokenizer_files(checkpoint_dir: Path, base_dirs: list[Path]) -> dict[str, Path]:
    """The tokenizer files the merged folder gets (name → the file copied): the checkpoint's tokenizer, which
    carries training's chat template and added tokens, completed with the base's files."""
    files: dict[str, Path] = {}
    for source in (checkpoint_dir, *base_dirs):
        for name in convert.TOKENIZER_FILES:
            if (source / name).is_file() and name not in files:
                files[name] = source / name
        if (source / "tokenizer_config.json").is_file():
            # The first folder with a tokenizer config defines the tokenizer; the bases only fill gaps below.
            break
    for name in ("tokenizer.model", "added_tokens.json"):
        # transformers 5 writes no tokenizer.model on save, so a checkpoint of a SentencePiece model (Llama 2,
        # Mistral v0.1) lacks the file the converter reads its vocabulary from; the base has it.
        found = [folder / name for folder in base_dirs if (folder / name).is_file()]
        if found and name not in files:
            files[name] = found[0]
    model, spec = files.get("tokenizer.model"), files.get("tokenizer.json")
    if model is not None and spec is not None and not convert.sentencepiece_matches(model, spec):
        # A SentencePiece model with other pieces than the checkpoint's tokenizer would give the GGUF another
        # vocabulary than training used; tokenizer.json alone is then what the converter must read.
        del files["tokenizer.model"]
    return files


def check_tokenizer_files(
    files: dict[str, Path], converter: convert.Converter, checkpoint_dir: Path
) -> convert.TokenizerCheck:
    """Judge the tokenizer the merged folder will hold, from a scratch folder holding exactly those files."""
    # Refusals name the folder the tokenizer's definition comes from, not the scratch copy.
    where = str(files["tokenizer.json"].parent if "tokenizer.json" in files else checkpoint_dir)
    with tempfile.TemporaryDirectory(prefix="tunedeck-tokenizer-") as scratch:
        for name, source in files.items():
            shutil.copy2(source, Path(scratch) / name)
        return convert.check_tokenizer(Path(scratch), converter, where=where)


def _copy_tokenizer_files(plan: ExportPlan, target: Path) -> None:
    """Copy the tokenizer files pre-flight planned into the merged folder, where a save did not write one."""
    files = plan.tokenizer_files or plan_tokenizer_files(plan.checkpoint_dir, [plan.base_dir])
    for name, source in files.items():
        if not (target / name).exists():
            shutil.copy2(source, target / name)


def _largest_weight(model: Any) -> float:
    largest = 0.0
    for parameter in model.parameters():
        if parameter.is_floating_point() and parameter.numel():
            largest = max(largest, float(parameter.detach().abs().max()))
    return largest


def _quantized_modules(model: Any) -> list[str]:
    names = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if "4bit" in kind or "8bit" in kind or kind.startswith(("QuantLinear", "WQLinear")):
            names.append(name)
    return names


def merge_stage(plan: ExportPlan, clock: StageClock) -> tuple[Path, dict[str, Any]]:
    """Merge the adapter into a 16-bit (never 4-bit) copy of the base; save it with tokenizer and template."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from engine.modeling import load_for_inference

    # Progress bars from loading and saving would scribble over the log (events carry the progress).
    hf_logging.disable_progress_bar()

    final = plan.export_dir / MERGED_DIR
    dtype = getattr(torch, plan.merge_dtype)
    save_dtype = getattr(torch, plan.save_dtype)
    fixes: dict[str, Any] = {}
    with atomic_directory(final, replace=True) as temp:
        clock.update(0.05, f"loading the base model in {plan.merge_dtype}")
        if plan.is_adapter:
            # load_for_inference quantizes only when asked: a QLoRA run's base is reloaded in 16/32 bits.
            model, tokenizer = load_for_inference(
                plan.base, plan.checkpoint_dir, device="cpu", dtype=plan.merge_dtype, workspace=plan.workspace
            )
            clock.update(0.45, "merging the adapter into the weights")
            untied = _untie_adapted_embeddings(model)
            model = model.merge_and_unload(safe_merge=True)
            if untied:
                fixes["untied"] = (
                    "the output layer was untied from the input embeddings (the adapter changed one)"
                )
        else:
            from transformers import AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(
                str(plan.checkpoint_dir), dtype=dtype, use_safetensors=True
            )
            tokenizer = AutoTokenizer.from_pretrained(str(plan.checkpoint_dir))
        leftovers = _quantized_modules(model)
        if leftovers:
            raise ExportError(
                f"The merged model still has quantized layers ({leftovers[0]}…), which llama.cpp cannot "
                "convert.",
                next_step="Export from a 16-bit base model (pass --base with the unquantized folder).",
            )
        lora_keys = [key for key in model.state_dict() if "lora_" in key]
        if lora_keys:
            raise ExportError(
                f"The adapter was not fully merged ({lora_keys[0]} remains).",
                next_step="Check that the checkpoint's adapter matches the base model.",
            )
        if plan.save_dtype == "float16" and _largest_weight(model) > FLOAT16_LIMIT:
            plan.save_dtype, save_dtype = "bfloat16", torch.bfloat16
            fixes["range"] = "weights exceed float16's range, so the model is saved and converted in bfloat16"
        clock.update(0.6, f"saving the merged model in {plan.save_dtype}")
        model = model.to(save_dtype)
        model.config.use_cache = True
        model.save_pretrained(str(temp), safe_serialization=True)
        del model
        gc.collect()
        clock.update(0.9, "writing the tokenizer and chat template")
        if (plan.checkpoint_dir / "tokenizer_config.json").is_file():
            _copy_tokenizer_files(plan, temp)
        else:
            tokenizer.save_pretrained(str(temp))
            _copy_tokenizer_files(plan, temp)
        inputs = prepare_converter_inputs(
            temp,
            tokenizer_template=getattr(tokenizer, "chat_template", "") or "",
            recipe_template=plan.recipe.model.chat_template,
            base_dir=plan.base_dir,
        )
        inputs["changes"] += [fixes[key] for key in ("untied", "range") if key in fixes]
        inject_fault("merge")
    return final, inputs


def _untie_adapted_embeddings(model: Any) -> bool:
    """Give the output layer its own copy of a tied embedding matrix when the adapter changes either side."""
    # Merging into a shared matrix would apply the output layer's update to the input embeddings as well (or
    # the reverse), and the merged model would no longer answer like the adapter did.
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inputs, outputs = base.get_input_embeddings(), base.get_output_embeddings()
    if inputs is None or outputs is None:
        return False
    input_layer = getattr(inputs, "base_layer", inputs)
    output_layer = getattr(outputs, "base_layer", outputs)
    shared = output_layer.weight.data_ptr() == input_layer.weight.data_ptr()
    adapted = hasattr(inputs, "base_layer") or hasattr(outputs, "base_layer")
    if not (shared and adapted):
        return False
    output_layer.weight = torch.nn.Parameter(output_layer.weight.detach().clone(), requires_grad=False)
    for config in (base.config, getattr(base.config, "text_config", None)):
        if config is not None and hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = False
    return True


def prepare_converter_inputs(
    folder: Path, *, tokenizer_template: str = "", recipe_template: str = "", base_dir: Path | None = None
) -> dict[str, Any]:
    """Make the merged folder say what the GGUF must carry (one chat template; as EOS the token that closes an
    assistant turn; BOS added by the tokenizer only where the template omits it) and return what it found."""
    from engine.template import DEFAULT_CHAT_TEMPLATE, read_chat_template

    folder = Path(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    template = read_chat_template(folder) or tokenizer_template or recipe_template or DEFAULT_CHAT_TEMPLATE
    changes: list[str] = []
    if read_chat_template(folder) != template:
        changes.append("added the chat template training used")
    base_class = _tokenizer_class(base_dir) if base_dir is not None else ""
    generic = GENERIC_TOKENIZER_CLASSES
    if config.get("tokenizer_class", "") in generic and base_class not in generic:
        # Some converters dispatch on the class name (Phi-3 reads a GPT2Tokenizer's vocabulary, else wants
        # tokenizer.model); a checkpoint saved by transformers 5 names only its generic backend.
        changes.append(f"tokenizer_class restored to the base model's {base_class}")
        config["tokenizer_class"] = base_class
    declared = _declare_added_tokens(folder, config)
    if declared:
        changes.append(
            f"declared {', '.join(declared)} (added after the SentencePiece model) in added_tokens_decoder"
        )
    special = _special_tokens(folder, config)
    added = _added_special_tokens(folder)
    end_token = convert.turn_end_token(template, special, [*added, special.get("eos_token", "")])
    eos = special.get("eos_token", "")
    vocab = _token_ids(folder)
    if end_token and end_token != eos and end_token in vocab:
        changes.append(
            f"EOS set to {end_token} (was {eos or 'unset'}), the token that ends an assistant turn"
        )
        config["eos_token"] = end_token
        _set_config_ids(folder, "config.json", "eos_token_id", vocab[end_token], keep_old=False)
        _set_config_ids(folder, "generation_config.json", "eos_token_id", vocab[end_token], keep_old=True)
        eos = end_token
    bos = special.get("bos_token", "")
    writes_bos = bool(bos) and _template_writes_bos(template, special)
    if config.get("add_bos_token") is not None and bool(config.get("add_bos_token")) != writes_bos:
        changes.append(
            f"add_bos_token set to {writes_bos} (the template {'writes' if writes_bos else 'omits'} BOS)"
        )
    config["add_bos_token"] = writes_bos
    config["add_eos_token"] = False
    config["chat_template"] = template
    atomic_write_text(config_path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(folder / "chat_template.jinja", template)
    with contextlib.suppress(FileNotFoundError):
        (folder / "chat_template.json").unlink()
    return {
        "chat_template": template,
        "eos_token": eos,
        "eos_token_id": vocab.get(eos),
        "bos_token": bos,
        "bos_token_id": vocab.get(bos) if bos else None,
        "template_writes_bos": writes_bos,
        "turn_end_token": end_token,
        "changes": changes,
    }


GENERIC_TOKENIZER_CLASSES = frozenset({"", "TokenizersBackend", "PreTrainedTokenizerFast"})


def _declare_added_tokens(folder: Path, config: dict[str, Any]) -> list[str]:
    """Enter into `config`'s added_tokens_decoder the tokens tokenizer.json adds beyond tokenizer.model, and
    return their texts."""
    # With a tokenizer.model the converter reads the vocabulary from it plus added_tokens.json and this table,
    # never from tokenizer.json, and transformers 5 writes neither: tokens training added (the chat markers)
    # would become [PAD…] placeholders in the GGUF.
    model, spec_path = folder / "tokenizer.model", folder / "tokenizer.json"
    if not (model.is_file() and spec_path.is_file()):
        return []
    size = len(convert.sentencepiece_pieces(model))
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    table = dict(config.get("added_tokens_decoder") or {})
    declared = []
    for token in spec.get("added_tokens") or []:
        index = int(token["id"])
        if index < size or str(index) in table:
            continue
        table[str(index)] = {
            key: token.get(key, False) for key in ("lstrip", "normalized", "rstrip", "single_word", "special")
        } | {"content": str(token["content"])}
        declared.append(str(token["content"]))
    if declared:
        config["added_tokens_decoder"] = table
    return declared


def _tokenizer_class(folder: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((Path(folder) / "tokenizer_config.json").read_text(encoding="utf-8"))
        return str(config.get("tokenizer_class") or "")
    return ""


def _special_text(value: Any) -> str:
    return str(value.get("content", "")) if isinstance(value, dict) else str(value or "")


def _special_tokens(folder: Path, config: dict[str, Any]) -> dict[str, str]:
    special = {
        key: _special_text(config.get(key)) for key in ("bos_token", "eos_token", "unk_token", "pad_token")
    }
    with contextlib.suppress(OSError, ValueError):
        mapping = json.loads((folder / "special_tokens_map.json").read_text(encoding="utf-8"))
        for key, value in mapping.items():
            if not special.get(key):
                special[key] = _special_text(value)
    return {key: value for key, value in special.items() if value}


def _added_special_tokens(folder: Path) -> list[str]:
    with contextlib.suppress(OSError, ValueError):
        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        return [str(t["content"]) for t in spec.get("added_tokens", []) if t.get("special")]
    return []


def _token_ids(folder: Path) -> dict[str, int]:
    ids: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError):
        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        vocab = (spec.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):
            ids.update({str(k): int(v) for k, v in vocab.items()})
        elif isinstance(vocab, list):
            ids.update({str(entry[0]): i for i, entry in enumerate(vocab) if isinstance(entry, list)})
        ids.update({str(t["content"]): int(t["id"]) for t in spec.get("added_tokens", [])})
    with contextlib.suppress(OSError, ValueError):
        ids.update(json.loads((folder / "added_tokens.json").read_text(encoding="utf-8")))
    return ids


def _set_config_ids(folder: Path, name: str, key: str, token_id: int, *, keep_old: bool) -> None:
    path = folder / name
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    old = data.get(key)
    olds = old if isinstance(old, list) else [old] if old is not None else []
    data[key] = [token_id, *[i for i in olds if i != token_id]] if keep_old and olds else token_id
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _template_writes_bos(template: str, special: dict[str, str]) -> bool:
    from engine.template import render_prompt

    sentinel = "tunedeckbossentinel"
    extra = {k: v for k, v in special.items() if k not in ("bos_token", "eos_token")}
    try:
        text = render_prompt(
            template,
            [{"role": "user", "content": "hi"}],
            bos_token=sentinel,
            eos_token=special.get("eos_token", ""),
            add_generation_prompt=True,
            **extra,
        )
    except EngineError:
        return False
    return text.startswith(sentinel)


# ----------------------------------------------------------------------------------------------------
# Convert, quantize, verify


def convert_stage(plan: ExportPlan, merged: Path, clock: StageClock) -> Path:
    """The f16 GGUF, written by llama.cpp's own converter."""
    expected = sum(1 for header in _safetensors_headers(merged) for name in header if name != "__metadata__")
    target = plan.gguf_path(plan.unquantized_kind)
    return convert.convert_to_gguf(
        merged,
        target,
        converter=plan.converter,
        outtype=plan.unquantized_kind,
        tokenizer=plan.tokenizer,
        log_path=plan.export_dir / LOG_FILE,
        on_progress=lambda fraction, message: clock.update(fraction, message),
        expected_tensors=expected,
        before_commit=lambda: inject_fault("convert"),
    )


def quantize_stage(
    plan: ExportPlan, source: Path, quant: str, clock: StageClock, threads: int | None
) -> Path:
    """One quantized GGUF made from the f16 one."""
    return quantize.quantize_gguf(
        source,
        plan.gguf_path(quant),
        quant,
        threads=threads,
        on_progress=lambda done, total: clock.update(done / max(total, 1), f"tensor {done}/{total}"),
        before_commit=lambda: inject_fault(f"quantize:{quant}"),
    )


def verify_stage(
    plan: ExportPlan, files: dict[str, Path], inputs: dict[str, Any], clock: StageClock
) -> dict[str, Any]:
    """Check each GGUF's type, chat template and BOS/EOS as file and llama.cpp see them; write Modelfile."""
    checks: dict[str, Any] = {}
    warnings: list[str] = []
    notes: list[str] = []
    for index, (kind, path) in enumerate(files.items()):
        clock.update(index, f"checking {path.name}")
        info = convert.read_gguf(path)
        loaded = quantize.llama_file_report(path)
        problems = []
        if loaded["ftype_name"] != kind:
            problems.append(f"llama.cpp reports type {loaded['ftype_name']}, not {kind}")
        if info.chat_template != inputs["chat_template"]:
            problems.append("the chat template is missing or differs from training's")
        if inputs.get("eos_token_id") is not None and (
            info.eos_token_id != inputs["eos_token_id"] or info.eos_token != inputs["eos_token"]
        ):
            problems.append(
                f"EOS is token {info.eos_token_id} ({info.eos_token!r}), not {inputs['eos_token']!r}"
            )
        if inputs.get("bos_token_id") is not None and info.bos_token_id not in (None, inputs["bos_token_id"]):
            problems.append(f"BOS is token {info.bos_token_id}, not {inputs['bos_token']!r}")
        if problems:
            raise ExportError(
                f"{path.name} is not right: {'; '.join(problems)}.",
                next_step=f"See {plan.export_dir / LOG_FILE} for the converter's log.",
            )
        file_warnings, file_notes = quantize.explain_tensor_types(info.weights, kind)
        warnings += [f"{path.name}: {warning}" for warning in file_warnings]
        notes += [f"{path.name}: {note}" for note in file_notes]
        checks[kind] = {
            "file": path.name,
            "size_bytes": info.size_bytes,
            "file_type": info.file_type_name,
            "llama_cpp_type": loaded["ftype_name"],
            "llama_cpp_desc": loaded["desc"],
            "tensor_types": info.tensor_types,
            "chat_template_ok": True,
            "eos_token": info.eos_token,
            "eos_token_id": info.eos_token_id,
            "bos_token": info.bos_token,
            "bos_token_id": info.bos_token_id,
            "add_bos": loaded["add_bos"],
        }
    quantized = [path for kind, path in files.items() if kind not in ("f16", "bf16")]
    modelfile_source = files.get("q4_0") or (quantized[0] if quantized else next(iter(files.values())))
    modelfile, translated = build_modelfile(modelfile_source.name, inputs)
    if not translated:
        warnings.append(
            "the chat template is not a simple per-message format; the Modelfile leaves the prompt "
            "format to the GGUF's own chat template"
        )
    inject_fault("verify")
    atomic_write_text(plan.export_dir / MODELFILE, modelfile)
    return {"files": checks, "warnings": warnings, "notes": notes, "modelfile_template": translated}


def build_modelfile(gguf_name: str, inputs: dict[str, Any]) -> tuple[str, bool]:
    """An Ollama Modelfile for `gguf_name`: FROM, TEMPLATE (from the chat template), SYSTEM and stops."""
    template = inputs["chat_template"]
    special = {"bos_token": inputs.get("bos_token") or "", "eos_token": inputs.get("eos_token") or ""}
    found = convert.chat_format(template, special)
    lines = [
        "# Ollama Modelfile written by tunedeck export; `ollama create NAME -f Modelfile` in this folder.",
        f"FROM ./{gguf_name}",
    ]
    translated = found is not None and '"""' not in found.go_template()
    if translated:
        assert found is not None
        lines.append(f'TEMPLATE """{found.go_template()}"""')
        if found.default_system:
            lines.append(f'SYSTEM """{found.default_system}"""')
    stops = [inputs.get("turn_end_token") or "", inputs.get("eos_token") or ""]
    if found is not None:
        stops += [_leading_special(found.user_prefix), _leading_special(found.generation_prompt)]
    for stop in dict.fromkeys(s for s in stops if s):
        lines.append(f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}")
    return "\n".join(lines) + "\n", translated


def _leading_special(text: str) -> str:
    """The `<|…|>`/`<…>` marker a role prefix opens with, if any."""
    if text.startswith("<") and ">" in text:
        return text[: text.index(">") + 1]
    return ""


# ----------------------------------------------------------------------------------------------------
# The whole export


def _clear_previous_outputs(export_dir: Path) -> None:
    """Remove what an earlier attempt left (finished or not): no old file may pass for part of this export."""
    if not export_dir.is_dir():
        return
    for entry in export_dir.iterdir():
        if entry.name in LOG_NAMES:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()


def check_export_dir(export_dir: Path, *, force: bool) -> None:
    """Refuse a folder another live export writes to, or a finished export without `force`."""
    with contextlib.suppress(OSError, ValueError):
        pid = int((export_dir / PID_FILE).read_text().strip() or 0)
        if pid != os.getpid() and pid_alive(pid):
            raise ExportError(
                f"Another export into {export_dir} is running (pid {pid}).",
                next_step="Wait for it to finish, or pass --out with another folder.",
            )
    if (export_dir / REPORT_JSON).is_file() and not force:
        raise ExportError(
            f"This checkpoint was already exported to {export_dir}.",
            next_step="Pass --force to export it again (the old files are replaced), or --out with another "
            "folder.",
        )


def _claim_export_dir(export_dir: Path, *, force: bool) -> None:
    check_export_dir(export_dir, force=force)
    export_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(export_dir / PID_FILE, f"{os.getpid()}\n")


def run_export(
    options: ExportOptions,
    writer: EventWriter | None = None,
    *,
    free_disk: Callable[[Path], int] = free_disk_bytes,
    free_memory: Callable[[], int] = free_memory_bytes,
) -> dict[str, Any]:
    """Run every stage and return the outputs (files and report); an expected failure raises EngineError."""
    started = time.monotonic()
    clock = StageClock(writer)
    with clock.stage(
        "preflight", total=4, message="checking the run, model, converter, disk and memory", estimate_s=8
    ):
        plan = preflight(options, free_disk=free_disk, free_memory=free_memory, clock=clock)
        _claim_export_dir(plan.export_dir, force=options.force)
    try:
        return _export_stages(plan, options, writer, clock, started)
    except Exception as exc:
        if isinstance(exc, DiskFullError) or is_disk_full(exc, plan.export_dir):
            raise export_disk_full_error(plan, clock.name) from exc
        raise
    finally:
        with contextlib.suppress(OSError):
            (plan.export_dir / PID_FILE).unlink()


def export_disk_full_error(plan: ExportPlan, stage: str) -> DiskFullError:
    """The one-sentence failure of an export whose disk filled up in `stage`, with the room it needs."""
    return DiskFullError(
        f"The disk holding {plan.export_dir} filled up during the {stage} stage; the export needs about "
        f"{_human(plan.disk_needed)} free and no half-written file was kept.",
        next_step="Free some disk space, or pass --out with a folder on a bigger disk (or ask for fewer --quant "
        "types), and export again.",
    )


def _export_stages(
    plan: ExportPlan, options: ExportOptions, writer: EventWriter | None, clock: StageClock, started: float
) -> dict[str, Any]:
    """Every stage after pre-flight, in order; each stage's outputs appear only once the stage succeeded."""
    # The pre-flight fault strikes before anything an earlier attempt left is touched.
    inject_fault("preflight")
    _clear_previous_outputs(plan.export_dir)
    _emit_log(
        writer,
        f"exporting {plan.run_id} step {plan.step} ({plan.architecture}, "
        f"{plan.parameters / 1e6:.1f}M parameters, {plan.method}) to {plan.export_dir}",
    )
    seconds_per_gparam = 60.0
    with clock.stage(
        "merge",
        total=1.0,
        message=f"merging into a {plan.save_dtype} copy of the base",
        estimate_s=5 + plan.parameters / 1e9 * seconds_per_gparam,
    ):
        merged, inputs = merge_stage(plan, clock)
    for change in inputs["changes"]:
        _emit_log(writer, f"converter inputs: {change}")
    with clock.stage(
        "convert",
        total=1.0,
        message=f"llama.cpp convert_hf_to_gguf.py → {plan.unquantized_kind} GGUF",
        estimate_s=6 + plan.parameters / 1e9 * 40,
    ):
        files = {plan.unquantized_kind: convert_stage(plan, merged, clock)}
    for quant in plan.quants:
        with clock.stage(
            f"quantize:{quant}",
            total=1.0,
            message=f"{plan.unquantized_kind} → {quant}",
            estimate_s=1 + plan.parameters / 1e9 * 10,
        ):
            files[quant] = quantize_stage(plan, files[plan.unquantized_kind], quant, clock, options.threads)
    with clock.stage("verify", total=len(files), message="checking file types, chat template, BOS/EOS"):
        verification = verify_stage(plan, files, inputs, clock)
    for note in verification["notes"]:
        _emit_log(writer, note)
    for warning in verification["warnings"]:
        _emit_log(writer, warning, level="warning")
    parity_report: dict[str, Any] = {}
    if options.parity:
        from engine import parity

        questions = parity.select_questions(
            plan.run_dir, plan.recipe, plan.workspace, per_split=options.parity_questions
        )
        # The unquantized GGUF shows what conversion alone changed; each quantized one adds its rounding.
        total = len(questions) * (1 + len(files))
        with clock.stage(
            "parity",
            total=max(total, 1),
            message=f"{len(questions)} questions, adapter vs GGUF",
            estimate_s=total * 1.0,
        ):
            parity_report = parity.run_parity(
                plan,
                files,
                questions,
                clock,
                max_new_tokens=options.max_new_tokens or None,
                threads=options.threads,
            )
    clock.durations["total"] = time.monotonic() - started
    report = build_report(plan, files, inputs, verification, parity_report, clock.durations)
    inject_fault("parity")
    from engine.parity import report_markdown

    atomic_write_text(plan.export_dir / REPORT_MD, report_markdown(report))
    atomic_write_text(plan.export_dir / REPORT_JSON, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return {
        "export_dir": str(plan.export_dir),
        "files": {kind: str(path) for kind, path in files.items()},
        "merged": str(merged),
        "modelfile": str(plan.export_dir / MODELFILE),
        "report": str(plan.export_dir / REPORT_MD),
        "report_json": str(plan.export_dir / REPORT_JSON),
        "step": plan.step,
        "checkpoint": str(plan.checkpoint_dir),
        "durations": clock.durations,
    }


def build_report(
    plan: ExportPlan,
    files: dict[str, Path],
    inputs: dict[str, Any],
    verification: dict[str, Any],
    parity_report: dict[str, Any],
    durations: dict[str, float],
) -> dict[str, Any]:
    """report.json's content: what was exported from what, the checks, parity results and stage times."""
    return {
        "run_id": plan.run_id,
        "step": plan.step,
        "checkpoint": str(plan.checkpoint_dir),
        "method": plan.method,
        "base": plan.base,
        "architecture": plan.architecture,
        "parameters": plan.parameters,
        "merge_dtype": plan.merge_dtype,
        "saved_dtype": plan.save_dtype,
        "converter": {
            "root": str(plan.converter.root),
            "source": plan.converter.source,
            "tokenizer": dataclasses.asdict(plan.tokenizer),
        },
        "chat": {
            "eos_token": inputs["eos_token"],
            "eos_token_id": inputs["eos_token_id"],
            "bos_token": inputs["bos_token"],
            "template_writes_bos": inputs["template_writes_bos"],
            "turn_end_token": inputs["turn_end_token"],
            "changes": inputs["changes"],
            "modelfile_template": verification["modelfile_template"],
        },
        "files": verification["files"],
        "warnings": verification["warnings"],
        "notes": verification["notes"],
        "parity": parity_report,
        "durations_s": {name: round(value, 3) for name, value in durations.items()},
    }


def _emit_log(writer: EventWriter | None, message: str, level: str = "info") -> None:
    getattr(log, "warning" if level == "warning" else "info")("%s", message)
    if writer is not None:
        writer.emit(Log(message=message, level=level))


# ----------------------------------------------------------------------------------------------------
# The process


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `python -m engine.export`."""
    parser = argparse.ArgumentParser(prog="python -m engine.export", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="the run folder (<workspace>/runs/<id>)")
    add_export_arguments(parser)
    return parser


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by `python -m engine.export` and `tunedeck export`."""
    parser.add_argument(
        "--checkpoint", type=int, default=None, metavar="N", help="checkpoint step (default: newest)"
    )
    parser.add_argument(
        "--quant",
        default=",".join(quantize.DEFAULT_QUANTS),
        metavar="TYPES",
        help="comma-separated llama.cpp types (default: q4_0,q5_1,q8_0; e.g. q4_k_m, q6_k)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="export folder (default: <workspace>/exports/<run>-step<N>/)",
    )
    parser.add_argument(
        "--base",
        default=None,
        metavar="MODEL",
        help="16-bit base model to merge into, instead of the recipe's model.base",
    )
    parser.add_argument(
        "--questions",
        type=int,
        default=30,
        metavar="N",
        help="parity check: up to N training and N held-out questions (default 30)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=0,
        metavar="N",
        help="parity check: answer length limit (default: from the reference answers)",
    )
    parser.add_argument("--no-parity", action="store_true", help="skip the adapter-vs-GGUF parity check")
    parser.add_argument("--force", action="store_true", help="export again over a finished export")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads for llama.cpp")


def options_from_args(args: argparse.Namespace, run_dir: Path) -> ExportOptions:
    """ExportOptions from parsed arguments."""
    return ExportOptions(
        run_dir=run_dir,
        checkpoint=args.checkpoint,
        quants=quantize.parse_quant_types(args.quant),
        out_dir=args.out,
        base=args.base,
        parity=not args.no_parity,
        parity_questions=args.questions,
        max_new_tokens=args.max_new_tokens,
        force=args.force,
        threads=args.threads,
    )


class _NotLlamaInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("llama.cpp") and record.levelno < logging.WARNING)


def _setup_logging(log_path: Path | None) -> None:
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(formatter)
    stderr.addFilter(_NotLlamaInfo())
    root.addHandler(stderr)
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_path, encoding="utf-8")
        handler.setFormatter(formatter)
        root.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m engine.export`: events on stdout and in <export dir>/events.jsonl."""
    stream: IO[str] = claim_stdout()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # A stop from the TUI (SIGTERM) unwinds like Ctrl-C, so every stage removes its temp files on the way out.
    signal.signal(signal.SIGTERM, _interrupt)
    args = build_parser().parse_args(argv)
    writer = EventWriter(stream)
    started = time.time()
    try:
        options = options_from_args(args, args.run_dir)
        run_dir, _, recipe, _, step, export_dir = locate(options)
        export_dir.mkdir(parents=True, exist_ok=True)
        writer = EventWriter(stream, export_dir / EVENTS_FILE)
        _setup_logging(export_dir / LOG_FILE)
        writer.emit(
            RunStarted(
                run_id=f"{run_dir.name}-step{step}",
                recipe=recipe.name,
                method="export",
                base_model=args.base or recipe.model.base,
                dataset=recipe.data.dataset,
                device="cpu",
                pid=os.getpid(),
            )
        )
        outputs = run_export(options, writer)
    except EngineError as exc:
        log.error("%s: %s %s", exc.title, exc.message, exc.next_step)
        _finish(
            writer,
            RunFailed.of(exc, writer.log_path.parent / LOG_FILE if writer.log_path else ""),
        )
        return 2
    except KeyboardInterrupt:
        _finish(
            writer,
            RunFailed(
                title="Export stopped",
                cause="The export was interrupted before it finished.",
                next_step="Run the export again; no partial file was kept.",
            ),
        )
        return 130
    except BaseException as exc:
        log.exception("export crashed")
        title = "Export failed"
        if is_disk_full(exc, writer.log_path.parent if writer.log_path else Path.cwd()):
            title, cause, step_hint = (
                "Disk full",
                "The disk filled up during the export; no half-written file was kept.",
                "Free some disk space, or pass --out with a folder on a bigger disk, and export again.",
            )
        elif _is_oom(exc):
            cause, step_hint = (
                "The machine ran out of memory during the export.",
                "Close other programs and retry.",
            )
        else:
            first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
            cause = f"The export crashed: {type(exc).__name__}: {first_line}."
            step_hint = "See the export log for the traceback, and report it if it repeats."
        _finish(
            writer,
            RunFailed(
                title=title,
                cause=cause,
                next_step=step_hint,
                details_path=str(writer.log_path.parent / LOG_FILE) if writer.log_path else "",
            ),
        )
        return 1
    _finish(
        writer,
        RunFinished(
            status="finished",
            step=outputs["step"],
            elapsed_s=time.time() - started,
            checkpoint=outputs["checkpoint"],
            outputs={
                "files": outputs["files"],
                "report": outputs["report"],
                "report_json": outputs["report_json"],
                "modelfile": outputs["modelfile"],
                "merged": outputs["merged"],
                "export_dir": outputs["export_dir"],
                "durations_s": outputs["durations"],
            },
        ),
    )
    return 0


def _finish(writer: EventWriter, event: Event) -> None:
    """Emit the export's last event and close the events file; on a disk too full to take it, stdout still has
    the event and the log says the file lacks it."""
    try:
        writer.emit(event)
    except OSError as exc:
        log.error("the last event reached stdout but not %s: %s", writer.log_path, exc)
    try:
        writer.close()
    except OSError as exc:
        log.error("closing %s failed: %s", writer.log_path, exc)


def _interrupt(signum: int, frame: Any) -> None:
    del signum, frame
    raise KeyboardInterrupt


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()


def partial_files(export_dir: Path) -> list[Path]:
    """Temp files or folders an interrupted export left behind in `export_dir`."""
    if not Path(export_dir).is_dir():
        return []
    return [entry for entry in Path(export_dir).iterdir() if is_partial(entry)]


if __name__ == "__main__":
    sys.exit(main())
