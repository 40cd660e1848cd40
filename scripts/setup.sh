#!/usr/bin/env bash
# Create .venv with loralab and its dependencies. Safe to rerun: it does nothing when already set up.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
if ! .venv/bin/python -c "import loralab, torch, transformers, peft, pytest" 2>/dev/null; then
  .venv/bin/pip install -q --upgrade pip
  # torch first, pinned: left to the resolver, an unpinned torch can pull a multi-GB CUDA build.
  # A torch already in .venv (say a CUDA build you installed) is kept.
  .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -e ".[dev]"
fi
