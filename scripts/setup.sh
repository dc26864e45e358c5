#!/usr/bin/env bash
# One-time setup: a virtual environment in .venv with the pinned requirements, and the
# GPT-2 tokenizer file cached in data/tokenizer/ so training and tests work offline.
# Safe to re-run: it installs only what changed and keeps an existing tokenizer file.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# Reinstall when the pins or the package's metadata (its entry points) changed.
if ! cat requirements.txt pyproject.toml | cmp -s - .venv/.requirements.installed; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .  # scripts import moe_gpt
  cat requirements.txt pyproject.toml > .venv/.requirements.installed
fi
.venv/bin/python scripts/fetch_tokenizer.py
