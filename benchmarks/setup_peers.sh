#!/usr/bin/env bash
# The peer-benchmark environment (never run in CI): llama.cpp's and ik_llama.cpp's native tools
# built from source, then the shared weights every engine loads.
#
#   bash benchmarks/setup_peers.sh      # once; about 25 minutes of 2 cores (ik_llama.cpp is most of it)
#   python benchmarks/peers.py          # then the benchmark itself
#
# llama.cpp: the source vendored in the llama-cpp-python 0.3.36 sdist (a package registry is all this
# machine reaches). ik_llama.cpp: a source tarball given as IK_TARBALL (default: the newest
# ../shared/peers/ik_llama.cpp-*.tar.gz); skipped when there is none.
# Environment knobs: BENCH_ENV (default bench-env), IK_TARBALL, SKIP_MODELS=1 stops after the builds.
set -euo pipefail
cd "$(dirname "$0")/.."

ENV_DIR=${BENCH_ENV:-bench-env}
PEERS_DIR="$ENV_DIR/peers"
LCP_VERSION=0.3.36
mkdir -p "$PEERS_DIR"

step() { printf '\n== %s (%s)\n' "$1" "$(date +%H:%M:%S)"; }

# GGML_NATIVE=OFF with this CPU's extensions named one by one: on machines whose CPUID reports AMX,
# ggml's AMX kernel died with SIGILL, so AMX is never asked for.
flags=$(grep -m1 '^flags' /proc/cpuinfo)
has() { [[ " $flags " == *" $1 "* ]]; }
GGML_ARGS=(-DGGML_NATIVE=OFF -DGGML_OPENMP=ON -DCMAKE_BUILD_TYPE=Release)
ARCH_FLAGS=""
for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx512f:AVX512 avx512vbmi:AVX512_VBMI \
    avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
    if has "${pair%%:*}"; then GGML_ARGS+=("-DGGML_${pair##*:}=ON"); fi
done
# ik_llama.cpp's fast AVX-512 path wants VL and DQ, which no GGML_ option names (a CMake list: ;-separated)
if has avx512vl && has avx512dq; then ARCH_FLAGS="-mavx512vl;-mavx512dq"; fi
if has bmi2; then ARCH_FLAGS="${ARCH_FLAGS:+$ARCH_FLAGS;}-mbmi2"; fi
COMMON=(-DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON)

step "llama.cpp from the llama-cpp-python $LCP_VERSION sdist"
LCP="$PEERS_DIR/llama.cpp"
if [ ! -d "$LCP" ]; then
    python -m pip download -q --no-deps --no-binary :all: -d "$PEERS_DIR" "llama-cpp-python==$LCP_VERSION"
    tar -xzf "$PEERS_DIR/llama_cpp_python-$LCP_VERSION.tar.gz" -C "$PEERS_DIR"
    mv "$PEERS_DIR/llama_cpp_python-$LCP_VERSION/vendor/llama.cpp" "$LCP"
fi
if [ ! -x "$LCP/build/bin/llama-bench" ] || [ ! -x "$LCP/build/bin/llama-batched-bench" ]; then
    cmake -S "$LCP" -B "$LCP/build" "${GGML_ARGS[@]}" "${COMMON[@]}" -DLLAMA_BUILD_TOOLS=ON \
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF > /dev/null
    nice -n 19 cmake --build "$LCP/build" -j "$(nproc)" --target llama-bench llama-batched-bench \
        llama-quantize llama-server llama-lookup llama-speculative > /dev/null
fi
ls "$LCP/build/bin"

step "ik_llama.cpp"
IK_TARBALL=${IK_TARBALL:-$(ls -t ../shared/peers/ik_llama.cpp-*.tar.gz 2>/dev/null | head -1 || true)}
IK="$PEERS_DIR/ik_llama.cpp"
if [ -n "$IK_TARBALL" ] && [ ! -x "$IK/build/bin/llama-bench" ]; then
    mkdir -p "$IK" && tar -xzf "$IK_TARBALL" -C "$IK" --strip-components 1
    cmake -S "$IK" -B "$IK/build" "${GGML_ARGS[@]}" "${COMMON[@]}" -DLLAMA_BUILD_SERVER=OFF \
        "-DGGML_ARCH_FLAGS=$ARCH_FLAGS" > /dev/null
    nice -n 19 cmake --build "$IK/build" -j "$(nproc)" --target llama-bench > /dev/null
fi
[ -x "$IK/build/bin/llama-bench" ] && echo "ik_llama.cpp: $IK/build/bin/llama-bench" \
    || echo "ik_llama.cpp: not built (no source tarball)"

if [ "${SKIP_MODELS:-0}" = 1 ]; then exit 0; fi

step "shared weights: a 0.5B Qwen2.5-shaped Q4_K_M and a 1.1B Llama-shaped Q4_0, by llama-quantize"
python -m pip install -q sentencepiece  # the 1.1B model's tokenizer, trained offline
python benchmarks/peers.py prepare --llama-cpp-src "$LCP" --llama-cpp-bin "$LCP/build/bin"
step "done"
