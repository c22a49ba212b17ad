#!/usr/bin/env bash
# Fetch, on this (CPU) machine, the wheels a GPU session carries to the device machine: its image
# has torch, Triton and pytest but transformers 5.x, which this project's pins exclude. They go into
# ./.whl (ignored by git); scripts/gpu_checks.sh installs them there. Python 3.12, x86_64 (the device's).
# With QUANT=1 it also builds the GPTQ stack (gptqmodel and the small packages its import needs, as
# scripts/env.sh installs them; pypcre is a C extension built with a local Python 3.12 and links the
# system's libpcre2-8) into ./.whl, and fetches bitsandbytes (43 MB) into ./.whl-bnb: the `quant`
# section of gpu_checks.sh carries [".whl", ".whl-bnb"] — about 62 MiB with the tree, under the
# device tool's 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
for kit in /.whl/ /.whl-bnb/; do grep -qx "$kit" .git/info/exclude 2>/dev/null || echo "$kit" >> .git/info/exclude; done
download() {
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 "$@"
}
download -d .whl transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2 optimum==2.1.0 accelerate==1.11.0 \
  datasets==4.0.0 dill==0.3.8 multiprocess==0.70.16 fsspec==2025.3.0 peft==0.18.1 torch-pruning==1.6.1
if [[ "${QUANT:-0}" == 1 ]]; then
  pin() { grep -m1 "^$1==" constraints.txt; }
  download -d .whl "$(pin threadpoolctl)"
  download -d .whl-bnb "$(pin bitsandbytes)"
  .venv/bin/python -m pip wheel --quiet --no-deps -w .whl "$(pin logbar)" "$(pin device-smi)" "$(pin tokenicer)"
  BUILD_CUDA_EXT=0 .venv/bin/python -m pip wheel --quiet --no-deps --no-build-isolation -w .whl "$(pin gptqmodel)"
  PYENV_VERSION="${PYENV_VERSION:-3.12.1}" python3.12 -m pip wheel --quiet --no-deps -w .whl "$(pin pypcre)"
fi
du -sh .whl .whl-bnb 2>/dev/null
