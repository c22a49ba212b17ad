#!/usr/bin/env bash
# Every GPU check of the project, in one command on a CUDA machine: the device tool's `run` with
# carry [".whl"] (fetched here first by scripts/gpu_wheels.sh: the device image's transformers 5.x
# is outside this project's pins). Sections, in order (default: all of them):
#   probe    scripts/mma_probe.py: the mma.sp register layouts the sparse tensor-core kernel assumes (seconds)
#   tests    the CUDA tests (kernels against the reference, the engine on CUDA, activation offload)
#   kernels  benchmarks/kernels.py: 2:4 kernels vs cuBLAS / cuSPARSELt, thresholds, end-to-end decode
#   selection benchmarks/selection.py: prune_lowest's k-th value cut vs stable sort on CUDA (its sort there)
#   layers   benchmarks/full_size_layers.py: per-layer pruning time and peak memory, 70B / Mixtral
#            shapes (ONLY=Mixtral: that model's rows only)
#   quant    GPTQ and bitsandbytes on CUDA (tests/test_quantized_cuda.py, then the CPU suites of both
#            on the GPU machine); needs the kit of `QUANT=1 scripts/gpu_wheels.sh`, carried as
#            [".whl", ".whl-bnb"]; not in the default list
# QUICK=1 passes --quick to the benchmarks; TIMEOUT=SECONDS stops each section after that long (its
# log so far is kept), so one slow section cannot use up a device lease. Logs and tables go to $OUT
# (the folder the device tool brings back), else ./gpu-results.
set -uo pipefail
cd "$(dirname "$0")/.."
out="$(mkdir -p "${OUT:-gpu-results}" && cd "${OUT:-gpu-results}" && pwd)"
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl $(ls .whl-bnb/*.whl 2>/dev/null) || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
quick=(); [[ "${QUICK:-0}" == 1 ]] && quick=(--quick)
only=(); [[ -n "${ONLY:-}" ]] && only=(--only "$ONLY")
limit=(timeout -k 5 "${TIMEOUT:-0}")
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" 2>&1
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" >> "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"
status=0
for section in ${*:-probe tests kernels selection layers}; do
  echo "=== $section ($(date -u +%T))"
  case "$section" in
    probe) "${limit[@]}" python3 scripts/mma_probe.py 2>&1 | tee "$out/probe.log" ;;
    tests) "${limit[@]}" python3 -m pytest -p no:cacheprovider -q -rs tests/test_kernels.py tests/calibration/test_cuda.py tests/calibration/test_engine.py 2>&1 | tee "$out/tests.log" ;;
    kernels) (cd benchmarks && "${limit[@]}" python3 kernels.py "${quick[@]}" --output "$out/KERNELS.md") 2>&1 | tee "$out/kernels.log" ;;
    quant) "${limit[@]}" python3 -m pytest -p no:cacheprovider -q -rs tests/test_quantized_cuda.py tests/test_gptq.py tests/test_bitsandbytes.py 2>&1 | tee "$out/quant.log" ;;
    selection) (cd benchmarks && "${limit[@]}" python3 selection.py "${quick[@]}" --output "$out/SELECTION.md") 2>&1 | tee "$out/selection.log" ;;
    layers) (cd benchmarks && "${limit[@]}" python3 full_size_layers.py "${quick[@]}" "${only[@]}" --output "$out/GPU_LAYERS.md") 2>&1 | grep -v "it/s]" | tee "$out/layers.log" ;;
    *) echo "unknown section $section (probe, tests, kernels, selection, layers, quant)"; exit 2 ;;
  esac
  code=${PIPESTATUS[0]}
  echo "=== $section ended $(date -u +%T) with exit status $code"
  [[ $code -eq 0 ]] || status=1
done
exit $status
