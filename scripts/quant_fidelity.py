"""How faithful each quantized conversion is to float32: llava-mlx's convert.py against mlx-vlm's.

    python scripts/quant_fidelity.py [--work DIR] [--mlx-vlm-python /work/venv-bench/bin/python]

Builds the tests' tiny random-weight LLaVA-1.6-Mistral checkpoint (llava-hf layout, float32),
converts it with this project's `convert` and with `python -m mlx_vlm.convert` (from the
benchmark environment, scripts/setup_bench.sh) at 4-bit, 8-bit and each mixed recipe, loads
every conversion with this project's loader (the same forward pass, so only the weights
differ) and prints a Markdown table: the cosine of the logits of the whole merged sequence to
the float32 checkpoint's, the largest logit error relative to the largest float32 logit, how
many of 16 greedy tokens match float32's, and the decoder's bits per weight. Group size 64 and
float32 scales everywhere (mlx-vlm keeps the checkpoint's dtype).
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

from llava_mlx import convert, generate, load  # noqa: E402
from llava_mlx.checkpoint.quantize import RECIPES  # noqa: E402

from fixtures.build import write_hf  # noqa: E402
from fixtures.images import make_images  # noqa: E402

PROMPT = "[INST] <image>\nWhat is shown in this image? [/INST]"
IMAGES = ("tie_wide", "square")
CASES = [("4-bit", dict(q_bits=4)), ("8-bit", dict(q_bits=8))] + [(r, dict(quant_predicate=r)) for r in RECIPES]


def ours(source: Path, out: Path, options: dict):
    convert(str(source), str(out), quantize=True, dtype="float32", progress=False, **options)


def mlx_vlm(python: str, source: Path, out: Path, options: dict):
    """`python -m mlx_vlm.convert -q` (it keeps the checkpoint's float32)."""
    flags = (
        ["--q-bits", str(options["q_bits"])]
        if "q_bits" in options
        else ["--quant-predicate", options["quant_predicate"]]
    )
    command = [python, "-m", "mlx_vlm.convert", "--hf-path", str(source), "--mlx-path", str(out), "-q", *flags]
    subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def decoder_bits_per_weight(model) -> float:
    """Stored bits per decoder weight (packed weights, scales and biases of quantized layers)."""
    stored, count = 0, 0
    for path, module in model.language_model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            stored += sum(getattr(module, k).nbytes for k in ("weight", "scales", "biases")) * 8
            count += module.weight.size * 32 // module.bits
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            stored += module.weight.nbytes * 8
            count += module.weight.size
    return stored / count


def measure(path: Path, reference: dict, image_paths: dict) -> dict:
    model, processor = load(str(path))
    cosines, errors, same = [], [], 0
    for name in IMAGES:
        inputs = processor(PROMPT, [image_paths[name]])
        got = np.array(model(**inputs)[0]).astype(np.float64).ravel()
        want = reference[name]["logits"]
        cosines.append(float(got @ want / np.linalg.norm(got) / np.linalg.norm(want)))
        errors.append(float(np.abs(got - want).max() / np.abs(want).max()))
        tokens = generate(model, processor, PROMPT, [image_paths[name]], max_tokens=16, template=False, ignore_eos=True)
        same += sum(a == b for a, b in zip(tokens.tokens, reference[name]["tokens"]))
    return dict(cosine=min(cosines), error=max(errors), same=same, bpw=decoder_bits_per_weight(model))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    p.add_argument("--mlx-vlm-python", default=os.environ.get("BENCH_VENV", "/work/venv-bench") + "/bin/python")
    args = p.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="quant-fidelity-"))
    source = work / "hf-v1.6-mistral"
    if not (source / "config.json").exists():
        source.mkdir(parents=True, exist_ok=True)
        write_hf("v1.6-mistral", source)
    image_paths = make_images(work / "images", list(IMAGES))
    model, processor = load(str(source))
    reference = {}
    for name in IMAGES:
        inputs = processor(PROMPT, [image_paths[name]])
        tokens = generate(model, processor, PROMPT, [image_paths[name]], max_tokens=16, template=False, ignore_eos=True)
        reference[name] = dict(logits=np.array(model(**inputs)[0]).astype(np.float64).ravel(), tokens=tokens.tokens)
    total = 16 * len(IMAGES)
    print(f"{source}: prompt {PROMPT!r}, images {', '.join(IMAGES)}; greedy tokens out of {total}\n")
    print(
        "| conversion | llava-mlx cosine | mlx-vlm cosine | llava-mlx max err | mlx-vlm max err "
        "| llava-mlx greedy | mlx-vlm greedy | llava-mlx bits/weight | mlx-vlm bits/weight |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, options in CASES:
        slug = label.replace("-", "")
        mine, theirs = work / f"ours-{slug}", work / f"mlx-vlm-{slug}"  # reused when already there
        if not mine.exists():
            ours(source, mine, options)
        if not theirs.exists():
            mlx_vlm(args.mlx_vlm_python, source, theirs, options)
        a, b = measure(mine, reference, image_paths), measure(theirs, reference, image_paths)
        print(
            f"| {label} | {a['cosine']:.6f} | {b['cosine']:.6f} | {a['error']:.4f} | {b['error']:.4f} "
            f"| {a['same']}/{total} | {b['same']}/{total} | {a['bpw']:.2f} | {b['bpw']:.2f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
