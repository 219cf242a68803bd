"""Training recipes: small commented TOML files, validated on load, with `section.key=value` overrides.

Standard library only, so the TUI can validate a recipe form as the user types.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, get_type_hints

from engine.errors import RecipeError

METHODS = ("lora", "qlora", "full")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
OPTIMIZERS = (
    "adamw_torch",
    "adamw_torch_fused",
    "paged_adamw_32bit",
    "paged_adamw_8bit",
    "adamw_8bit",
    "sgd",
)
QUANT_TYPES = ("nf4", "fp4")
# ddp copies the model to every GPU; fsdp shards it across them, for models too large for one card.
STRATEGIES = ("ddp", "fsdp")
ALL_GPUS = "all"


@dataclasses.dataclass
class ModelSection:
    """Which base model to start from."""

    # A local folder, a hub id, or "demo" for the embedded SmolLM2-135M-Instruct.
    base: str = "demo"
    dtype: str = "auto"
    trust_remote_code: bool = False
    # Chat template (Jinja) used when the tokenizer has none; empty means tunedeck's ChatML default.
    chat_template: str = ""


@dataclasses.dataclass
class DataSection:
    """Which dataset to train on and how to cut it."""

    # A file in the workspace's datasets/ folder, or a path.
    dataset: str = "demo_qa.jsonl"
    max_length: int = 512
    eval_fraction: float = 0.0
    system_prompt: str = ""


@dataclasses.dataclass
class TrainSection:
    """The optimisation loop."""

    method: str = "lora"
    epochs: float = 3.0
    # A positive max_steps overrides epochs.
    max_steps: int = 0
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optimizer: str = "adamw_torch"
    gradient_checkpointing: bool = False
    group_by_length: bool = False
    # Train Llama-layout models on padding-free packs of whole samples (engine/fast.py) instead of padded
    # batches; models the packed path cannot run fall back to padded batches, saying why in the log.
    packing: bool = False
    # Tokens per packed micro-batch when packing: activation memory grows with it. 0 = automatic.
    max_tokens_per_batch: int = 0
    # With packing and gradient checkpointing on a GPU: keep each checkpointed layer input in host RAM instead
    # of GPU memory (copied out and back while the GPU computes); about a layer's input per layer less GPU memory.
    offload_activations: bool = False
    seed: int = 42
    logging_steps: int = 1
    eval_steps: int = 0
    save_steps: int = 50
    device: str = "auto"
    # GPUs to train on, one process each, through accelerate: a count or "all" (the visible ones). batch_size is
    # per GPU, so a step trains gpus × batch_size × grad_accum samples. With device = "cpu", CPU processes.
    gpus: int | str = 1
    distributed: str = "ddp"


@dataclasses.dataclass
class LoraSection:
    """LoRA adapter shape (ignored for full fine-tuning)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # "all-linear" or a list of module names such as ["q_proj", "v_proj"].
    target_modules: str | list[str] = "all-linear"


@dataclasses.dataclass
class QuantSection:
    """4-bit base-model quantisation for QLoRA."""

    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"


@dataclasses.dataclass
class Recipe:
    """A whole training recipe; `name` and `source` record where it came from."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)
    quant: QuantSection = dataclasses.field(default_factory=QuantSection)
    name: str = "recipe"
    description: str = ""
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (sections and top-level keys)."""
        return {
            "name": self.name,
            "description": self.description,
            **{section: dataclasses.asdict(getattr(self, section)) for section in SECTIONS},
        }

    def to_toml(self) -> str:
        """The resolved recipe as TOML, as saved beside a run."""
        lines = [f"# Resolved from {self.source or 'defaults'}", f"name = {_toml_value(self.name)}"]
        if self.description:
            lines.append(f"description = {_toml_value(self.description)}")
        for section in SECTIONS:
            lines.append(f"\n[{section}]")
            for key, value in dataclasses.asdict(getattr(self, section)).items():
                lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"

    def fingerprint(self) -> str:
        """A hash of everything that changes what training computes (resume refuses when it differs)."""
        data = self.to_dict()
        data.pop("description", None)
        for (section, key), default in UNHASHED_DEFAULTS.items():
            if data[section].get(key) == default:
                del data[section][key]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "data": DataSection,
    "train": TrainSection,
    "lora": LoraSection,
    "quant": QuantSection,
}
TOP_LEVEL_KEYS = ("name", "description")

CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("train", "method"): METHODS,
    ("model", "dtype"): DTYPES,
    ("quant", "compute_dtype"): DTYPES[1:],
    ("train", "lr_scheduler"): SCHEDULERS,
    ("train", "optimizer"): OPTIMIZERS,
    ("quant", "quant_type"): QUANT_TYPES,
    ("train", "distributed"): STRATEGIES,
}
# Fields hashed only when they differ from these defaults, so runs saved before the fields existed keep their
# fingerprint and still resume.
UNHASHED_DEFAULTS: dict[tuple[str, str], Any] = {
    ("train", "gpus"): 1,
    ("train", "distributed"): "ddp",
    ("train", "max_tokens_per_batch"): 0,
}
POSITIVE_INTS = {
    ("data", "max_length"),
    ("train", "batch_size"),
    ("train", "grad_accum"),
    ("lora", "r"),
    ("lora", "alpha"),
    ("train", "logging_steps"),
}
NON_NEGATIVE = {
    ("train", "epochs"),
    ("train", "max_steps"),
    ("train", "weight_decay"),
    ("train", "max_grad_norm"),
    ("train", "eval_steps"),
    ("train", "save_steps"),
    ("train", "max_tokens_per_batch"),
}
FRACTIONS = {("data", "eval_fraction"), ("lora", "dropout"), ("train", "warmup_ratio")}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)


def _field_types(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _suggest(name: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(where: str, key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against the field's type, converting ints to floats where a float is wanted."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            try:
                return _coerce(where, key, value, option)
            except RecipeError as exc:
                errors.append(exc)
        raise errors[-1]
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise RecipeError(f"{where}: `{key}` must be a list, not {value!r}.")
        return [_coerce(where, key, item, item_type) for item in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise RecipeError(f"{where}: `{key}` must be true or false, not {value!r}.")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise RecipeError(f"{where}: `{key}` must be a whole number, not {value!r}.")
        try:
            return int(value)
        except ValueError:
            raise RecipeError(f"{where}: `{key}` must be a whole number, not {value!r}.") from None
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise RecipeError(f"{where}: `{key}` must be a number, not {value!r}.")
        try:
            return float(value)
        except ValueError:
            raise RecipeError(f"{where}: `{key}` must be a number, not {value!r}.") from None
    if annotation is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: `{key}` must be text, not {value!r}.")
        return value
    raise RecipeError(f"{where}: `{key}` has an unsupported type.")


def _check_ranges(where: str, recipe: Recipe) -> None:
    for (section, key), allowed in CHOICES.items():
        value = getattr(getattr(recipe, section), key)
        if value not in allowed:
            raise RecipeError(
                f"{where}: `{section}.{key}` is {value!r}{_suggest(str(value), allowed)}; "
                f"choose one of {', '.join(allowed)}."
            )
    for section, key in POSITIVE_INTS:
        if getattr(getattr(recipe, section), key) <= 0:
            raise RecipeError(f"{where}: `{section}.{key}` must be greater than 0.")
    for section, key in NON_NEGATIVE:
        if getattr(getattr(recipe, section), key) < 0:
            raise RecipeError(f"{where}: `{section}.{key}` must not be negative.")
    for section, key in FRACTIONS:
        value = getattr(getattr(recipe, section), key)
        if not 0 <= value < 1:
            raise RecipeError(f"{where}: `{section}.{key}` must be at least 0 and below 1, not {value}.")
    if not 0 < recipe.train.learning_rate < 1:
        raise RecipeError(
            f"{where}: `train.learning_rate` must be between 0 and 1, not {recipe.train.learning_rate}."
        )
    if recipe.train.epochs == 0 and recipe.train.max_steps == 0:
        raise RecipeError(f"{where}: set `train.epochs` or `train.max_steps` above 0.")
    if not recipe.model.base.strip():
        raise RecipeError(f'{where}: `model.base` is empty; name a local folder, a hub id or "demo".')
    if not recipe.data.dataset.strip():
        raise RecipeError(
            f"{where}: `data.dataset` is empty; name a file in the workspace's datasets/ folder."
        )
    gpus = recipe.train.gpus
    if isinstance(gpus, str) and gpus.strip().lower() == ALL_GPUS:
        recipe.train.gpus = ALL_GPUS
    elif isinstance(gpus, str) or gpus < 1:
        raise RecipeError(f'{where}: `train.gpus` must be a count of 1 or more, or "all", not {gpus!r}.')


def recipe_from_dict(data: dict[str, Any], where: str = "recipe") -> Recipe:
    """Validate plain data into a Recipe; unknown sections and keys are rejected with the closest valid name."""
    recipe = Recipe()
    for key, value in data.items():
        if key in TOP_LEVEL_KEYS:
            setattr(recipe, key, _coerce(where, key, value, str))
            continue
        if key not in SECTIONS:
            raise RecipeError(
                f"{where}: unknown section or key `{key}`{_suggest(key, [*SECTIONS, *TOP_LEVEL_KEYS])}; "
                f"valid ones are {', '.join([*SECTIONS, *TOP_LEVEL_KEYS])}."
            )
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: `{key}` must be a [{key}] table.")
        section = getattr(recipe, key)
        hints = _field_types(type(section))
        for field_name, field_value in value.items():
            if field_name not in hints:
                raise RecipeError(
                    f"{where}: unknown field `{key}.{field_name}`{_suggest(field_name, hints)}; "
                    f"[{key}] accepts {', '.join(hints)}."
                )
            setattr(
                section, field_name, _coerce(where, f"{key}.{field_name}", field_value, hints[field_name])
            )
    _check_ranges(where, recipe)
    return recipe


def parse_override(text: str) -> tuple[str, str, Any]:
    """Split `section.key=value` into its parts; the value is read as TOML when it parses, else as text."""
    if "=" not in text:
        raise RecipeError(
            f"Override {text!r} is not of the form section.key=value (e.g. train.learning_rate=1e-4)."
        )
    path, raw = text.split("=", 1)
    parts = path.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise RecipeError(f"Override {text!r} must name a section and a key, e.g. lora.r=32.")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return parts[0], parts[1], value


def apply_overrides(data: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """A copy of recipe data with `section.key=value` overrides applied."""
    merged = json.loads(json.dumps(data))
    for text in overrides:
        section, key, value = parse_override(text)
        merged.setdefault(section, {})
        if not isinstance(merged[section], dict):
            raise RecipeError(f"Override {text!r}: `{section}` is not a section.")
        merged[section][key] = value
    return merged


def read_recipe_data(path: Path) -> dict[str, Any]:
    """The raw TOML data of a recipe file, with parse errors naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(
            f"Recipe file {path} does not exist.", next_step="Run `tunedeck recipes` to list them."
        ) from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path} is not UTF-8 text.") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path} is not valid TOML: {exc}.") from None


def load_recipe(path: Path, overrides: typing.Iterable[str] = ()) -> Recipe:
    """Load, override and validate a recipe file; every error names the file and the field."""
    path = Path(path)
    data = apply_overrides(read_recipe_data(path), overrides)
    recipe = recipe_from_dict(data, where=str(path))
    if "name" not in data:
        recipe.name = path.stem
    recipe.source = str(path)
    return recipe


def recipes_dir() -> Path:
    """The folder of recipes shipped with tunedeck."""
    return Path(__file__).resolve().parent.parent / "recipes"


def find_recipe(name_or_path: str, workspace_root: Path | None = None) -> Path:
    """A recipe path from a path, a workspace recipes/ file, or a shipped recipe name such as `demo-cpu`."""
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix == ".toml" and candidate.exists():
        return candidate
    names = [f"{name_or_path}.toml", name_or_path]
    folders = ([Path(workspace_root) / "recipes"] if workspace_root else []) + [recipes_dir()]
    for folder in folders:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    shipped = sorted(p.stem for p in recipes_dir().glob("*.toml"))
    raise RecipeError(
        f"No recipe called {name_or_path!r}{_suggest(name_or_path, shipped)}.",
        next_step=f"Use a .toml path or one of: {', '.join(shipped)}.",
    )


def list_recipes(workspace_root: Path | None = None) -> list[Path]:
    """Shipped recipes plus the workspace's own recipes/ files."""
    found = sorted(recipes_dir().glob("*.toml"))
    if workspace_root and (Path(workspace_root) / "recipes").is_dir():
        found += sorted((Path(workspace_root) / "recipes").glob("*.toml"))
    return found
