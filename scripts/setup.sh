#!/usr/bin/env bash
# Create .venv with loralab and its dependencies. Safe to rerun: it does nothing when already set up,
# and reinstalls when pyproject.toml has changed since the last install (a stamp in .venv holds its hash).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
stamp=.venv/.loralab-pyproject.sha256
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! .venv/bin/python -c "import loralab, torch, transformers, peft, pytest" 2>/dev/null || ! [ -x .venv/bin/ruff ]; then
  .venv/bin/pip install -q --upgrade pip
  # torch first, pinned: left to the resolver, an unpinned torch can pull a multi-GB CUDA build.
  # A torch already in .venv (say a CUDA build you installed) is kept.
  .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi
