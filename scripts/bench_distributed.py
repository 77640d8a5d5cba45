"""What two ranks cost: one process against `mlx.launch -n 2` (tensor and pipeline), and
where the vision tower should run. Random weights (bench.py's checkpoint builder).

    python scripts/bench_distributed.py fits                             # docs/distributed.md's what-fits-where table
    python scripts/bench_distributed.py build /tmp/bench-dist           # a LLaVA-1.5 'medium' checkpoint
    python scripts/bench_distributed.py run /tmp/bench-dist              # one process
    mlx.launch -n 2 --backend ring -- python scripts/bench_distributed.py run /tmp/bench-dist [--pipeline]

    python scripts/bench_distributed.py serve /tmp/bench-dist [--server-script OLD/server.py]

`run` prints one JSON line per rank: load time, prompt and generation tokens/s, MLX's peak
memory, the decoder-layer and vision bytes held, and the two vision placements timed on
the same image: rank 0 encodes and shares the features (what llava-mlx does) against every
rank encoding the image itself (each rank with the whole tower).

`serve` starts `mlx.launch -n 2 --backend ring -- python server.py` on the checkpoint itself
(tensor, then pipeline) and streams text answers of `--tokens` tokens through the official
client: the decode tokens/s of the served answer (first token to last), to set against `run`'s
generate() under the same launch.
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# LLaVA-1.5 (576 image positions) with a Mistral-like decoder: GQA 16 heads / 4 KV heads,
# 4 layers; a CLIP-like tower, 4 layers (3 run). Small enough for a busy 2-core CPU.
MEDIUM_TEXT = dict(model_type="mistral", hidden_size=1024, num_hidden_layers=4, num_attention_heads=16,
                   num_key_value_heads=4, intermediate_size=2816, rope_theta=1000000.0)  # fmt: skip
MEDIUM_VISION = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048,
                     image_size=336, patch_size=14, projection_dim=512)  # fmt: skip
QUESTION = "Describe this image in detail."


def build(out: Path):
    from benchmarks.checkpoints import SHAPES, build_checkpoint, make_image

    SHAPES["medium"] = {"llava-1.5": (MEDIUM_TEXT, MEDIUM_VISION)}
    build_checkpoint("llava-1.5", "medium", "float32", out)
    make_image((640, 480), 1, out / "image.png")
    print(out)


# The released LLaVA shapes (llava-hf configs), CLIP ViT-L/14-336 tower.
CLIP_L = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
              image_size=336, patch_size=14)  # fmt: skip
REAL = {
    "LLaVA-1.5-7B": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                         intermediate_size=11008, vocab_size=32064),
    "LLaVA-1.6-Mistral-7B": dict(model_type="mistral", hidden_size=4096, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8,
                                 intermediate_size=14336, vocab_size=32064),
    "LLaVA-1.5-13B": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                          intermediate_size=13824, vocab_size=32064),
    "LLaVA-1.6-34B": dict(hidden_size=7168, num_hidden_layers=60, num_attention_heads=56,
                          num_key_value_heads=8, intermediate_size=20480, vocab_size=64064),
}  # fmt: skip
MACS = (16, 24, 32, 64)  # GB of unified memory
USABLE = 0.7  # of it for the weights: the rest for KV cache, activations and macOS


def per_mac(name: str, bits, macs: int):
    """(total, rank 0's share) in bytes: rank 0 holds the tower, every rank the embeddings,
    the head and 1/macs of the decoder layers."""
    from llava_mlx.checkpoint.quantize import estimate_bytes
    from llava_mlx.model import LlavaConfig

    def size(layers, **kw):
        text = {"model_type": "llama", **REAL[name], "num_hidden_layers": layers}
        return estimate_bytes(LlavaConfig(text_config=text, vision_config=CLIP_L), bits=bits, **kw)

    layers = REAL[name]["num_hidden_layers"]
    total, one, two = size(layers), size(1), size(2)
    decoder = (two - one) * layers
    return total, total - decoder + decoder / macs


def fits():
    rows = ["| model | weights | GB | per Mac, 2 Macs | per Mac, 4 Macs | smallest Mac: 1 / 2 / 4 Macs |",
            "| --- | --- | ---: | ---: | ---: | --- |"]  # fmt: skip
    for name in REAL:
        for bits, label in ((None, "float16"), (8, "8-bit"), (4, "4-bit")):
            shares = [per_mac(name, bits, n) for n in (1, 2, 4)]
            smallest = [next((f"{m} GB" for m in MACS if s <= USABLE * m * 1e9), "none") for _, s in shares]
            rows.append(
                f"| {name} | {label} | {shares[0][0] / 1e9:.1f} | {shares[1][1] / 1e9:.1f} | "
                f"{shares[2][1] / 1e9:.1f} | {' / '.join(smallest)} |"
            )
    print("\n".join(rows))


def held(model, *prefixes) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for k, v in tree_flatten(model.parameters()) if k.startswith(prefixes))


def vision_placements(model, processor, path: Path, image: Path, group) -> dict:
    """Seconds until every rank has the image features, both ways (best of 2)."""
    import mlx.core as mx

    from llava_mlx.cache import SessionCache
    from llava_mlx.checkpoint.load import load_model
    from llava_mlx.distributed.share import shared_features
    from llava_mlx.processor import load_image

    def barrier():
        if group is not None:
            mx.eval(mx.distributed.all_sum(mx.array(1), group=group))

    def best(fn):
        times = []
        for _ in range(2):
            barrier()
            tic = time.perf_counter()
            fn()
            barrier()
            times.append(time.perf_counter() - tic)
        return min(times)

    encode = lambda: SessionCache().image_features(model, processor, [load_image(image)])  # noqa: E731
    shared = best(lambda: shared_features(model, encode))
    whole, _, _ = load_model(path)  # unsharded and lazy: only the tower's weights get read
    pixels, sizes = processor.preprocess([load_image(image)])
    everywhere = best(lambda: mx.eval(whole.image_features(mx.array(pixels), sizes)))
    tower = held(whole, "vision_tower.", "multi_modal_projector.")
    return dict(rank0_shares_s=shared, every_rank_encodes_s=everywhere, tower_bytes=tower)


def run(path: Path, pipeline: bool, tokens: int):
    import mlx.core as mx

    from llava_mlx import generate, load
    from llava_mlx.distributed.group import group_of

    tic = time.perf_counter()
    model, processor = load(str(path), pipeline=pipeline)
    mx.eval(model.parameters())
    load_s = time.perf_counter() - tic
    group = group_of(model)
    image = path / "image.png"
    options = dict(images=[image], max_tokens=tokens, ignore_eos=True)
    mx.reset_peak_memory()  # no warm-up: MLX compiles nothing ahead, and a prefill here is minutes
    r = generate(model, processor, QUESTION, **options)
    result = dict(
        rank=group.rank() if group else 0,
        size=group.size() if group else 1,
        mode=model.sharding.mode if group else "single",
        load_s=round(load_s, 2),
        prompt_tokens=r.prompt_tokens,
        prompt_tps=round(r.prompt_tps, 1),
        generation_tps=round(r.generation_tps, 2),
        peak_memory_gb=round(r.peak_memory, 3),
        layer_bytes=held(model, "language_model.model.layers."),
        vision_bytes=held(model, "vision_tower.", "multi_modal_projector."),
    )
    if group is not None:
        result.update({k: round(v, 3) for k, v in vision_placements(model, processor, path, image, group).items()})
    print(json.dumps(result), flush=True)


def serve(path: Path, server_script: Path, tokens: int, answers: int = 3):
    """Decode tokens/s of answers served by two ranks (tensor, then pipeline)."""
    import os
    import re
    import signal
    import socket
    import subprocess
    import tempfile

    from openai import OpenAI

    launch = Path(sys.executable).parent / "mlx.launch"
    for mode in ("tensor", "pipeline"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ring = s.getsockname()[1]
        log = Path(tempfile.mkstemp(suffix=".log")[1])
        command = [launch, "-n", "2", "--backend", "ring", "-p", str(ring + 10), "--", sys.executable]
        command += [str(server_script), "--model", str(path), "--port", "0", "--max-tokens", str(tokens)]
        command += ["--pipeline"] if mode == "pipeline" else []
        with open(log, "w") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            while not (found := re.search(r"on http://127\.0\.0\.1:(\d+)", log.read_text())):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(log.read_text()[-2000:])
                time.sleep(0.5)
            api = OpenAI(base_url=f"http://127.0.0.1:{found.group(1)}/v1", api_key="x", timeout=600, max_retries=0)
            rates = []
            for i in range(answers + 1):  # the first one warms up
                arrivals = []
                for chunk in api.chat.completions.create(
                    model="m",
                    messages=[{"role": "user", "content": f"Tell me story number {i}."}],
                    max_tokens=tokens,
                    stream=True,
                    stream_options={"include_usage": True},
                ):
                    if chunk.choices and chunk.choices[0].delta.content:
                        arrivals.append(time.monotonic())
                    if chunk.usage is not None:
                        generated = chunk.usage.completion_tokens
                if i and generated > 1:
                    rates.append((generated - 1) / (arrivals[-1] - arrivals[0]))
            rates.sort()
            print(json.dumps(dict(mode=mode, served_decode_tps=round(rates[len(rates) // 2], 2), answers=rates)))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("build", "run", "fits", "serve"))
    p.add_argument("path", type=Path, nargs="?")
    p.add_argument("--pipeline", action="store_true")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--server-script", type=Path, default=ROOT / "server.py", help="serve: the server to measure")
    a = p.parse_args()
    if a.action == "fits":
        return fits()
    if a.action == "serve":
        return serve(a.path, a.server_script, a.tokens)
    build(a.path) if a.action == "build" else run(a.path, a.pipeline, a.tokens)


if __name__ == "__main__":
    main()
