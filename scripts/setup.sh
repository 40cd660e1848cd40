#!/usr/bin/env bash
# Create .venv with loralab and what it needs. `scripts/setup.sh` installs what the demo needs (loralab and its
# dependencies, nothing compiled); `scripts/setup.sh dev` adds the test, lint and docs tools (the dev extra).
# Safe to rerun: it does nothing when already set up, and reinstalls when pyproject.toml has changed since the
# last install of that kind (a stamp in .venv holds its hash).
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:-base}"
case "$kind" in
  base) target="."; check="import loralab, torch, transformers, peft" ;;
  dev) target=".[dev]"; check="import loralab, torch, transformers, peft, pytest, importlinter, mkdocs" ;;
  *) echo "usage: scripts/setup.sh [dev]" >&2; exit 2 ;;
esac
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
stamp=".venv/.loralab-$kind.sha256"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! .venv/bin/python -c "$check" 2>/dev/null; then
  .venv/bin/pip install -q --upgrade pip
  # torch first, pinned: left to the resolver, an unpinned torch can pull a multi-GB CUDA build.
  # A torch already in .venv (say a CUDA build you installed) is kept.
  .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -e "$target"
  echo "$want" > "$stamp"
fi
