#!/usr/bin/env bash
# Create the virtual environment that runs the LLaVA-NeXT code (tests/reference/run_next.py), the
# code lmms-lab's checkpoints were released with: its `llava` package (the original LLaVA code's
# name too, hence an environment of its own) on transformers 4.45.2 / torch 2.13.0, CPU, no
# torchvision, Pillow at the project's version (Pillow releases resize the same picture
# differently), accelerate 0.34.2 and peft 0.13.2 for its trainer; every package pinned in
# scripts/reference-next-constraints.txt.
#
#   scripts/setup_reference_next.sh [VENV_DIR]      (default: .venv-next in the repo root)
#
# The code comes from $LLAVA_NEXT_SOURCE, else ../shared/reference/llava-next beside this
# checkout or beside the checkout it was cloned from (this workspace), else git at the pinned
# commit. Idempotent; quiet on success; non-zero with pip's output on failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-next}"
PY="${PYTHON:-python3}"
COMMIT="df179663ae8b83207df100a1f7af24caec633ff9"
SOURCE="git+https://github.com/LLaVA-VL/LLaVA-NeXT@$COMMIT"
ORIGIN="$(git -C "$ROOT" remote get-url origin 2>/dev/null || true)"
for candidate in "${LLAVA_NEXT_SOURCE:-}" "$ROOT/../shared/reference/llava-next" "$ORIGIN/../shared/reference/llava-next"; do
    if [ -n "$candidate" ] && [ -f "$candidate/pyproject.toml" ]; then
        SOURCE="$candidate"
        break
    fi
done

check() {
    HF_HUB_OFFLINE=1 "$VENV/bin/python" - <<'PYEOF' >/dev/null 2>&1
import transformers, torch
assert transformers.__version__ == "4.45.2", transformers.__version__
from llava.model.builder import load_pretrained_model
from llava.mm_utils import process_images, tokenizer_image_token
from llava.conversation import conv_templates
from llava.model.language_model.llava_qwen import LlavaQwenForCausalLM
import accelerate, peft
assert accelerate.__version__ == "0.34.2", accelerate.__version__  # what its trainer runs on (1.x dropped dispatch_batches)
assert peft.__version__ == "0.13.2", peft.__version__
PYEOF
}

NAME=setup_reference_next.sh
# shellcheck source=scripts/reference_env.sh
source "$ROOT/scripts/reference_env.sh"
run "${PIP[@]}" install "torch==2.13.0"
run "${PIP[@]}" install -c "$ROOT/scripts/reference-next-constraints.txt" "transformers==4.45.2" tokenizers \
    accelerate huggingface-hub sentencepiece protobuf numpy pillow safetensors einops peft
run "${PIP[@]}" install --no-deps "$SOURCE"

if ! check; then
    echo "setup_reference_next.sh: $VENV was created but the LLaVA-NeXT code does not import:" >&2
    HF_HUB_OFFLINE=1 "$VENV/bin/python" -c "from llava.model.builder import load_pretrained_model" >&2 || true
    exit 1
fi
