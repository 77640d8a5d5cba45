#!/usr/bin/env bash
# Create the benchmark virtualenv (separate from the dev venv so that mlx-vlm's pins
# cannot disturb it): mlx (CPU backend on Linux, Metal on macOS), mlx-lm, mlx-vlm,
# torch (CPU, pinned), transformers, matplotlib, the official openai client (the serving
# suite's load); then install llava-mlx itself.
#
#   bash scripts/setup_bench.sh [VENV_DIR]        # default: /work/venv-bench or $BENCH_VENV
#   $VENV_DIR/bin/python bench.py                 # both suites (python -m benchmarks is the same)
#
# On Linux, MLX's CPU backend multiplies matrices with the reference BLAS its wheel bundles;
# Debian's OpenBLAS is much faster (apt-get install libopenblas0-pthread); the benchmark preloads
# it into every MLX process (not into PyTorch, which brings MKL):
#   $VENV_DIR/bin/python bench.py --blas /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${BENCH_VENV:-/work/venv-bench}}"
PY="${PYTHON:-python3}"

# Versions known to work together (checked on Linux x86_64, Python 3.11).
MLX_VLM_SPEC="${MLX_VLM_SPEC:-mlx-vlm==0.7.10}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"   # never unpinned: an unpinned torch pulls GBs of CUDA wheels

if [ "$(uname -s)" = "Darwin" ]; then MLX_SPEC="mlx"; else MLX_SPEC="mlx[cpu]"; fi

"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first and pinned, so that nothing later resolves a different (CUDA) build.
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
"$VENV/bin/python" -m pip install -q "$MLX_SPEC" mlx-lm "$MLX_VLM_SPEC" "$TORCH_SPEC" \
    transformers tokenizers sentencepiece safetensors numpy pillow matplotlib psutil openai
if [ -f "$HERE/pyproject.toml" ]; then
    "$VENV/bin/python" -m pip install -q --no-deps -e "$HERE"
fi
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
for p in ["mlx", "mlx-lm", "mlx-vlm", "torch", "transformers", "tokenizers", "matplotlib", "numpy", "openai"]:
    try:
        print(f"{p:14s} {md.version(p)}")
    except md.PackageNotFoundError:
        print(f"{p:14s} MISSING")
PY
