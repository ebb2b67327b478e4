#!/usr/bin/env bash
# Build llama.cpp's llama-server and llama-bench (CPU) from the llama.cpp source that PyPI's
# llama-cpp-python 0.3.36 sdist vendors: the newest llama.cpp reachable from the package
# registries that has --spec-type draft-dspark. About 6 minutes on two cores, once.
#
#   bash scripts/build_llamacpp.sh [PREFIX]    # default PREFIX: ~/.cache/dspark_sglang/llamacpp
#   export DSPARK_LLAMA_SERVER=PREFIX/bin/llama-server
#
# LLAMACPP_CMAKE_ARGS is appended to the configure step. On session 12's Intel Xeon (AVX-512 +
# AMX) the GGML_NATIVE build died with SIGILL (exit -4) as soon as it computed; this one ran:
#   LLAMACPP_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
#     -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
#     -DGGML_AVX512_VBMI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
set -euo pipefail
PREFIX="${1:-$HOME/.cache/dspark_sglang/llamacpp}"
PY="${PYTHON:-python3}"
VERSION=0.3.36
SRC="$PREFIX/src"
mkdir -p "$PREFIX/bin" "$SRC"
if [ ! -f "$SRC/llama.cpp/CMakeLists.txt" ]; then
  "$PY" -m pip download --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -d "$SRC"
  tar -xzf "$SRC/llama_cpp_python-$VERSION.tar.gz" -C "$SRC"
  mv "$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp" "$SRC/llama.cpp"
  rm -rf "$SRC/llama_cpp_python-$VERSION" "$SRC/llama_cpp_python-$VERSION.tar.gz"
fi
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
cmake -S "$SRC/llama.cpp" -B "$SRC/build" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_BUILD_IS_DEV=OFF ${LLAMACPP_CMAKE_ARGS:-}
cmake --build "$SRC/build" -j "$(nproc)" --target llama-server llama-bench
for b in llama-server llama-bench; do
  ln -sf "$SRC/build/bin/$b" "$PREFIX/bin/$b"
done
"$PREFIX/bin/llama-server" --help 2>&1 | grep -q draft-dspark && echo "draft-dspark: yes"
echo "export DSPARK_LLAMA_SERVER=$PREFIX/bin/llama-server"
