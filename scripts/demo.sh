#!/usr/bin/env bash
# Set up, then prune the embedded SmolLM2-135M with Wanda 50 % and print dense vs pruned perplexity.
# Extra arguments go to optimum-prune (e.g. --method sparsegpt --sparsity 2:4).
source "$(dirname "$0")/env.sh"
cd "$ROOT"
exec "$PY" -m optimum_prune.cli --method wanda --sparsity 0.5 --calibration-samples 32 --seq-len 512 \
  --eval --eval-tokens 16384 --output pruned-smollm2 "$@"
