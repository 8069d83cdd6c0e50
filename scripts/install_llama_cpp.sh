#!/usr/bin/env bash
# llama.cpp for `qlora-pipeline export --format gguf|gguf-lora` (make gguf; make test runs it).
#
# - llama-cpp-python, built from its sdist (PyPI publishes no wheel): it loads, quantizes and runs
#   the GGUF files the export writes. The built wheel is kept in a wheel folder of the user's cache
#   (QLORA_WHEEL_CACHE, default ~/.cache/qlora-pipeline/wheels), so only the first install on a
#   machine builds (~3-7 min on 2 cores); later ones, fresh clones included, take seconds. (uv's own
#   cache rebuilt it for every new environment: built with config settings, it was not reused.)
# - llama.cpp's own Python converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py, their
#   conversion/ package and gguf-py), which only that sdist ships, kept beside the wheel and copied to
#   <environment>/share/llama.cpp, where the export looks for them.
# Kept out of `make run`: the default pipeline needs none of it.
set -euo pipefail

VERSION=0.3.36
PYTHON=${1:-.venv/bin/python}
BIN=$(dirname "$PYTHON")
PREFIX=$("$PYTHON" -c 'import sys; print(sys.prefix)')
DEST="$PREFIX/share/llama.cpp"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# A portable AVX2 build, not -march=native: on a Xeon whose CPU lists AMX but whose kernel does not
# grant AMX tile state to processes (torch reports the tiles unusable there too), the native build
# crashed (SIGSEGV in libggml-cpu) on every quantized GGUF, the base's own Q4_1 file included. The
# AVX2 build runs on every x86-64 machine this project targets and gives the same numbers; build
# natively yourself (CMAKE_ARGS=-DGGML_NATIVE=ON) for speed on a machine where that works.
FLAGS='-DGGML_NATIVE=OFF;-DGGML_AVX=ON;-DGGML_AVX2=ON;-DGGML_FMA=ON;-DGGML_F16C=ON;-DGGML_BMI2=ON'
PYTAG=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info.major}{sys.version_info.minor}")')
# One folder per version, Python and build flags ("avx2" names FLAGS: rename it with them), so a wheel
# is reused only where it was built the same way.
WHEELS="${QLORA_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/qlora-pipeline/wheels}/llama-cpp-python-$VERSION-$PYTAG-avx2"

# llama.cpp's converters from the same sdist, kept beside the wheel: with both kept, a fresh clone's install
# downloads nothing (the sdist's download alone took ~7 s of every `make test` on a fresh clone).
CONVERTERS="$WHEELS/llama.cpp-$VERSION"
vendor="llama_cpp_python-$VERSION/vendor/llama.cpp"
if ! compgen -G "$WHEELS/llama_cpp_python-$VERSION-*.whl" >/dev/null || [ ! -d "$CONVERTERS" ]; then
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$work"
fi
if ! compgen -G "$WHEELS/llama_cpp_python-$VERSION-*.whl" >/dev/null; then
    echo "install_llama_cpp: building llama-cpp-python $VERSION (once per machine, a few minutes)"
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
        "$BIN/uv" build --quiet --wheel --python "$PYTHON" -C "cmake.args=$FLAGS" \
        --out-dir "$work/wheel" "$work/llama_cpp_python-$VERSION.tar.gz"
    mkdir -p "$WHEELS"
    # Renamed into place: a build killed midway leaves no wheel for the next install to trust.
    for wheel in "$work"/wheel/*.whl; do
        cp "$wheel" "$WHEELS/.$(basename "$wheel").part"
        mv "$WHEELS/.$(basename "$wheel").part" "$WHEELS/$(basename "$wheel")"
    done
fi
# What an install killed while staging the converters left (named by its pid): removed once that process is gone,
# whether or not this install stages them again.
for left in "$WHEELS/.llama.cpp-$VERSION".*.part; do
    [ -e "$left" ] || continue
    pid=${left%.part}
    pid=${pid##*.}
    kill -0 "$pid" 2>/dev/null || rm -rf "$left"
done
if [ ! -d "$CONVERTERS" ]; then
    tar -xzf "$work/llama_cpp_python-$VERSION.tar.gz" -C "$work" \
        "$vendor/convert_hf_to_gguf.py" "$vendor/convert_lora_to_gguf.py" "$vendor/conversion" "$vendor/gguf-py" \
        "$vendor/LICENSE"
    mkdir -p "$WHEELS"
    staged="$WHEELS/.llama.cpp-$VERSION.$$.part"
    mv "$work/$vendor" "$staged"
    # Renamed into place whole, as the wheel; where another install got there first, its copy stays (rename(2)
    # refuses a folder that is not empty, where mv would move this one inside it).
    "$PYTHON" -c 'import os, sys; os.rename(sys.argv[1], sys.argv[2])' "$staged" "$CONVERTERS" 2>/dev/null \
        || rm -rf "$staged"
fi
# sentencepiece: convert_hf_to_gguf.py imports it for every Llama-family tokenizer.
"$BIN/uv" pip install --quiet --python "$PYTHON" "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl "sentencepiece==0.2.3"

rm -rf "$DEST"
mkdir -p "$(dirname "$DEST")"
cp -R "$CONVERTERS" "$DEST"
echo "install_llama_cpp: llama-cpp-python $VERSION and its converters in $DEST"
