#!/usr/bin/env bash
# Create the virtual environment that runs the ORIGINAL LLaVA code (tests/reference/run_original.py):
# llava-torch 1.2.2.post1 (installed --no-deps) on transformers 4.37.2 / tokenizers 0.15 / torch 2.13.0, CPU,
# peft 0.11.1 (the builder's LoRA merge and train.py's LoRA; llava pins 0.4.0, which predates use_rslora) and
# accelerate 0.21.0 (what transformers 4.37.2's Trainer runs on: later releases break it); every other package
# pinned in scripts/reference-constraints.txt.
#
# Beside it, in VENV_DIR/s2 (on PYTHONPATH when tests/reference/run_original.py runs an S2
# checkpoint): the same code at the commit that added the S2 tower (c121f04, from
# $LLAVA_ORIGINAL_SOURCE, else ../shared/reference/llava-original, else git) with S2-Wrapper
# (9c008a3) and einops 0.6.1, the original's inference otherwise unchanged.
#
#   scripts/setup_reference.sh [VENV_DIR]      (default: .venv-orig in the repo root)
#
# Idempotent: does nothing if VENV_DIR already imports llava's builder, mm_utils, conversation and peft.
# Quiet on success; exits non-zero (with pip's output) on any failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-orig}"
PY="${PYTHON:-python3}"

LLAVA_S2="git+https://github.com/haotian-liu/LLaVA@c121f0432da27facab705978f83c4ada465e46fd"
S2WRAPPER="git+https://github.com/bfshi/scaling_on_scales@9c008a37540e761f53574b488979db6e49a64312"
ORIGIN="$(git -C "$ROOT" remote get-url origin 2>/dev/null || true)"
for shared in "$ROOT/../shared/reference" "$ORIGIN/../shared/reference"; do
    if [ -f "$shared/llava-original/pyproject.toml" ] && [ -f "$shared/s2wrapper/setup.py" ]; then
        LLAVA_S2="$shared/llava-original" S2WRAPPER="$shared/s2wrapper"
        break
    fi
done
LLAVA_S2="${LLAVA_ORIGINAL_SOURCE:-$LLAVA_S2}"

check() {
    HF_HUB_OFFLINE=1 PYTHONPATH="$VENV/s2" "$VENV/bin/python" -c \
        "from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTowerS2; import s2wrapper" \
        >/dev/null 2>&1 || return 1
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
# The S2 commit apart: PYTHONPATH="$VENV/s2" puts it ahead of the release for S2 checkpoints only
rm -rf "$VENV/s2"
run "${PIP[@]}" install --no-deps --target "$VENV/s2" "einops==0.6.1"
if [ -d "$LLAVA_S2/llava" ] && [ -d "$S2WRAPPER/s2wrapper" ]; then
    # the workspace's snapshots leave out the README their setup files read: copy the packages
    cp -r "$LLAVA_S2/llava" "$S2WRAPPER/s2wrapper" "$VENV/s2/"
else
    run "${PIP[@]}" install --no-deps --target "$VENV/s2" "$LLAVA_S2" "$S2WRAPPER"
fi

if ! check; then
    echo "setup_reference.sh: $VENV was created but llava does not import:" >&2
    HF_HUB_OFFLINE=1 "$VENV/bin/python" -c "from llava.model.builder import load_pretrained_model" >&2 || true
    exit 1
fi
