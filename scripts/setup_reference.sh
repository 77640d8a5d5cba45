#!/usr/bin/env bash
# Create the virtual environment that runs the ORIGINAL LLaVA code (tests/reference/run_original.py):
# llava-torch 1.2.2.post1 (installed --no-deps) on transformers 4.37.2 / tokenizers 0.15 / torch 2.13.0, CPU,
# peft 0.11.1 (the builder's LoRA merge and train.py's LoRA; llava pins 0.4.0, which predates use_rslora) and
# accelerate 0.21.0 (what transformers 4.37.2's Trainer runs on: later releases break it); every other package
# pinned in scripts/reference-constraints.txt.
#
#   scripts/setup_reference.sh [VENV_DIR]      (default: .venv-orig in the repo root)
#
# Idempotent: does nothing if VENV_DIR already imports llava's builder, mm_utils, conversation and peft.
# Quiet on success; exits non-zero (with pip's output) on any failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-orig}"
PY="${PYTHON:-python3}"

check() {
    HF_HUB_OFFLINE=1 "$VENV/bin/python" - <<'EOF' >/dev/null 2>&1
import transformers, tokenizers, torch
assert transformers.__version__ == "4.37.2", transformers.__version__
from llava.model.builder import load_pretrained_model
from llava.mm_utils import process_images, tokenizer_image_token
from llava.conversation import conv_templates
import peft, accelerate
assert peft.__version__ == "0.11.1", peft.__version__
assert accelerate.__version__ == "0.21.0", accelerate.__version__
from peft import PeftModel
EOF
}

NAME=setup_reference.sh
# shellcheck source=scripts/reference_env.sh
source "$ROOT/scripts/reference_env.sh"
run "${PIP[@]}" install "pip==26.3"
# torch first and alone: a local CPU wheel of 2.13.0 is picked up by pip on this machine
run "${PIP[@]}" install "torch==2.13.0"
# Every other package at the version in reference-constraints.txt (transitive ones too).
run "${PIP[@]}" install -c "$ROOT/scripts/reference-constraints.txt" "transformers==4.37.2" tokenizers \
    accelerate huggingface-hub sentencepiece protobuf numpy pillow safetensors
run "${PIP[@]}" install --no-deps "llava-torch==1.2.2.post1"
# peft for the builder's LoRA merge; the constraints keep torch and transformers where they are
run "${PIP[@]}" install -c "$ROOT/scripts/reference-constraints.txt" peft

if ! check; then
    echo "setup_reference.sh: $VENV was created but llava does not import:" >&2
    HF_HUB_OFFLINE=1 "$VENV/bin/python" -c "from llava.model.builder import load_pretrained_model" >&2 || true
    exit 1
fi
