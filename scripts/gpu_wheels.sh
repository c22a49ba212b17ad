#!/usr/bin/env bash
# Fetch, on this (CPU) machine, the wheels a GPU session carries to the device machine: its image
# has torch, Triton and pytest but transformers 5.x, which this project's pins exclude. They go into
# ./.whl (ignored by git); scripts/gpu_checks.sh installs them there. Python 3.12, x86_64 (the device's).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2 optimum==2.1.0 accelerate==1.11.0 \
  datasets==4.0.0 dill==0.3.8 multiprocess==0.70.16 fsspec==2025.3.0 peft==0.18.1 torch-pruning==1.6.1
du -sh .whl
