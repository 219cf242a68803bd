"""Finding and loading base models, tokenizers and adapters for training and chat, failing as EngineErrors.

Heavy libraries (torch, transformers, peft, bitsandbytes) are imported inside the functions that need them, so
resolving a model name stays cheap and a missing folder fails in well under a second.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from engine.distributed import shards_model
from engine.errors import EngineError, ModelError, OutOfMemoryError
from engine.template import DEFAULT_CHAT_TEMPLATE, IM_END, IM_START, PromptRenderer
from engine.workspace import Workspace, latest_checkpoint

if TYPE_CHECKING:
    from engine.recipes import Recipe

log = logging.getLogger(__name__)

DEMO_BASE = "demo"
DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
ADAPTER_CONFIG_FILE = "adapter_config.json"
MODEL_CONFIG_FILE = "config.json"
# Set on a tokenizer by load_tokenizer: ids of chat tokens it had to add, whose embeddings must be trained.
ADDED_TOKEN_IDS_ATTR = "tunedeck_added_token_ids"

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")

TRAINING_OOM_STEP = "lower train.batch_size or data.max_length, or set train.gradient_checkpointing=true"


class LoadedModel(NamedTuple):
    """A model ready for generation and the tokenizer (with chat template) that goes with it."""

    model: Any
    tokenizer: Any


# ----------------------------------------------------------------------------------------------------
# Resolving names (no heavy imports)


def _as_workspace(workspace: Workspace | Path | str | None) -> Workspace | None:
    if workspace is None or isinstance(workspace, Workspace):
        return workspace
    return Workspace.open(Path(workspace), create=False)


def demo_model_dir(workspace: Workspace) -> Path:
    """Where `tunedeck demo` puts the embedded SmolLM2-135M-Instruct inside a workspace."""
    return workspace.models_dir / DEMO_MODEL_NAME


def is_model_folder(path: Path) -> bool:
    """True for a Hugging Face model folder (a config.json beside the weights)."""
    return (Path(path) / MODEL_CONFIG_FILE).is_file()


def resolve_base_model(base: str, workspace: Workspace | Path | str | None = None) -> str:
    """A loadable model: "demo" → the workspace's prepared demo folder; a local folder → its absolute path;
    anything else shaped like a hub id is returned as is."""
    base = str(base).strip()
    ws = _as_workspace(workspace)
    if base == DEMO_BASE:
        if ws is None:
            raise ModelError(
                "The demo model lives in a workspace, and none was given.",
                next_step="Pass --workspace DIR, or run `tunedeck demo` first.",
            )
        folder = demo_model_dir(ws)
        if not is_model_folder(folder):
            raise ModelError(
                f"The demo model is not prepared yet in {ws.root}.",
                next_step="Run `tunedeck demo` once (or train the demo-cpu recipe, which prepares it).",
            )
        return str(folder)
    candidate = Path(base).expanduser()
    roots = [Path.cwd()] + ([ws.root, ws.models_dir] if ws is not None else [])
    places = [candidate] if candidate.is_absolute() else [root / candidate for root in roots]
    for place in places:
        if place.is_dir():
            return str(place.resolve())
    if candidate.is_absolute() or base.startswith((".", "~")) or not _HUB_ID.match(base):
        looks_local = True
    else:
        # "models/foo" where a models/ folder exists is a missing local folder, not a hub id.
        looks_local = len(candidate.parts) > 1 and any((root / candidate.parts[0]).is_dir() for root in roots)
    if looks_local:
        raise ModelError(
            f"The model folder {base} does not exist.",
            next_step='Set model.base to a folder with config.json and *.safetensors, a hub id, or "demo".',
        )
    return base


def is_local_model(resolved: str) -> bool:
    """True when a resolved base names a folder on this machine rather than a hub id."""
    return Path(resolved).is_absolute()


def check_model_folder(path: Path) -> None:
    """Raise ModelError unless `path` holds config.json and safetensors weights (no pickles are loaded)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(
            f"The model folder {path} does not exist.",
            next_step='Set model.base to an existing folder, a hub id, or "demo".',
        )
    if not is_model_folder(path):
        raise ModelError(
            f"{path} is not a model folder: it has no {MODEL_CONFIG_FILE}.",
            next_step="Point model.base at the folder save_pretrained wrote (config.json, weights, "
            "tokenizer).",
        )
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.safetensors.index.json")):
        raise ModelError(
            f"{path} has no .safetensors weights, and tunedeck does not load pickled .bin files.",
            next_step="Re-save the model with save_pretrained(folder) (it writes safetensors) and retry.",
        )


def _hub_not_cached(repo_id: str) -> ModelError:
    return ModelError(
        f"The model {repo_id} is not in the local cache and there is no network.",
        next_step=f"Download it (`hf download {repo_id}`) or point model.base at a local folder.",
    )


def check_hub_model(repo_id: str) -> None:
    """In offline mode, raise ModelError unless the hub model's config is in the local cache."""
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE:
        return
    cached = try_to_load_from_cache(repo_id, MODEL_CONFIG_FILE)
    if not isinstance(cached, str):
        raise _hub_not_cached(repo_id)


def check_loadable(resolved: str) -> None:
    """Fail early, with the fix, when a resolved base model cannot be loaded."""
    if is_local_model(resolved):
        check_model_folder(Path(resolved))
    else:
        check_hub_model(resolved)


# ----------------------------------------------------------------------------------------------------
# Devices, dtypes and error mapping


def resolve_device(requested: str = "auto") -> str:
    """`auto` → cuda when a GPU is visible, else cpu; an explicit cuda without a GPU is an error."""
    import torch

    requested = (requested or "auto").strip().lower()
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(
            f"train.device is {requested}, but no CUDA GPU is visible to torch.",
            next_step="Set train.device=auto (or cpu), or check `tunedeck doctor` for the CUDA setup.",
        )
    if requested not in ("cpu", "mps") and not requested.startswith("cuda"):
        raise ModelError(f"Unknown device {requested!r}.", next_step="Use auto, cpu, cuda or cuda:N.")
    return requested


def torch_dtype(name: str, device: str) -> Any:
    """The torch dtype for a recipe dtype name; `auto` is bfloat16 on GPUs that support it, float32 on CPU."""
    import torch

    if name == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA OOM errors and for host allocation failures torch reports as RuntimeError."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@contextlib.contextmanager
def loading_errors(what: str, resolved: str) -> Iterator[None]:
    """Map exceptions raised while loading `what` from `resolved` to one-sentence ModelErrors."""
    try:
        yield
    except EngineError:
        raise
    except BaseException as exc:
        if is_out_of_memory(exc):
            raise OutOfMemoryError(
                f"There is not enough memory to load {what} from {resolved}.",
                next_step="Use train.method=qlora, a smaller model, or a machine with more memory.",
            ) from exc
        if isinstance(exc, (OSError, ValueError)) and not is_local_model(resolved):
            text = str(exc).lower()
            if any(
                hint in text
                for hint in ("offline", "connect", "network", "cache", "resolve", "not a valid model")
            ):
                raise _hub_not_cached(resolved) from exc
        if isinstance(exc, (OSError, ValueError, KeyError, TypeError)):
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
            raise ModelError(
                f"Loading {what} from {resolved} failed: {first_line}.",
                next_step="Check that model.base names a complete Hugging Face folder (config, safetensors "
                "weights, tokenizer) of a causal language model.",
            ) from exc
        raise


def _quiet_transformers() -> None:
    # Progress bars from loading and saving would scribble over the log and the TUI.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_warning()


# ----------------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(
    model_path: str | Path, *, chat_template: str = "", trust_remote_code: bool = False
) -> Any:
    """The model's tokenizer with a pad token and a chat template guaranteed.

    The template is the model's own, else `chat_template` (the recipe's), else tunedeck's ChatML default; with
    the default, `<|im_start|>`/`<|im_end|>` are added as special tokens when missing and `<|im_end|>` becomes
    the EOS, so generation stops at the end of a turn. Added token ids are recorded on the tokenizer
    (ADDED_TOKEN_IDS_ATTR) so load_model can resize and train their embeddings.
    """
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    _quiet_transformers()
    resolved = str(model_path)
    with loading_errors("the tokenizer", resolved):
        tokenizer = AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    added_ids: list[int] = []
    if not tokenizer.chat_template:
        if chat_template:
            tokenizer.chat_template = chat_template
        else:
            vocab = tokenizer.get_vocab()
            missing = [token for token in (IM_START, IM_END) if token not in vocab]
            if missing:
                tokenizer.add_tokens(
                    [AddedToken(token, special=True, normalized=False) for token in missing],
                    special_tokens=True,
                )
                added_ids = [tokenizer.convert_tokens_to_ids(token) for token in missing]
                log.info("added chat tokens %s to the vocabulary (ids %s)", missing, added_ids)
            tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
            tokenizer.eos_token = IM_END
    if tokenizer.eos_token is None:
        raise ModelError(
            f"The tokenizer in {resolved} has no end-of-sequence token.",
            next_step="Set eos_token in the model's tokenizer_config.json.",
        )
    if tokenizer.pad_token is None:
        # The collator masks padding labels itself, so sharing the EOS id never hides a real EOS.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    setattr(tokenizer, ADDED_TOKEN_IDS_ATTR, added_ids)
    return tokenizer


def renderer_for(tokenizer: Any, system_prompt: str = "") -> PromptRenderer:
    """The engine.template renderer over a loaded tokenizer: training encodes what the TUI shows."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(
            "This model's tokenizer has no fast (tokenizers) backend, which tunedeck needs.",
            next_step="Use a model folder with a tokenizer.json.",
        )
    special = {
        name: str(getattr(tokenizer, name))
        for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        if getattr(tokenizer, name, None)
    }
    return PromptRenderer(
        backend,
        tokenizer.chat_template,
        bos_token=special.get("bos_token", ""),
        eos_token=special.get("eos_token", ""),
        system_prompt=system_prompt,
        special_tokens=special,
    )


def stop_token_ids(tokenizer: Any, model: Any | None = None) -> list[int]:
    """Token ids that end a reply: the tokenizer's EOS plus the model's own configured EOS ids."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def _fit_embeddings(model: Any, tokenizer: Any) -> None:
    """Grow the embedding matrix when the tokenizer has more tokens than the model has rows."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        log.info("resizing token embeddings %d -> %d", rows, len(tokenizer))
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)


def _sync_special_ids(model: Any, tokenizer: Any) -> None:
    model.config.pad_token_id = tokenizer.pad_token_id
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.eos_token_id = stop_token_ids(tokenizer, model)
        generation.pad_token_id = tokenizer.pad_token_id


# ----------------------------------------------------------------------------------------------------
# Models for training


def _lora_config(recipe: Recipe, model: Any, added_ids: list[int]) -> Any:
    from peft import LoraConfig

    trainable_tokens = None
    if added_ids:
        # New chat tokens start as averages of old rows; train just those rows (input and, if untied, output).
        trainable_tokens = {"embed_tokens": list(added_ids)}
        if not model.config.tie_word_embeddings and model.get_output_embeddings() is not None:
            trainable_tokens["lm_head"] = list(added_ids)
    return LoraConfig(
        r=recipe.lora.r,
        lora_alpha=recipe.lora.alpha,
        lora_dropout=recipe.lora.dropout,
        target_modules=recipe.lora.target_modules,
        task_type="CAUSAL_LM",
        bias="none",
        trainable_token_indices=trainable_tokens,
    )


def load_model(
    model_path: str | Path, recipe: Recipe, tokenizer: Any, *, device: str = "auto", packed: bool = False
) -> Any:
    """The model to train for `recipe.train.method`: a peft LoRA model over a 16/32-bit base (lora), over a
    4-bit NF4 base (qlora), or the plain model (full).

    `packed`: training will go through engine.fast where it supports the model, which computes norms and the
    loss in float32 itself and checkpoints its own layers, so a 4-bit base keeps its other weights in their
    16-bit dtype rather than being upcast for the padded path (half a GiB less on a 7B).
    """
    import torch
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    resolved = str(model_path)
    device = resolve_device(device)
    method = recipe.train.method
    dtype = torch_dtype(recipe.model.dtype, device)
    # Under FSDP the model stays off the GPU here: FSDP shards it across the GPUs (it may not fit on one).
    sharded = shards_model()
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "use_safetensors": True,
        "trust_remote_code": recipe.model.trust_remote_code,
    }
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        # bitsandbytes' CPU kernels compute in float32 only; GPUs use the recipe's compute dtype.
        compute = (
            torch_dtype(recipe.quant.compute_dtype, device) if device.startswith("cuda") else torch.float32
        )
        if device == "cpu":
            kwargs["dtype"] = torch.float32
        if sharded:
            # FSDP flattens each layer's weights into one tensor of one dtype, so the packed 4-bit weights are
            # stored in the compute dtype instead of uint8 and every other weight loads in that dtype too.
            kwargs["dtype"] = compute
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=recipe.quant.quant_type,
            bnb_4bit_use_double_quant=recipe.quant.double_quant,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=compute if sharded else torch.uint8,
        )
        if not sharded:
            kwargs["device_map"] = (
                {"": torch.device(device).index or 0} if device.startswith("cuda") else "cpu"
            )
    with loading_errors("the base model", resolved):
        model = AutoModelForCausalLM.from_pretrained(resolved, **kwargs)
        if method != "qlora" and not sharded:
            model.to(device)
    _fit_embeddings(model, tokenizer)
    _sync_special_ids(model, tokenizer)
    model.config.use_cache = False
    if method == "full":
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    keep_base_dtype = False
    if packed:
        from engine.fast import unsupported_reason

        keep_base_dtype = unsupported_reason(model) is None
    # Upcasting the norms to float32 would mix dtypes inside the flat tensors FSDP shards.
    if method == "qlora" and not keep_base_dtype and not sharded:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=recipe.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    added_ids = list(getattr(tokenizer, ADDED_TOKEN_IDS_ATTR, []) or [])
    with loading_errors("the LoRA adapter", resolved):
        model = get_peft_model(model, _lora_config(recipe, model, added_ids))
    if keep_base_dtype:
        # Trainable tensors (LoRA weights, new token rows) live in float32 as on the padded path, so the
        # optimizer updates full-precision values and they share one flat buffer.
        for param in model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
    return model


# ----------------------------------------------------------------------------------------------------
# Models for inference (chat, export, parity checks)


def _checkpoint_of(adapter_dir: Path) -> Path:
    """A checkpoint folder from a checkpoint, or a run folder (its newest complete checkpoint)."""
    if (adapter_dir / "checkpoints").is_dir() and not (adapter_dir / ADAPTER_CONFIG_FILE).is_file():
        newest = latest_checkpoint(adapter_dir)
        if newest is None:
            raise ModelError(
                f"The run {adapter_dir.name} has no complete checkpoint yet.",
                next_step="Wait for its first checkpoint (train.save_steps), or train it longer.",
            )
        return newest
    return adapter_dir


def adapter_base_model(adapter_dir: Path) -> str:
    """The base model an adapter checkpoint was trained on, as its adapter_config.json records it."""
    config_file = Path(adapter_dir) / ADAPTER_CONFIG_FILE
    try:
        return str(json.loads(config_file.read_text(encoding="utf-8")).get("base_model_name_or_path") or "")
    except (OSError, ValueError):
        return ""


def load_for_inference(
    base: str | Path | None,
    adapter_dir: str | Path | None = None,
    device: str = "auto",
    *,
    dtype: str = "auto",
    workspace: Workspace | Path | None = None,
    load_in_4bit: bool = False,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """A model in eval mode plus its tokenizer: a base model, a base plus a LoRA checkpoint (or a run folder's
    newest checkpoint), or a full fine-tuning checkpoint (which replaces the base).

    The tokenizer comes from the checkpoint when it has one (it carries the chat template training used). The
    base loads in 16/32 bits unless `load_in_4bit`: merging and exporting need unquantized weights.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    target = resolve_device(device)
    checkpoint = _checkpoint_of(Path(adapter_dir).expanduser().resolve()) if adapter_dir else None
    is_adapter = checkpoint is not None and (checkpoint / ADAPTER_CONFIG_FILE).is_file()
    if checkpoint is not None and not is_adapter:
        check_model_folder(checkpoint)  # a full fine-tuning checkpoint is itself a model folder
        resolved = str(checkpoint)
    else:
        if not base and checkpoint is not None:
            base = adapter_base_model(checkpoint)
        if not base:
            raise ModelError(
                "No base model was given for this adapter.", next_step="Pass the base model (--base)."
            )
        resolved = resolve_base_model(str(base), workspace)
        check_loadable(resolved)
    if checkpoint is not None and (checkpoint / "tokenizer_config.json").is_file():
        with loading_errors("the checkpoint's tokenizer", str(checkpoint)):
            tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), trust_remote_code=trust_remote_code)
        if not tokenizer.chat_template:
            tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    else:
        tokenizer = load_tokenizer(resolved, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype(dtype, target),
        "use_safetensors": True,
        "trust_remote_code": trust_remote_code,
    }
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        compute = kwargs["dtype"] if target.startswith("cuda") else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
        kwargs["device_map"] = {"": torch.device(target).index or 0} if target.startswith("cuda") else "cpu"
    with loading_errors("the model", resolved):
        model = AutoModelForCausalLM.from_pretrained(resolved, **kwargs)
        if not load_in_4bit:
            model.to(target)
    _fit_embeddings(model, tokenizer)
    if is_adapter:
        from peft import PeftModel

        with loading_errors("the adapter", str(checkpoint)):
            model = PeftModel.from_pretrained(model, str(checkpoint), is_trainable=False)
    _sync_special_ids(model, tokenizer)
    model.config.use_cache = True
    model.eval()
    return LoadedModel(model, tokenizer)


def training_oom_error(exc: BaseException | None = None) -> OutOfMemoryError:
    """The OutOfMemoryError for a training step that ran out of accelerator (or host) memory."""
    on_gpu = exc is None or type(exc).__name__ == "OutOfMemoryError" or "cuda" in str(exc).lower()
    where = "The GPU" if on_gpu else "The machine"
    return OutOfMemoryError(
        f"{where} ran out of memory during a training step.",
        next_step=TRAINING_OOM_STEP[0].upper() + TRAINING_OOM_STEP[1:] + ".",
    )
