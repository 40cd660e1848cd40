#!/usr/bin/env bash
# Build loralab's wheel, install it into a fresh venv (not editable, outside the checkout's src/), and run
# `loralab demo` from there: what a user who runs `pip install loralab` gets.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/python -m build --wheel --outdir "$work/dist" . >/dev/null
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q "torch==2.13.0"
"$work/venv/bin/pip" install -q "$work"/dist/loralab-*.whl
cd "$work"  # away from the checkout, so nothing is imported from src/
"$work/venv/bin/python" -c "import loralab, sys; assert '/src/' not in loralab.__file__, loralab.__file__; print('loralab from', loralab.__file__)"
"$work/venv/bin/loralab" demo --out "$work/demo"
find "$work/demo" -name report.html -size +0 | grep -q . || { echo "wheel-check: the demo wrote no report.html" >&2; exit 1; }
echo "wheel-check: the installed wheel ran loralab demo"
