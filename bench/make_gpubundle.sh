#!/usr/bin/env bash
# Rebuilds the two git-ignored bundles that bench/gpu_suite.sh carries to the offline GPU machine and a fresh
# checkout lacks: .gpubundle/site.tgz (bitsandbytes, liger-kernel, Unsloth and its pinned dependencies, as cp312
# manylinux wheels from PyPI unzipped into one folder for PYTHONPATH and trimmed to stay small) and .testwhl/
# (pytest's wheels). The package list and trimming are the ones shared/NOTES.md records working on the device.
#
#   bench/make_gpubundle.sh        # needs PyPI; replaces both bundles in the repo root (PYTHON=... picks pip's python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Wheels for the device's Python 3.12 on x86-64 Linux, without dependency resolution (the device already has torch,
# transformers, peft, accelerate; versions below were checked to satisfy each other's requirements).
WHEEL_FLAGS=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
SITE_PKGS=(
  bitsandbytes==0.50.2 liger-kernel==0.8.5
  unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 torchao==0.18.0
  dill==0.4.1 multiprocess==0.70.19                                     # datasets wants dill<0.4.2, multiprocess<0.70.20
  tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.0 shtab==1.13.0
  cut-cross-entropy==25.1.1 msgspec==0.22.0 json5==0.17.3 structlog==26.1.0 nest-asyncio==1.6.0
  hf-transfer==0.1.9 diffusers==0.42.1
  pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0                                             # pydantic 2.14 wants >=4.16, newer than torch's
)
# pytest 9 needs pygments and packaging>=24; pytest-timeout gives pyproject's `timeout` option its meaning.
TEST_PKGS=(pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.3 pygments==2.21.0 pytest-timeout==2.4.0)
MAX_TGZ_BYTES=50000000

TMP=$(mktemp -d "${TMPDIR:-/tmp}/gpubundle.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

download() {  # download DIR SPEC...: one pip call per wheel, so a failure names it
  local dir=$1 spec log
  shift
  for spec in "$@"; do
    if ! log=$("$PY" -m pip download -q --disable-pip-version-check "${WHEEL_FLAGS[@]}" -d "$dir" "$spec" 2>&1); then
      printf '%s\n' "$log" >&2
      echo "make_gpubundle: no cp312 manylinux x86_64 wheel for $spec on the index" >&2
      exit 1
    fi
  done
}

echo "downloading ${#SITE_PKGS[@]} wheels for the site bundle and ${#TEST_PKGS[@]} for the tests"
download "$TMP/wheels" "${SITE_PKGS[@]}"
download "$TMP/testwhl" "${TEST_PKGS[@]}"

# Unzip every wheel into one folder, as an installer would for purelib/platlib, keeping only what runs:
# unsloth without its browser studio, torchao without its top-level `test` package (it would shadow the stdlib's),
# bitsandbytes with only the CUDA 13.0 library the device's torch (cu130) loads, no console scripts.
"$PY" - "$TMP/site" "$TMP"/wheels/*.whl <<'EOF'
import re
import sys
import zipfile
from pathlib import Path

site = Path(sys.argv[1])
site.mkdir()
owner: dict[str, str] = {}
for wheel in map(Path, sys.argv[2:]):
    dist = wheel.name.split("-")[0].lower()
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            name = info.filename
            if info.is_dir():
                continue
            top = name.split("/")[0]
            if top.endswith(".data"):
                parts = name.split("/")
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue  # scripts, headers, data files: not importable
                name = "/".join(parts[2:])
                top = parts[2]
            if dist == "unsloth" and not (top in ("unsloth", "unsloth_cli") or top.endswith(".dist-info")):
                continue
            if dist == "torchao" and top == "test":
                continue
            if dist == "bitsandbytes" and re.fullmatch(r"bitsandbytes/libbitsandbytes_\w+\.so", name):
                if name != "bitsandbytes/libbitsandbytes_cuda130.so":
                    continue
            if name in owner:
                sys.exit(f"make_gpubundle: {name} is in both {owner[name]} and {wheel.name}")
            owner[name] = wheel.name
            target = site / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(info))
print(f"unpacked {len(sys.argv) - 2} wheels: {len(owner)} files")
EOF

SITE="$TMP/site"
for need in unsloth/__init__.py unsloth_cli unsloth_zoo/__init__.py unsloth_zoo_downloads \
  bitsandbytes/__init__.py bitsandbytes/libbitsandbytes_cuda130.so liger_kernel trl datasets torchao pydantic_core; do
  [ -e "$SITE/$need" ] || { echo "make_gpubundle: $need is missing from the bundle" >&2; exit 1; }
done
if [ -e "$SITE/studio" ]; then echo "make_gpubundle: unsloth's studio slipped into the bundle" >&2; exit 1; fi

mapfile -t TOP < <(cd "$SITE" && ls -A)
tar -czf "$TMP/site.tgz" -C "$SITE" --sort=name --owner=0 --group=0 --numeric-owner "${TOP[@]}"
SIZE=$(stat -c %s "$TMP/site.tgz")
if [ "$SIZE" -gt "$MAX_TGZ_BYTES" ]; then
  echo "make_gpubundle: site.tgz is $SIZE bytes, over $MAX_TGZ_BYTES (the device takes 64 MiB per call)" >&2
  exit 1
fi

# Keep the bundles out of git: info/exclude, as .gitignore is shared.
if EXCLUDE=$(git rev-parse --git-path info/exclude 2>/dev/null); then
  mkdir -p "$(dirname "$EXCLUDE")"
  touch "$EXCLUDE"
  for pattern in /.gpubundle/ /.testwhl/ /.whl/; do
    grep -qxF "$pattern" "$EXCLUDE" || echo "$pattern" >> "$EXCLUDE"
  done
fi

mkdir -p .gpubundle .testwhl
mv -f "$TMP/site.tgz" .gpubundle/site.tgz
rm -f .testwhl/*.whl
mv "$TMP"/testwhl/*.whl .testwhl/
du -sh .gpubundle/site.tgz .testwhl
