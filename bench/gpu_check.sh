#!/usr/bin/env bash
# One prepared check for a machine with an NVIDIA GPU, under 8 minutes: the CUDA-marked tests, then
# bench/gpu_check.py (20 steps of the reference recipe on the TinyLlama shape in fp16 and bf16, loralab vs the
# seed-style HF Trainer + PEFT side by side, `loralab plan --device auto` against the measured peak memory and
# step time, batched eval), all in one summary file, OUT/summary.md.
#
#   bash bench/gpu_check.sh [--out DIR] [--data FILE]     # on the GPU machine
#   bash bench/gpu_check.sh --dry-run                     # anywhere: parses, finds its inputs, says what would run
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="gpu_check_out"
data="$root/../shared/data/alpaca_en_1k.json"
dry_run=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --out) out="$2"; shift ;;
        --data) data="$2"; shift ;;
        *) echo "gpu_check.sh: unknown argument $1 (use --dry-run, --out DIR, --data FILE)" >&2; exit 2 ;;
    esac
    shift
done
python="${PYTHON:-python}"
if [ -x "$root/.venv/bin/python" ] && [ -z "${PYTHON:-}" ]; then python="$root/.venv/bin/python"; fi

for input in "$root/bench/gpu_check.py" "$root/bench/train_throughput.py" "$root/tests/test_cuda.py" "$data"; do
    [ -f "$input" ] || { echo "gpu_check.sh: missing input $input" >&2; exit 2; }
done
"$python" -c "import loralab, torch" || { echo "gpu_check.sh: $python cannot import loralab and torch" >&2; exit 2; }
cd "$root"

if [ "$dry_run" = 1 ]; then
    "$python" -m pytest -q -m cuda --collect-only tests/test_cuda.py > /dev/null
    echo "would run: $python -m pytest -q -m cuda tests/test_cuda.py"
    "$python" bench/gpu_check.py --dry-run --out "$out" --data "$data"
    echo "gpu_check.sh --dry-run: ok"
    exit 0
fi

command -v nvidia-smi > /dev/null && nvidia-smi -L
mkdir -p "$out"
start=$(date +%s)
"$python" -m pytest -q -m cuda tests/test_cuda.py 2>&1 | tee "$out/cuda_tests.txt" || echo "(CUDA-marked tests failed: see $out/cuda_tests.txt)"
timeout 420 "$python" bench/gpu_check.py --out "$out" --data "$data"
{ echo; echo "CUDA-marked tests: $(tail -n 1 "$out/cuda_tests.txt")"; echo "wall time: $(( $(date +%s) - start )) s"; } >> "$out/summary.md"
echo "summary: $out/summary.md"
