#!/usr/bin/env bash
# One-time setup: a virtual environment in .venv with the pinned requirements, and the
# GPT-2 tokenizer file cached in data/tokenizer/ so training and tests work offline.
# Safe to re-run: it installs only what changed and keeps an existing tokenizer file.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
UV_VERSION=0.13.9
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# uv installs the same pinned wheels as pip, downloading and unpacking in parallel: on a 2-core
# machine 30 s instead of pip's 82 s (docs/testing.md), which is most of a fresh clone's setup.
if [ ! -x .venv/bin/uv ] || [ "$(.venv/bin/uv --version)" != "uv $UV_VERSION" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
fi
# uv does not read pip's configuration: pass on a machine's local wheel folder (where a CPU build
# of torch may lie). Without one, torch==2.13.0 resolves from PyPI, to the CUDA build on Linux.
uv_install=(.venv/bin/uv pip install --quiet --python .venv/bin/python)
for folder in ${PIP_FIND_LINKS:-}; do
  uv_install+=(--find-links "$folder")
done
# Reinstall when the pins or the package's metadata (its entry points) changed.
if ! cat requirements.txt pyproject.toml | cmp -s - .venv/.requirements.installed; then
  # Byte-compiled now, once: where PYTHONDONTWRITEBYTECODE is set, every process would otherwise
  # compile torch's sources again at import (a fresh-clone CI run took 14 min that way).
  "${uv_install[@]}" --compile-bytecode -r requirements.txt
  "${uv_install[@]}" --no-deps -e .  # scripts import moe_gpt
  cat requirements.txt pyproject.toml > .venv/.requirements.installed
fi
.venv/bin/python scripts/fetch_tokenizer.py
