"""Runs llama.cpp's own convert_hf_to_gguf.py on a merged Hugging Face folder, and reads what the GGUF holds.

The converter is never copied into tunedeck: it is found in `$LLAMA_CPP_DIR` (a user's llama.cpp checkout)
or in the copy scripts/setup.sh extracts from the pinned llama-cpp-python sdist (`<venv>/llama.cpp`). It runs
as a subprocess through a small launcher (`python -m engine.convert launch …`) that puts the converter's own
gguf-py first on the path and, only for a byte-level BPE tokenizer whose fingerprint the converter does not
know, makes its pre-tokenizer lookup answer "gpt-2" instead of refusing.

Module level imports are standard library only: the launcher must import the converter's gguf-py, not PyPI's.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from engine.atomic import commit_file, disk_full_error, is_disk_full, temp_sibling, tree_bytes
from engine.errors import DiskFullError, ExportError

log = logging.getLogger(__name__)

CONVERTER_DIR_ENV = "LLAMA_CPP_DIR"
CONVERTER_SCRIPT = "convert_hf_to_gguf.py"
BUNDLED_CONVERTER_DIRNAME = "llama.cpp"
# The launcher's answer for an unknown byte-level BPE fingerprint: GPT-2's regex splits text as training did.
BYTE_LEVEL_PRE_TOKENIZER = "gpt-2"
REPO_ROOT = Path(__file__).resolve().parent.parent

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclasses.dataclass(frozen=True)
class Converter:
    """Where llama.cpp's converter lives: `root` holds convert_hf_to_gguf.py and gguf-py/."""

    root: Path
    source: str

    @property
    def script(self) -> Path:
        return self.root / CONVERTER_SCRIPT

    @property
    def gguf_py(self) -> Path:
        return self.root / "gguf-py"

    def python_path(self) -> str:
        """PYTHONPATH for the converter: its gguf-py first (PyPI gguf lacks parts), itself, then us."""
        parts = [str(self.gguf_py), str(self.root), str(REPO_ROOT)]
        inherited = os.environ.get("PYTHONPATH", "")
        return os.pathsep.join(parts + ([inherited] if inherited else []))


def _bundled_dirs() -> list[Path]:
    # The venv running us first, then the repository's own .venv (tests may run under another interpreter).
    return [Path(sys.prefix) / BUNDLED_CONVERTER_DIRNAME, REPO_ROOT / ".venv" / BUNDLED_CONVERTER_DIRNAME]


def find_converter() -> Converter:
    """The converter in `$LLAMA_CPP_DIR` if set, else the bundled copy; ExportError with the fix if absent."""
    configured = os.environ.get(CONVERTER_DIR_ENV, "").strip()
    if configured:
        root = Path(configured).expanduser().resolve()
        if not (root / CONVERTER_SCRIPT).is_file():
            raise ExportError(
                f"${CONVERTER_DIR_ENV} points at {root}, which has no {CONVERTER_SCRIPT}.",
                next_step=f"Point {CONVERTER_DIR_ENV} at the top of a llama.cpp checkout, or unset it to use "
                "the bundled converter.",
            )
        if not (root / "gguf-py").is_dir():
            raise ExportError(
                f"The llama.cpp checkout at {root} has no gguf-py folder, which its converter needs.",
                next_step=f"Use a complete llama.cpp checkout for {CONVERTER_DIR_ENV}.",
            )
        return Converter(root, CONVERTER_DIR_ENV)
    for root in _bundled_dirs():
        if (root / CONVERTER_SCRIPT).is_file() and (root / "gguf-py").is_dir():
            return Converter(root.resolve(), "bundled")
    raise ExportError(
        "llama.cpp's converter (convert_hf_to_gguf.py) is not installed.",
        next_step=f"Run scripts/setup.sh (it extracts the converter into .venv/llama.cpp), or set "
        f"{CONVERTER_DIR_ENV} to a llama.cpp checkout.",
    )


def _registry_sources(converter: Converter) -> list[Path]:
    package_init = converter.root / "conversion" / "__init__.py"
    return [p for p in (package_init, converter.script) if p.is_file()]


def _dict_keys_of(tree: ast.AST, name: str) -> set[str]:
    keys: set[str] = set()
    for node in ast.walk(tree):
        target = None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign):
            target, value = node.target, node.value
        if isinstance(target, ast.Name) and target.id == name and isinstance(value, ast.Dict):
            keys |= {k.value for k in value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
    return keys


_REGISTER_CALL = re.compile(r"@(?:Model|ModelBase)\.register\(([^)]*)\)")


@functools.lru_cache(maxsize=8)
def _architectures_at(root: Path, stamp: tuple[float, ...]) -> frozenset[str]:
    del stamp  # part of the cache key only: an edited checkout is read again
    found: set[str] = set()
    converter = Converter(root, "")
    for source in _registry_sources(converter):
        text = source.read_text(encoding="utf-8", errors="replace")
        with contextlib.suppress(SyntaxError):
            found |= _dict_keys_of(ast.parse(text), "TEXT_MODEL_MAP")
        # Older checkouts keep every model class in the script, registered by decorators.
        for args in _REGISTER_CALL.findall(text):
            found |= set(re.findall(r"[\"']([A-Za-z0-9_.]+)[\"']", args))
    conversion = root / "conversion"
    if conversion.is_dir() and not found:
        for module in conversion.glob("*.py"):
            for args in _REGISTER_CALL.findall(module.read_text(encoding="utf-8", errors="replace")):
                found |= set(re.findall(r"[\"']([A-Za-z0-9_.]+)[\"']", args))
    return frozenset(found)


def supported_architectures(converter: Converter) -> frozenset[str]:
    """Hugging Face architecture names (e.g. LlamaForCausalLM) the converter maps to a GGUF model, read from
    its source without importing it (no torch, well under a second)."""
    sources = _registry_sources(converter)
    stamp = tuple(p.stat().st_mtime for p in sources)
    return _architectures_at(converter.root, stamp)


def model_architecture(model_dir: Path) -> str:
    """The first entry of config.json's `architectures` (what the converter dispatches on), or ''."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    names = config.get("architectures") or []
    if not names and isinstance(config.get("text_config"), dict):
        names = config["text_config"].get("architectures") or []
    return str(names[0]) if names else ""


# ----------------------------------------------------------------------------------------------------
# Tokenizer fingerprints


@dataclasses.dataclass(frozen=True)
class TokenizerCheck:
    """How the converter reads a tokenizer: `kind` is sentencepiece, bpe-known, bpe-byte-level or other."""

    kind: str
    pre_tokenizer: str = ""
    fingerprint: str = ""

    @property
    def needs_byte_level_fallback(self) -> bool:
        """True when the launcher must answer "gpt-2" for the converter's unknown-fingerprint lookup."""
        return self.kind == "bpe-byte-level"


def _pre_tokenizer_source(converter: Converter) -> str:
    base = converter.root / "conversion" / "base.py"
    return (base if base.is_file() else converter.script).read_text(encoding="utf-8", errors="replace")


@functools.lru_cache(maxsize=8)
def _fingerprint_table(root: Path) -> tuple[str, dict[str, str]]:
    """The converter's probe text and its known fingerprint → pre-tokenizer name table."""
    text = _pre_tokenizer_source(Converter(root, ""))
    probe = ""
    with contextlib.suppress(SyntaxError):
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef) and node.name == "get_vocab_base_pre":
                for statement in node.body:
                    if (
                        isinstance(statement, ast.Assign)
                        and isinstance(statement.targets[0], ast.Name)
                        and statement.targets[0].id == "chktxt"
                        and isinstance(statement.value, ast.Constant)
                    ):
                        probe = str(statement.value.value)
                break
    known = dict(re.findall(r'chkhsh == "([0-9a-f]{64})":\s*(?:#[^\n]*\n\s*)*res = "([^"]+)"', text))
    return probe, known


def _is_byte_level(pre_tokenizer: Any) -> bool:
    if not isinstance(pre_tokenizer, dict):
        return False
    if pre_tokenizer.get("type") == "ByteLevel":
        return True
    return any(_is_byte_level(item) for item in pre_tokenizer.get("pretokenizers") or [])


def check_tokenizer(model_dir: Path, converter: Converter, *, where: str = "") -> TokenizerCheck:
    """Classify the tokenizer of `model_dir` the way the converter will; ExportError in one sentence when it
    cannot be converted faithfully (naming `where`, else `model_dir`, as the tokenizer's folder)."""
    model_dir = Path(model_dir)
    where = where or str(model_dir)
    tokenizer_json = model_dir / "tokenizer.json"
    has_sentencepiece = (model_dir / "tokenizer.model").is_file()
    if not tokenizer_json.is_file() and not has_sentencepiece and not (model_dir / "vocab.json").is_file():
        raise ExportError(
            f"{where} has no tokenizer (tokenizer.json or tokenizer.model), so llama.cpp cannot convert it.",
            next_step="Save the tokenizer beside the model (tokenizer.save_pretrained) and export again.",
        )
    if has_sentencepiece or not tokenizer_json.is_file():
        return TokenizerCheck("sentencepiece" if has_sentencepiece else "other")
    try:
        spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(
            f"{Path(where) / 'tokenizer.json'} is not readable JSON ({exc}).",
            next_step="Re-save the tokenizer with tokenizer.save_pretrained and export again.",
        ) from None
    if (spec.get("model") or {}).get("type") != "BPE":
        return TokenizerCheck("other")
    probe, known = _fingerprint_table(converter.root)
    if not probe:
        return TokenizerCheck("other")
    from transformers import AutoTokenizer

    # The converter fingerprints exactly this: AutoTokenizer(folder).encode(probe), hashed as a Python list.
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    fingerprint = hashlib.sha256(str(tokenizer.encode(probe)).encode()).hexdigest()
    if fingerprint in known:
        return TokenizerCheck("bpe-known", known[fingerprint], fingerprint)
    if _is_byte_level(spec.get("pre_tokenizer")):
        return TokenizerCheck("bpe-byte-level", BYTE_LEVEL_PRE_TOKENIZER, fingerprint)
    raise ExportError(
        f"This model's BPE tokenizer (fingerprint {fingerprint[:12]}…) is unknown to the llama.cpp converter "
        f"in {converter.root}, and it is not byte-level, so llama.cpp would split text differently from "
        "training.",
        next_step=f"Point {CONVERTER_DIR_ENV} at a newer llama.cpp checkout that knows this tokenizer, or "
        "train on a base model whose tokenizer llama.cpp supports.",
    )


def sentencepiece_pieces(model_file: Path) -> list[str]:
    """The pieces of a SentencePiece model file (tokenizer.model), in id order."""
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    return [processor.id_to_piece(index) for index in range(processor.get_piece_size())]


def tokenizer_json_tokens(tokenizer_json: Path) -> dict[int, str]:
    """Every token of a tokenizer.json by id: the model's vocabulary and the added tokens."""
    spec = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    vocab = (spec.get("model") or {}).get("vocab")
    tokens: dict[int, str] = {}
    if isinstance(vocab, dict):
        tokens.update({int(index): str(text) for text, index in vocab.items()})
    elif isinstance(vocab, list):
        tokens.update({index: str(entry[0]) for index, entry in enumerate(vocab) if isinstance(entry, list)})
    tokens.update({int(token["id"]): str(token["content"]) for token in spec.get("added_tokens") or []})
    return tokens


def _metaspace_scheme(step: Any) -> str:
    """The prepend_scheme of the Metaspace step in a tokenizer.json pre-tokenizer (or Sequence), or ''."""
    if not isinstance(step, dict):
        return ""
    if step.get("type") == "Metaspace":
        # tokenizers < 0.15 wrote add_prefix_space instead of a scheme; True prefixed every segment.
        return str(
            step.get("prepend_scheme") or ("always" if step.get("add_prefix_space", True) else "never")
        )
    return next(filter(None, (_metaspace_scheme(item) for item in step.get("pretokenizers") or [])), "")


def sentencepiece_space_prefix(model_dir: Path) -> bool | None:
    """False when the SentencePiece model in `model_dir` must be converted with add_space_prefix off to split
    text as its tokenizer.json does; None where the converter's default already agrees."""
    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer.model").is_file():
        return None
    try:
        spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    # llama.cpp prefixes a space to every text fragment that starts the prompt or follows a special token
    # (legacy SentencePiece, Metaspace "always"). transformers' non-legacy Llama tokenizers prefix only the
    # text at the very start ("first") or nothing ("never"), so `<|im_start|>user` must not become `▁user`.
    # llama.cpp has no "first" mode: off matches every fragment after a special token, which is all of a
    # chat prompt, and loses the prefix only on text that opens a raw prompt.
    if _metaspace_scheme(spec.get("pre_tokenizer")) in ("first", "never"):
        return False
    return None


def sentencepiece_matches(model_file: Path, tokenizer_json: Path) -> bool:
    """True when each piece of the SentencePiece model is the token of tokenizer.json at the same id, so a
    converter that reads tokenizer.model sees the vocabulary of tokenizer.json (tokens added after it aside)."""
    try:
        pieces = sentencepiece_pieces(model_file)
        tokens = tokenizer_json_tokens(tokenizer_json)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError):
        return False
    return bool(pieces) and all(tokens.get(index) == piece for index, piece in enumerate(pieces))


# ----------------------------------------------------------------------------------------------------
# Running the converter


_TQDM_PERCENT = re.compile(r"Writing:\s+(\d+)%")
_TENSOR_LINE = re.compile(
    r"^INFO:hf-to-gguf:(?:blk\.|token_embd|output|rope|position_embd|[a-z_.0-9]+\.weight)"
)
_ERROR_LINE = re.compile(r"(Error|Exception|error:|not supported|Can not map|cannot|Missing)", re.IGNORECASE)


def _failure(log_text: str, log_path: Path | None, arch: str) -> ExportError:
    lines = [line.strip() for line in log_text.replace("\r", "\n").splitlines() if line.strip()]
    where = f"See {log_path} for its full output." if log_path else ""
    text = "\n".join(lines[-80:])
    if "BPE pre-tokenizer was not recognized" in text:
        return ExportError(
            "llama.cpp's converter does not recognise this model's BPE tokenizer.",
            next_step=f"Use a newer llama.cpp checkout that knows it ({CONVERTER_DIR_ENV}). {where}".rstrip(),
        )
    if "Can not map tensor" in text or "Cannot map tensor" in text:
        tensor = re.search(r"[Cc]an(?: )?not map tensor '?([^'\s]+)", text)
        return ExportError(
            f"llama.cpp's converter cannot map the tensor {tensor.group(1) if tensor else ''} of this "
            f"{arch or 'model'} (quantized or adapter weights left in the merged model).",
            next_step=f"Export from a 16-bit base model; never merge into 4-bit weights. {where}".strip(),
        )
    if re.search(r"Model \S+ is not supported", text):
        return ExportError(
            f"The llama.cpp converter does not support {arch or 'this architecture'}.",
            next_step=f"Point {CONVERTER_DIR_ENV} at a newer llama.cpp checkout. {where}".strip(),
        )
    errors = [line for line in lines if _ERROR_LINE.search(line) and not line.startswith("INFO:")]
    detail = (errors[-1] if errors else (lines[-1] if lines else "no output")).rstrip(".")
    return ExportError(
        f"llama.cpp's converter failed: {detail[:300]}.",
        next_step=where or "Run the export again with a fresh checkpoint.",
    )


def convert_to_gguf(
    model_dir: Path,
    out_file: Path,
    *,
    converter: Converter | None = None,
    outtype: str = "f16",
    tokenizer: TokenizerCheck | None = None,
    log_path: Path | None = None,
    on_progress: Callable[[float, str], None] | None = None,
    expected_tensors: int = 0,
    python: str | None = None,
    before_commit: Callable[[], None] | None = None,
) -> Path:
    """Convert the Hugging Face folder `model_dir` into `out_file` (written under a temp name, renamed when
    the converter succeeded); `on_progress(fraction, message)` follows its output, `before_commit` runs just
    before the rename (a raise there leaves no file)."""
    converter = converter or find_converter()
    out_file = Path(out_file)
    temp = temp_sibling(out_file)
    arch = model_architecture(model_dir)
    command = [python or sys.executable, "-P", "-m", "engine.convert", "launch", str(converter.script)]
    if tokenizer is not None and tokenizer.needs_byte_level_fallback:
        command += ["--byte-level-bpe"]
    if sentencepiece_space_prefix(model_dir) is False:
        command += ["--no-space-prefix"]
    command += ["--", str(model_dir), "--outfile", str(temp), "--outtype", outtype]
    env = {
        **os.environ,
        "PYTHONPATH": converter.python_path(),
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        # tqdm draws its bar only for a terminal unless told; the launcher reads it for progress.
        "TQDM_MININTERVAL": "0.5",
    }
    log.info("converting %s -> %s with %s (%s)", model_dir, out_file, converter.script, converter.source)
    captured: list[str] = []
    log_handle = open(log_path, "a", encoding="utf-8") if log_path else None  # noqa: SIM115 - closed below
    try:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=str(REPO_ROOT),
        )
        assert process.stdout is not None
        tensors_seen = 0
        buffer = b""
        for chunk in iter(lambda: process.stdout.read1(65536), b""):  # type: ignore[union-attr]
            buffer += chunk
            pieces = re.split(rb"[\r\n]", buffer)
            buffer = pieces.pop()
            for raw in pieces:
                line = raw.decode("utf-8", errors="replace")
                if not line.strip():
                    continue
                captured.append(line)
                if log_handle is not None:
                    log_handle.write(line + "\n")
                if on_progress is None:
                    continue
                match = _TQDM_PERCENT.search(line)
                if match:
                    # Tensors are prepared first (half the work, lazily), then written.
                    on_progress(0.5 + int(match.group(1)) / 200, "writing the GGUF file")
                elif expected_tensors and _TENSOR_LINE.match(line) and "-->" in line:
                    tensors_seen += 1
                    on_progress(min(0.5, tensors_seen / expected_tensors / 2), "mapping tensors")
        if buffer.strip():
            captured.append(buffer.decode("utf-8", errors="replace"))
        code = process.wait()
    except BaseException:
        with contextlib.suppress(Exception):
            process.kill()  # type: ignore[possibly-undefined]
            process.wait()
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    finally:
        if log_handle is not None:
            log_handle.close()
    try:
        if code != 0 or not temp.is_file():
            raise _failure("\n".join(captured), log_path, arch)
        if before_commit is not None:
            before_commit()
        commit_file(temp, out_file)
    except Exception as exc:
        # Judged while the temp file still holds its space.
        if not isinstance(exc, DiskFullError) and is_disk_full(exc, out_file.parent):
            raise disk_full_error(
                str(out_file), folder=out_file.parent, needed_bytes=tree_bytes(model_dir)
            ) from exc
        raise
    finally:
        with contextlib.suppress(OSError):
            temp.unlink()
    return out_file


# ----------------------------------------------------------------------------------------------------
# Reading GGUF metadata (PyPI gguf reads every file type tunedeck writes)


def _gguf_module() -> Any:
    try:
        import gguf
    except ImportError:
        converter = find_converter()
        sys.path.insert(0, str(converter.gguf_py))
        import gguf
    return gguf


@dataclasses.dataclass
class GgufInfo:
    """What a GGUF file says about itself: architecture, file type, tokenizer specials and chat template."""

    path: str
    architecture: str = ""
    file_type: int | None = None
    file_type_name: str = ""
    chat_template: str = ""
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    bos_token: str = ""
    eos_token: str = ""
    add_bos_token: bool | None = None
    tensor_types: dict[str, int] = dataclasses.field(default_factory=dict)
    # Each weight matrix by name: its row length (the dimension llama.cpp packs into blocks) and its type.
    weights: dict[str, tuple[int, str]] = dataclasses.field(default_factory=dict)
    n_tensors: int = 0
    size_bytes: int = 0
    context_length: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain data for report.json (the template is long; its first line is enough to recognise it, and the
        per-tensor list is summed up by tensor_types)."""
        data = dataclasses.asdict(self)
        data["chat_template"] = self.chat_template[:200]
        del data["weights"]
        return data


def file_type_name(file_type: int | None) -> str:
    """`LlamaFileType` number → a lowercase name such as q4_0 (as llama.cpp's ftype names, minus MOSTLY_)."""
    if file_type is None:
        return ""
    gguf = _gguf_module()
    try:
        name = gguf.LlamaFileType(int(file_type)).name
    except ValueError:
        return str(file_type)
    return name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()


# GGUF value types: struct format of each fixed-size type; 8 is a string, 9 an array.
_GGUF_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _GgufHeader:
    """A lean GGUF header reader (key/values and tensor infos) that skips the arrays it is not asked for."""

    # gguf-py's GGUFReader builds an object for every vocabulary entry (seconds for a 50k vocabulary).

    def __init__(self, data: bytes | memoryview) -> None:
        self.data = data
        self.pos = 0
        self.values: dict[str, Any] = {}
        self.string_arrays: dict[str, list[int]] = {}
        self.tensors: list[tuple[str, list[int], int]] = []

    def _unpack(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        length = self._unpack("<Q")
        text = bytes(self.data[self.pos : self.pos + length]).decode("utf-8", errors="replace")
        self.pos += length
        return text

    def _value(self, kind: int, key: str) -> Any:
        if kind in _GGUF_SCALARS:
            return self._unpack(_GGUF_SCALARS[kind])
        if kind == _GGUF_STRING:
            return self._string()
        if kind != _GGUF_ARRAY:
            raise ValueError(f"unknown GGUF value type {kind}")
        item_kind, count = self._unpack("<I"), self._unpack("<Q")
        if item_kind in _GGUF_SCALARS:
            self.pos += struct.calcsize(_GGUF_SCALARS[item_kind]) * count
            return None
        if item_kind == _GGUF_STRING:
            offsets = []
            for _ in range(count):
                offsets.append(self.pos)
                self.pos += 8 + struct.unpack_from("<Q", self.data, self.pos)[0]
            self.string_arrays[key] = offsets
            return None
        for _ in range(count):
            self._value(item_kind, key)
        return None

    def read(self) -> _GgufHeader:
        """Parse the header; raises ValueError for a file that is not GGUF."""
        if bytes(self.data[:4]) != b"GGUF":
            raise ValueError("not a GGUF file")
        self.pos = 4
        self._unpack("<I")  # version
        n_tensors, n_values = self._unpack("<Q"), self._unpack("<Q")
        for _ in range(n_values):
            key = self._string()
            self.values[key] = self._value(self._unpack("<I"), key)
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._unpack("<Q") for _ in range(self._unpack("<I"))]
            kind = self._unpack("<I")
            self._unpack("<Q")  # offset
            self.tensors.append((name, dims, kind))
        return self

    def array_string(self, key: str, index: int) -> str:
        """Entry `index` of the string array `key` (e.g. a token's text), or ''."""
        offsets = self.string_arrays.get(key, [])
        if not 0 <= index < len(offsets):
            return ""
        self.pos = offsets[index]
        return self._string()


def read_gguf(path: Path) -> GgufInfo:
    """The metadata of a GGUF file, read from its header (no weights are read into memory)."""
    import mmap

    gguf = _gguf_module()
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        try:
            header = _GgufHeader(data).read()
        except (ValueError, struct.error) as exc:
            raise ExportError(
                f"{Path(path).name} is not a readable GGUF file ({exc}).",
                next_step="Export again; the file is damaged or was cut short.",
            ) from None
        values = header.values
        info = GgufInfo(path=str(path), size_bytes=Path(path).stat().st_size)
        info.architecture = str(values.get("general.architecture") or "")
        file_type = values.get("general.file_type")
        info.file_type = int(file_type) if file_type is not None else None
        info.file_type_name = file_type_name(info.file_type)
        info.chat_template = str(values.get("tokenizer.chat_template") or "")
        for kind in ("bos", "eos"):
            token_id = values.get(f"tokenizer.ggml.{kind}_token_id")
            setattr(info, f"{kind}_token_id", int(token_id) if token_id is not None else None)
            if token_id is not None:
                setattr(info, f"{kind}_token", header.array_string("tokenizer.ggml.tokens", int(token_id)))
        add_bos = values.get("tokenizer.ggml.add_bos_token")
        info.add_bos_token = bool(add_bos) if add_bos is not None else None
        context = values.get(f"{info.architecture}.context_length")
        info.context_length = int(context) if context is not None else 0
        counts: dict[str, int] = {}
        for name, dims, kind in header.tensors:
            if len(dims) >= 2 and dims[1] > 1:
                try:
                    type_name = gguf.GGMLQuantizationType(kind).name.lower()
                except ValueError:
                    type_name = str(kind)
                counts[type_name] = counts.get(type_name, 0) + 1
                info.weights[name] = (int(dims[0]), type_name)
        info.tensor_types = dict(sorted(counts.items(), key=lambda item: -item[1]))
        info.n_tensors = len(header.tensors)
    return info


# ----------------------------------------------------------------------------------------------------
# The launcher (runs inside the converter's subprocess)


def _text_model_classes(module: Any) -> Iterable[Any]:
    with contextlib.suppress(ImportError):
        from conversion import base  # type: ignore[import-not-found]

        yield base.TextModel
    for name in ("TextModel", "Model"):
        cls = getattr(module, name, None)
        if cls is not None and hasattr(cls, "get_vocab_base_pre"):
            yield cls


def _allow_byte_level_bpe(module: Any) -> None:
    """Make the converter's fingerprint lookup answer "gpt-2" where it would refuse an unknown tokenizer."""

    def wrap(original: Callable[..., str]) -> Callable[..., str]:
        @functools.wraps(original)
        def get_vocab_base_pre(self: Any, tokenizer: Any) -> str:
            try:
                return original(self, tokenizer)
            except NotImplementedError:
                logging.getLogger("tunedeck").warning(
                    "unknown byte-level BPE fingerprint: writing tokenizer.ggml.pre = %s",
                    BYTE_LEVEL_PRE_TOKENIZER,
                )
                return BYTE_LEVEL_PRE_TOKENIZER

        return get_vocab_base_pre

    for cls in _text_model_classes(module):
        cls.get_vocab_base_pre = wrap(cls.get_vocab_base_pre)


def _drop_space_prefix(module: Any) -> None:
    """Make the converter write tokenizer.ggml.add_space_prefix = false for a SentencePiece vocabulary."""

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def _set_vocab_sentencepiece(self: Any, *args: Any, **kwargs: Any) -> Any:
            result = original(self, *args, **kwargs)
            # Without the key llama.cpp defaults to true for SentencePiece ("llama") vocabularies.
            self.gguf_writer.add_add_space_prefix(False)
            logging.getLogger("tunedeck").info(
                "SentencePiece tokenizer.json prefixes no space after special tokens: "
                "writing tokenizer.ggml.add_space_prefix = false"
            )
            return result

        return _set_vocab_sentencepiece

    for cls in _text_model_classes(module):
        if "_set_vocab_sentencepiece" in vars(cls):
            cls._set_vocab_sentencepiece = wrap(cls._set_vocab_sentencepiece)


def launch(script: Path, argv: list[str], *, byte_level_bpe: bool, space_prefix: bool = True) -> None:
    """Import the converter script as a module, patch it if asked, and run its main() with `argv`."""
    script = Path(script).resolve()
    for folder in (str(script.parent), str(script.parent / "gguf-py")):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", script)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {script}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["convert_hf_to_gguf"] = module
    spec.loader.exec_module(module)
    if byte_level_bpe:
        _allow_byte_level_bpe(module)
    if not space_prefix:
        _drop_space_prefix(module)
    sys.argv = [str(script), *argv]
    started = time.monotonic()
    module.main()
    logging.getLogger("tunedeck").info("converter finished in %.1f s", time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    """`python -m engine.convert launch SCRIPT [--byte-level-bpe] [--no-space-prefix] -- CONVERTER-ARGS…`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] != "launch":
        sys.stderr.write(
            "usage: python -m engine.convert launch SCRIPT [--byte-level-bpe] [--no-space-prefix] -- ARGS...\n"
        )
        return 2
    script = Path(argv[1])
    rest = argv[2:]
    flags = rest[: rest.index("--")] if "--" in rest else []
    converter_args = rest[rest.index("--") + 1 :] if "--" in rest else rest
    launch(
        script,
        converter_args,
        byte_level_bpe="--byte-level-bpe" in flags,
        space_prefix="--no-space-prefix" not in flags,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ----------------------------------------------------------------------------------------------------
# Converter inputs: one chat template, and the EOS that ends an assistant turn


_SENTINEL = "tunedeck{}sentinel"


def _render(
    template: str, messages: list[dict[str, str]], special: dict[str, str], *, generation: bool
) -> str:
    from engine.template import render_prompt

    extra = {k: v for k, v in special.items() if k not in ("bos_token", "eos_token")}
    return render_prompt(
        template,
        messages,
        bos_token=special.get("bos_token", ""),
        eos_token=special.get("eos_token", ""),
        add_generation_prompt=generation,
        **extra,
    )


def turn_end_text(template: str, special: dict[str, str]) -> str:
    """What the template writes after an assistant's answer (`<|im_end|>\\n`…), or '' if unrenderable."""
    answer = _SENTINEL.format("answer")
    messages = [
        {"role": "user", "content": _SENTINEL.format("question")},
        {"role": "assistant", "content": answer},
    ]
    try:
        text = _render(template, messages, special, generation=False)
    except Exception:
        return ""
    at = text.rfind(answer)
    return text[at + len(answer) :] if at >= 0 else ""


def turn_end_token(template: str, special: dict[str, str], special_tokens: Iterable[str]) -> str:
    """The special token closing an assistant turn (`<|im_end|>`, `<|eot_id|>`, `</s>`…), or ''."""
    tail = turn_end_text(template, special).lstrip(" ")
    candidates = sorted({t for t in special_tokens if t}, key=len, reverse=True)
    return next((token for token in candidates if tail.startswith(token)), "")


@dataclasses.dataclass
class ChatFormat:
    """A chat template reduced to per-role prefixes and suffixes, when it is that simple (most are)."""

    bos: str
    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    generation_prompt: str
    default_system: str = ""

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt for `messages`, assistant turn opened (what Ollama builds from the Modelfile)."""
        if self.default_system and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        parts = []
        for message in messages:
            prefix, suffix = {
                "system": (self.system_prefix, self.system_suffix),
                "user": (self.user_prefix, self.user_suffix),
                "assistant": (self.assistant_prefix, self.assistant_suffix),
            }[message["role"]]
            parts.append(prefix + message["content"] + suffix)
        return self.bos + "".join(parts) + self.generation_prompt

    def go_template(self) -> str:
        """The same format as an Ollama (Go text/template) TEMPLATE; BOS is the tokenizer's job there."""

        def literal(text: str) -> str:
            return text.replace("{{", '{{ "{{" }}')

        return (
            "{{ range .Messages }}"
            f'{{{{ if eq .Role "system" }}}}{literal(self.system_prefix)}{{{{ .Content }}}}'
            f"{literal(self.system_suffix)}"
            f'{{{{ else if eq .Role "user" }}}}{literal(self.user_prefix)}{{{{ .Content }}}}'
            f"{literal(self.user_suffix)}"
            f'{{{{ else if eq .Role "assistant" }}}}{literal(self.assistant_prefix)}{{{{ .Content }}}}'
            f"{literal(self.assistant_suffix)}"
            "{{ end }}{{ end }}"
            f"{literal(self.generation_prompt)}"
        )


def _split_once(text: str, marker: str) -> tuple[str, str] | None:
    at = text.find(marker)
    if at < 0 or text.find(marker, at + 1) >= 0:
        return None
    return text[:at], text[at + len(marker) :]


_BOS_SENTINEL = _SENTINEL.format("bos")


def _derive_format(template: str, special: dict[str, str], *, with_system: bool) -> ChatFormat | None:
    """Per-role prefixes and suffixes of `template`, read off renders of probe conversations."""
    s, u1, a1, u2 = (_SENTINEL.format(n) for n in ("system", "userone", "assistantone", "usertwo"))
    system = {"role": "system", "content": s}
    user1, answer1, user2 = (
        {"role": r, "content": c} for r, c in (("user", u1), ("assistant", a1), ("user", u2))
    )
    # A sentinel BOS shows exactly where the template writes `bos_token` (its text may equal a role marker).
    probe_special = {**special, "bos_token": _BOS_SENTINEL}
    first = [system, user1] if with_system else [user1]

    def render(messages: list[dict[str, str]], generation: bool) -> str:
        return _render(template, messages, probe_special, generation=generation)

    try:
        p0, p1 = render(first, False), render(first, True)
        p2, p3 = render([*first, answer1], False), render([*first, answer1, user2], False)
    except Exception:
        return None
    eos = special.get("eos_token", "")
    if eos and all(p.endswith(eos) for p in (p0, p2, p3)) and not p1.endswith(eos):
        # Some templates (Phi-3's) close a finished conversation with EOS; that is not part of any message.
        p0, p2, p3 = (p[: -len(eos)] for p in (p0, p2, p3))
    if not (p1.startswith(p0) and p2.startswith(p0) and p3.startswith(p2)):
        return None
    generation_prompt = p1[len(p0) :]
    assistant = _split_once(p2[len(p0) :], a1)
    user = _split_once(p3[len(p2) :], u2)
    if assistant is None or user is None:
        return None
    user_prefix, user_suffix = user
    if with_system:
        head = _split_once(p0, s)
        if head is None:
            return None
        before_system, after_system = head
        middle = _split_once(after_system, u1)
        if middle is None or middle[1] != user_suffix or not middle[0].endswith(user_prefix):
            return None
        system_suffix = middle[0][: len(middle[0]) - len(user_prefix)]
    else:
        head = _split_once(p0, u1)
        if head is None or head[1] != user_suffix or not head[0].endswith(user_prefix):
            return None
        before_system, system_suffix = head[0][: len(head[0]) - len(user_prefix)], user_suffix
    bos = ""
    if before_system.startswith(_BOS_SENTINEL):
        bos, before_system = special.get("bos_token", ""), before_system[len(_BOS_SENTINEL) :]
    if _BOS_SENTINEL in before_system + system_suffix + user_prefix + user_suffix + generation_prompt:
        return None
    system_prefix = before_system if with_system else user_prefix
    if not with_system and before_system:
        return None
    return ChatFormat(
        bos, system_prefix, system_suffix, user_prefix, user_suffix, *assistant, generation_prompt
    )


def chat_format(template: str, special: dict[str, str]) -> ChatFormat | None:
    """Reduce a Jinja chat template to a ChatFormat by rendering probe conversations; None when the template
    does more than wrap each message (the Modelfile then leaves the prompt format to the GGUF's metadata)."""
    # A template that refuses a system turn (Gemma's) gets one written as a user turn, as Ollama's Gemma
    # templates do.
    u1, a1, u2 = (_SENTINEL.format(n) for n in ("userone", "assistantone", "usertwo"))
    user1, answer1, user2 = (
        {"role": r, "content": c} for r, c in (("user", u1), ("assistant", a1), ("user", u2))
    )
    system = {"role": "system", "content": _SENTINEL.format("system")}
    found = _derive_format(template, special, with_system=True)
    probes = [[user1], [system, user1], [system, user1, answer1, user2], [user1, answer1, user2]]
    if found is None:
        found = _derive_format(template, special, with_system=False)
        probes = [[user1], [user1, answer1, user2]]
        if found is None:
            return None
    try:
        bare = _render(template, [user1], special, generation=True)
    except Exception:
        return None
    if found.render([user1]) != bare and probes[1][0]["role"] == "system":
        # A template that adds its own system message when none is given: keep that text as the default.
        start = found.bos + found.system_prefix
        end = found.system_suffix + found.user_prefix + u1 + found.user_suffix + found.generation_prompt
        if not (bare.startswith(start) and bare.endswith(end)) or len(bare) < len(start) + len(end):
            return None
        found.default_system = bare[len(start) : len(bare) - len(end)]
    for probe in probes:
        try:
            if _render(template, probe, special, generation=True) != found.render(probe):
                return None
        except Exception:
            return None
    return found
