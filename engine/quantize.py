"""Quantizes an f16 GGUF with llama.cpp's own quantizer (via llama-cpp-python), keeping its log off stdout.

No llama.cpp binary is needed: `llama_cpp.llama_model_quantize` is the library call behind `llama-quantize`.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from engine.atomic import commit_file, disk_full_error, is_disk_full, temp_sibling
from engine.errors import ExportError

log = logging.getLogger(__name__)
llama_log = logging.getLogger("llama.cpp")

DEFAULT_QUANTS = ("q4_0", "q5_1", "q8_0")

# Bits per weight of each file type (block formats carry scales), for disk estimates before any write.
BITS_PER_WEIGHT = {
    "f32": 32.0,
    "f16": 16.0,
    "bf16": 16.0,
    "q8_0": 8.5,
    "q6_k": 6.5625,
    "q5_1": 6.0,
    "q5_0": 5.5,
    "q5_k_m": 5.7,
    "q5_k_s": 5.5,
    "q4_1": 5.0,
    "q4_0": 4.5,
    "q4_k_m": 4.9,
    "q4_k_s": 4.6,
    "iq4_nl": 4.5,
    "iq4_xs": 4.25,
    "q3_k_l": 4.3,
    "q3_k_m": 3.9,
    "q3_k_s": 3.5,
    "q2_k": 3.0,
    "q2_k_s": 2.9,
}
# Types whose quality depends on an importance matrix; llama.cpp refuses or degrades badly without one.
NEEDS_IMATRIX = ("iq1", "iq2", "iq3_xxs", "iq3_xs", "q2_k_s")
# The tensor type most weights of a file type are stored in, where the names differ: a mix is named after its
# recipe (q4_k_m keeps most weights in q4_k and gives some layers q6_k).
MAIN_TENSOR_TYPE = {
    "q2_k_s": "q2_k",
    "q3_k_s": "q3_k",
    "q3_k_m": "q3_k",
    "q3_k_l": "q3_k",
    "q4_k_s": "q4_k",
    "q4_k_m": "q4_k",
    "q5_k_s": "q5_k",
    "q5_k_m": "q5_k",
    "iq2_m": "iq2_s",
    "iq3_xs": "iq3_s",
    "iq3_m": "iq3_s",
    "mxfp4_moe": "mxfp4",
}
# Tensor types that pack 32 weights a block; the other quantized types (k-quants, most i-quants) pack 256.
_BLOCKS_OF_32 = frozenset({"q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q8_1", "iq4_nl", "mxfp4"})
_UNQUANTIZED = frozenset({"f32", "f16", "bf16", "f64"})


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise ExportError(
            f"llama-cpp-python is not installed ({exc}).",
            next_step="Run scripts/setup.sh, or `pip install llama-cpp-python==0.3.36`.",
        ) from None
    install_log_capture()
    return llama_cpp


def quant_types() -> dict[str, int]:
    """Every file type this llama.cpp build writes, by lowercase name (q4_0, q5_1, q8_0, q4_k_m, f16, …)."""
    llama_cpp = _llama_cpp()
    found: dict[str, int] = {}
    for name in dir(llama_cpp):
        if name.startswith("LLAMA_FTYPE_MOSTLY_"):
            found[name.removeprefix("LLAMA_FTYPE_MOSTLY_").lower()] = int(getattr(llama_cpp, name))
    if hasattr(llama_cpp, "LLAMA_FTYPE_ALL_F32"):
        found["f32"] = int(llama_cpp.LLAMA_FTYPE_ALL_F32)
    return found


def ftype_name(value: int) -> str:
    """A llama.cpp ftype number as its lowercase name (e.g. 7 → q8_0)."""
    for name, number in quant_types().items():
        if number == value:
            return name
    return str(value)


def parse_quant_types(text: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """`q4_0,q5_1,q8_0` (any case, commas or spaces) → validated unique names; ExportError names the fix."""
    if text is None:
        return list(DEFAULT_QUANTS)
    items = text if isinstance(text, (list, tuple)) else re.split(r"[,\s]+", text)
    names = list(dict.fromkeys(item.strip().lower().replace("-", "_") for item in items if item.strip()))
    if not names:
        raise ExportError("No quantization type was given.", next_step="Pass e.g. --quant q4_0,q5_1,q8_0.")
    known = quant_types()
    for name in names:
        if name not in known:
            import difflib

            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ExportError(
                f"{name!r} is not a quantization type llama.cpp knows{hint}.",
                next_step="Use any of: " + ", ".join(sorted(known)) + ".",
            )
        if name.startswith(NEEDS_IMATRIX):
            raise ExportError(
                f"{name} needs an importance matrix, which tunedeck's export does not compute.",
                next_step="Choose q4_k_m, q4_0 or a larger type instead.",
            )
    return names


def estimated_size(parameters: int, quant: str) -> int:
    """Rough file size in bytes of a GGUF of `parameters` weights in type `quant` (plus 1 MiB of metadata)."""
    return int(parameters * BITS_PER_WEIGHT.get(quant, 8.5) / 8) + (1 << 20)


def main_tensor_type(quant: str) -> str:
    """The tensor type most weights of a `quant` file are stored in (q4_k_m → q4_k, q4_0 → q4_0)."""
    return MAIN_TENSOR_TYPE.get(quant, quant)


def block_size(tensor_type: str) -> int:
    """How many weights of a row one block of `tensor_type` packs: a row must be a multiple of it."""
    if tensor_type in _UNQUANTIZED:
        return 1
    return 32 if tensor_type in _BLOCKS_OF_32 else 256


def output_layer_name(weights: dict[str, tuple[int, str]]) -> str:
    """The GGUF name of the output layer: output.weight, or the token embeddings a tied model reuses."""
    return (
        "output.weight"
        if "output.weight" in weights or "token_embd.weight" not in weights
        else "token_embd.weight"
    )


def _type_counts(types: list[str]) -> str:
    """`q8_0` for one type, `q6_k (12), q5_k (4)` for several."""
    counts: dict[str, int] = {}
    for kind in types:
        counts[kind] = counts.get(kind, 0) + 1
    if len(counts) == 1:
        return types[0]
    return ", ".join(f"{kind} ({count})" for kind, count in counts.items())


def explain_tensor_types(weights: dict[str, tuple[int, str]], quant: str) -> tuple[list[str], list[str]]:
    """Why weight matrices of a `quant` file (name → row length, type) are in another type, as (warnings,
    notes): a warning for rows that do not divide into the type's blocks, notes for llama.cpp's deliberate
    choices (the output layer kept at a higher precision, the higher-precision layers of a mix)."""
    main = main_tensor_type(quant)
    if main in _UNQUANTIZED:
        return [], []
    block = block_size(main)
    output = output_layer_name(weights)
    misfit: list[str] = []
    misfit_rows: set[int] = set()
    kept_output = ""
    mixed: list[str] = []
    unexplained: list[str] = []
    for name, (row, kind) in weights.items():
        if kind == main:
            continue
        if row % block:
            misfit.append(kind)
            misfit_rows.add(row)
        elif name == output:
            # llama.cpp's default for the output layer: q6_k, or q8_0 where its rows do not fit q6_k's blocks.
            kept_output = kind
        elif main != quant:
            mixed.append(kind)
        else:
            unexplained.append(kind)
    total = len(weights)
    warnings: list[str] = []
    notes: list[str] = []
    if misfit:
        rows = sorted(misfit_rows)
        lengths = ", ".join(f"{row:,}" for row in rows[:4]) + (", …" if len(rows) > 4 else "")
        warnings.append(
            f"{len(misfit)} of {total} weight tensors stay in {_type_counts(misfit)} because their rows "
            f"({lengths} weights) are not a multiple of {main}'s block of {block}"
        )
    if unexplained:
        warnings.append(
            f"{len(unexplained)} of {total} weight tensors are in {_type_counts(unexplained)} instead of {main}"
        )
    if kept_output:
        what = (
            "the output layer" if output == "output.weight" else "the output layer (tied to the embeddings)"
        )
        notes.append(f"{output} is in {kept_output}: llama.cpp keeps {what} at a higher precision by default")
    if mixed:
        notes.append(
            f"{len(mixed)} of {total} weight tensors are in {_type_counts(mixed)}: {quant} is llama.cpp's mix "
            f"that gives some layers more bits than {main}"
        )
    return warnings, notes


def _expected_size(source: Path, quant: str) -> int | None:
    """Rough size of `source` (an f16/bf16 GGUF) once quantized to `quant`, from its own size."""
    try:
        return int(source.stat().st_size * BITS_PER_WEIGHT.get(quant, 8.5) / 16)
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------------
# llama.cpp's log


_LogHook = Callable[[str], None]
_hooks: list[_LogHook] = []
_hooks_lock = threading.Lock()
_installed_callback: Any = None
_partial = ""
_last_level = logging.DEBUG
# ggml's log levels: 1 debug, 2 info, 3 warn, 4 error, 5 continues the previous line's level.
_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}


def _on_llama_log(level: int, text: bytes, _user: Any) -> None:
    global _partial, _last_level
    piece = text.decode("utf-8", errors="replace") if text else ""
    _partial += piece
    python_level = _last_level if level == 5 else _LEVELS.get(level, logging.DEBUG)
    _last_level = python_level
    if "\n" not in _partial:
        return
    *lines, _partial = _partial.split("\n")
    for line in lines:
        if not line.strip():
            continue
        llama_log.log(python_level, "%s", line)
        with _hooks_lock:
            hooks = list(_hooks)
        for hook in hooks:
            with contextlib.suppress(Exception):
                hook(line)


def install_log_capture() -> None:
    """Route llama.cpp's log through Python logging (stderr and the export log), never to stdout."""
    global _installed_callback
    if _installed_callback is not None:
        return
    import llama_cpp

    # The ctypes callback must outlive every llama.cpp call, so it is kept in a module global.
    _installed_callback = llama_cpp.llama_log_callback(_on_llama_log)
    llama_cpp.llama_log_set(_installed_callback, ctypes.c_void_p(0))


@contextlib.contextmanager
def llama_log_lines(hook: _LogHook) -> Iterator[None]:
    """Call `hook(line)` for every llama.cpp log line written inside the block."""
    install_log_capture()
    with _hooks_lock:
        _hooks.append(hook)
    try:
        yield
    finally:
        with _hooks_lock:
            _hooks.remove(hook)


# ----------------------------------------------------------------------------------------------------
# Quantizing


_TENSOR_PROGRESS = re.compile(r"\[\s*(\d+)/\s*(\d+)\]")


def quantize_gguf(
    source: Path,
    target: Path,
    quant: str,
    *,
    threads: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    before_commit: Callable[[], None] | None = None,
) -> Path:
    """Quantize `source` (an f16/bf16/f32 GGUF) into `target` as type `quant`; the file appears only when done
    (`before_commit` runs just before the rename; a raise there leaves no file)."""
    llama_cpp = _llama_cpp()
    known = quant_types()
    if quant not in known:
        raise ExportError(
            f"{quant!r} is not a quantization type llama.cpp knows.",
            next_step="Use any of: " + ", ".join(sorted(known)) + ".",
        )
    target = Path(target)
    temp = temp_sibling(target)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = known[quant]
    params.nthread = int(threads or os.cpu_count() or 1)
    errors: list[str] = []

    def follow(line: str) -> None:
        match = _TENSOR_PROGRESS.search(line)
        if match and on_progress is not None:
            on_progress(int(match.group(1)), int(match.group(2)))
        if "error" in line.lower() or "failed" in line.lower():
            errors.append(line.strip())

    started = time.monotonic()
    try:
        with llama_log_lines(follow):
            code = llama_cpp.llama_model_quantize(
                str(source).encode(), str(temp).encode(), ctypes.byref(params)
            )
        if code != 0 or not temp.is_file():
            detail = errors[-1] if errors else f"llama_model_quantize returned {code}"
            failure = ExportError(
                f"llama.cpp could not quantize {Path(source).name} to {quant}: {detail.rstrip('.')}.",
                next_step="Check that the f16 GGUF loads (export.log has details).",
            )
            # Judged while the temp file still holds its space: llama.cpp reports a full disk without an errno.
            if is_disk_full(failure, target.parent):
                raise disk_full_error(
                    str(target), folder=target.parent, needed_bytes=_expected_size(Path(source), quant)
                ) from failure
            raise failure
        if before_commit is not None:
            before_commit()
        commit_file(temp, target)
    except OSError as exc:
        if is_disk_full(exc, target.parent):
            raise disk_full_error(str(target), folder=target.parent) from exc
        raise
    finally:
        with contextlib.suppress(OSError):
            temp.unlink()
    log.info("quantized %s -> %s (%s) in %.1f s", source, target, quant, time.monotonic() - started)
    return target


# ----------------------------------------------------------------------------------------------------
# What llama.cpp itself reports about a file


def llama_file_report(path: Path) -> dict[str, Any]:
    """Load a GGUF in llama.cpp (memory-mapped, no context); report file type, description and specials."""
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    params.use_mmap = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ExportError(
            f"llama.cpp cannot load {Path(path).name}.",
            next_step="The file is damaged or of a type this llama.cpp does not read; export again.",
        )
    try:
        buffer = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(model, buffer, ctypes.sizeof(buffer))
        vocab = llama_cpp.llama_model_get_vocab(model)
        ftype = int(llama_cpp.llama_model_ftype(model))
        template = llama_cpp.llama_model_chat_template(model, None)
        eos = int(llama_cpp.llama_vocab_eos(vocab))
        eot = int(llama_cpp.llama_vocab_eot(vocab))
        bos = int(llama_cpp.llama_vocab_bos(vocab))
        return {
            "desc": buffer.value.decode("utf-8", errors="replace"),
            "ftype": ftype,
            "ftype_name": ftype_name(ftype),
            "has_chat_template": bool(template),
            "bos_token_id": bos,
            "eos_token_id": eos,
            "eot_token_id": eot,
            "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
            "n_vocab": int(llama_cpp.llama_vocab_n_tokens(vocab)),
        }
    finally:
        llama_cpp.llama_model_free(model)
