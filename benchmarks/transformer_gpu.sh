#!/usr/bin/env bash
# The Hugging Face Llama benchmark (benchmarks/transformer.py --full) on a CUDA GPU, in full
# precision and in bf16 mixed precision, one after the other. Results (JSON and the markdown
# section of docs/benchmarks.md) go to benchmarks/results/gpu/. Exits 0 with a message where no
# CUDA device is present.
#
#   bash benchmarks/transformer_gpu.sh [extra transformer.py options, e.g. --examples 64]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
"$PYTHON" -c 'import torch, transformers, peft, source_callback' # fails loudly without them
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "no CUDA device is available here; nothing was run."
    exit 0
fi
out=benchmarks/results/gpu
mkdir -p "$out"
for precision in 32-true bf16-mixed; do
    "$PYTHON" benchmarks/transformer.py --full --device cuda --precision "$precision" \
        --out "$out/transformer-$precision.json" --markdown "$out/transformer-$precision.md" "$@"
done
echo "results in $out"
