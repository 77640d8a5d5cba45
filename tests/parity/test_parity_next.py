"""Parity with the LLaVA-NeXT code (lmms-lab's releases) for its own checkpoint layout:
`llava_qwen` with its SigLIP tower named by hub id, anyres_max_9 over the 36 pinpoints in their
string form, spatial_unpad, as LLaVA-OneVision's originals (lmms-lab/llava-onevision-qwen2-*);
`llava_llama` with CLIP ViT-L/14-336 named by hub id, anyres, Llama-3, as
lmms-lab/llama3-llava-next-8b, and the code's other merges, 'pad' and videos on it; the code's
`llava_mistral` and `llava_mixtral` classes in the same setting.

The checkpoint is written by that code's own classes (tests/reference/run_next.py, in
.venv-next) and run by its `load_pretrained_model`; ours loads the same directory, the tower's
config from the same Hugging Face cache. Same token ids, same crops, logits of the whole merged
sequence within 1e-4 of max|logit|, 16 greedy tokens equal.
"""

import json
import os
import shutil
import sys

import huggingface_hub.constants
import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from llava_mlx import LlavaError, generate, load
from llava_mlx.model import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from llava_mlx.video import load_video

from conftest import ROOT
from reference.next import load_next, next_env, run_next
from reference.original import assert_logits_close, check_case

QWEN_PROMPT = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
# One image each: wide, tall, small, a 2048x311 strip, either side of anyres_max_9's downscale
# threshold, far above it, one tile; then two and three images in one prompt (each padded to one
# crop, as lmms-lab's Qwen2 releases were trained and the OneVision tutorial runs them).
CASES = {
    "wide": ["wide"],
    "tall": ["tall"],
    "tiny": ["tiny"],
    "strip": ["strip"],
    "under": ["under"],
    "over": ["over"],
    "big": ["big"],
    "square": ["square"],
    "two": ["wide", "tall"],
    "three": ["tiny", "strip", "square"],
}
TURNS = [["What is in the image?", "A red car."], ["And behind it?", None]]
# The CLIP checkpoints, prompted by conversation.py's template for each (two turns, the images
# in the first): name -> (checkpoint, images, conv_mode).
TEMPLATE_CASES = {
    "llama-wide": ("next-llama", ["wide"], "llava_llama_3"),
    "llama-tall": ("next-llama", ["tall"], "llava_llama_3"),
    "llama-strip": ("next-llama", ["strip"], "llava_llama_3"),
    "llama-two": ("next-llama", ["wide", "tall"], "llava_llama_3"),
    "llama-maxpool": ("next-llama-maxpool", ["wide"], "llava_llama_3"),
    "llama-nobase": ("next-llama-nobase", ["tall"], "llava_llama_3"),
    "llama-pad": ("next-llama-pad", ["wide"], "llava_llama_3"),
    "mistral-wide": ("next-mistral", ["wide"], "mistral_instruct"),
    "mixtral-tall": ("next-mixtral", ["tall"], "mistral_instruct"),
}
FRAMES = 8
# Videos: each newline position and each pooling mode (tests/reference/run_next.py's variants),
# and a picture and a clip in one prompt. The code marks a video with <image> (its modality
# says video); ours with <video>.
VIDEO_CASES = {
    "video-grid-bilinear": ("next-qwen", False),
    "video-frame-average": ("next-qwen-frame-average", False),
    "video-onetoken-max": ("next-qwen-onetoken-max", False),
    "video-notoken-bilinear": ("next-qwen-notoken-bilinear", False),
    "picture-and-clip": ("next-qwen", True),
    "video-clip-frame-average": ("next-llama-video", False),  # CLIP frames: shortest edge, centre crop
    "video-nine-frames-given": ("next-qwen", False),
}
# Frames passed already decoded are used as given, as the code takes them (no num_frames: not sampled).
GIVEN_FRAMES = {"video-nine-frames-given": "frames9"}


@pytest.fixture(scope="session")
def next_images(family, tmp_path_factory):
    images = {name: family[f"image-{name}"] for name in ("wide", "tall", "tiny", "under", "over", "big", "square")}
    strip = tmp_path_factory.mktemp("next-images") / "strip_2048x311.png"
    x = np.linspace(0, 255, 2048, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, 311, dtype=np.float32)[:, None, None]
    Image.fromarray(np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], -1).astype(np.uint8)).save(strip)
    frames = tmp_path_factory.mktemp("next-frames") / "frames.npy"
    np.save(frames, load_video(str(family["clip.mp4"]), FRAMES))
    nine = frames.with_name("frames9.npy")  # a clip decoded elsewhere, one frame more than num_frames
    np.save(nine, load_video(str(family["clip.mp4"]), 9))
    return {**images, "strip": strip, "frames": frames, "frames9": nine}


@pytest.fixture(scope="session")
def next_reference(next_fixtures, next_images, tmp_path_factory):
    """Every case run once by the LLaVA-NeXT code: name -> npz."""

    out = tmp_path_factory.mktemp("next-reference")
    checkpoint = str(next_fixtures / "next-qwen")
    jobs = [
        {
            "name": name,
            "checkpoint": checkpoint,
            "images": [str(next_images[i]) for i in images],
            "prompt": QWEN_PROMPT.format("<image>\n" * len(images) + "What is in the image?")
            + "<|im_start|>assistant\n",
            **({"image_aspect_ratio": "pad"} if len(images) > 1 else {}),  # as the OneVision tutorial runs them
        }
        for name, images in CASES.items()
    ]
    for name, (checkpoint_name, picture) in VIDEO_CASES.items():
        media = "<image>\n" * (2 if picture else 1)
        jobs.append(
            {
                "name": name,
                "checkpoint": str(next_fixtures / checkpoint_name),
                "images": [str(next_images["wide"])] if picture else [],
                "video_frames": str(next_images[GIVEN_FRAMES.get(name, "frames")]),
                "prompt": QWEN_PROMPT.format(media + "What happens?") + "<|im_start|>assistant\n",
            }
        )
    jobs.append(
        {"name": "template", "checkpoint": checkpoint, "images": [str(next_images["wide"])], "turns": TURNS}
        | {"conv_mode": "qwen_1_5"}
    )
    for name, (checkpoint_name, images, conv_mode) in TEMPLATE_CASES.items():
        jobs.append(
            {
                "name": name,
                "checkpoint": str(next_fixtures / checkpoint_name),
                "images": [str(next_images[i]) for i in images],
                "turns": TURNS,
                "conv_mode": conv_mode,
            }
        )
    (out / "jobs.json").write_text(json.dumps(jobs))
    run_next("run", str(out / "jobs.json"), str(out), env=next_env(next_fixtures))
    return {job["name"]: dict(np.load(out / f"{job['name']}.npz")) for job in jobs}


@pytest.fixture(scope="session")
def next_loaded(next_fixtures):
    return load_next(next_fixtures, next_fixtures / "next-qwen")


def test_the_layout_reads_as_the_code_builds_it(next_loaded):
    config = next_loaded[0].config
    assert config.vision_model_type == "siglip" and config.image_processor == "siglip"
    assert config.vision.num_hidden_layers == 2  # the tower's 3, its last deleted by the code
    assert config.image_aspect_ratio == "anyres_max_9" and len(config.image_grid_pinpoints) == 36
    assert config.image_grid_pinpoints[:2] == [[384, 384], [384, 768]]  # "(1x1),(1x2),...": (width, height)
    assert next_loaded[1].vocabulary == len(next_loaded[1].tokenizer._tokenizer)  # cut to len(tokenizer)


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_the_next_code(name, next_loaded, next_reference, next_images):
    model, processor = next_loaded
    ref = next_reference[name]
    check_case(model, processor, ref, [str(next_images[i]) for i in CASES[name]], str(ref["prompt"]))


@pytest.fixture(scope="session")
def next_models(next_fixtures, next_loaded):
    """next_models(name) -> (model, processor), each checkpoint loaded once."""
    cache = {"next-qwen": next_loaded}

    def get(name):
        if name not in cache:
            cache[name] = load_next(next_fixtures, next_fixtures / name)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(TEMPLATE_CASES))
def test_parity_of_the_clip_checkpoints(name, next_models, next_reference, next_images):
    """Prompt (conversation.py's template), token ids, crops, positions, logits and greedy tokens."""
    checkpoint, images, _ = TEMPLATE_CASES[name]
    model, processor = next_models(checkpoint)
    (q1, a1), (q2, _) = TURNS
    prompt = processor.apply_template(q2, [len(images), 0], None, [(q1, a1)])
    check_case(model, processor, next_reference[name], [str(next_images[i]) for i in images], prompt)


@pytest.mark.parametrize("name", list(VIDEO_CASES))
def test_video_parity_with_the_next_code(name, next_models, next_reference, next_images):
    checkpoint, picture = VIDEO_CASES[name]
    model, processor = next_models(checkpoint)
    ref = next_reference[name]
    frames = np.load(next_images[GIVEN_FRAMES.get(name, "frames")])
    sampled = {} if name in GIVEN_FRAMES else {"num_frames": FRAMES}
    images = [str(next_images["wide"])] if picture else []
    prompt = str(ref["prompt"]).replace("<image>\n", "<video>\n", 2 if picture else 1)
    if picture:  # the picture's <image> stays first
        prompt = prompt.replace("<video>\n", "<image>\n", 1)
    inputs = processor(prompt, images, videos=[frames], **sampled)
    ids = [IMAGE_PLACEHOLDER if t == VIDEO_PLACEHOLDER else t for t in np.asarray(inputs["input_ids"])[0].tolist()]
    assert ids == ref["input_ids"].tolist()
    video = processor.preprocess_video(frames).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(video, ref[f"pixel_values_{len(images)}"], atol=1e-5)
    assert model.config.video_token_count(len(frames)) == ref["image_token_counts"][-1]
    logits = model(**inputs)
    assert logits.shape[1] == ref["logits"].shape[0]
    assert_logits_close(logits[0], ref["logits"])
    result = generate(
        model, processor, prompt, images, videos=[frames], max_tokens=16, template=False, ignore_eos=True, **sampled
    )
    assert result.tokens == ref["greedy"].tolist()


def test_the_qwen_template_is_the_codes(next_loaded, next_reference, next_images):
    model, processor = next_loaded
    ref = next_reference["template"]
    (q1, a1), (q2, _) = TURNS
    prompt = processor.apply_template(q2, [1, 0], None, [(q1, a1)])
    assert prompt == str(ref["prompt"])
    inputs = processor(prompt, [str(next_images["wide"])])
    assert_logits_close(model(**inputs)[0], ref["logits"])


def test_a_tower_not_in_the_cache_is_guessed_from_the_released_one(next_fixtures, capsys):
    """Offline, with nothing cached: the released SigLIP's geometry is guessed with one warning,
    and the tiny fixture's weights then do not fit it (their shapes are checked)."""
    with pytest.raises(LlavaError, match="shape"):
        load(str(next_fixtures / "next-qwen"))
    assert "google/siglip-so400m-patch14-384" in capsys.readouterr().err


@pytest.mark.parametrize("checkpoint,case", [("next-qwen", "wide"), ("next-mixtral", "mixtral-tall")])
def test_converted_and_quantized_the_layout_keeps_its_answers(
    checkpoint, case, next_fixtures, next_reference, next_images, tmp_path
):
    """convert() writes our MLX layout (the tower's config inside: no hub cache needed after;
    Mixtral's experts stacked), which answers as the LLaVA-NeXT code does; 8-bit quantized, it
    loads and answers."""
    from llava_mlx import convert, generate

    ref = next_reference[case]
    image = [str(next_images[CASES[case][0] if case in CASES else TEMPLATE_CASES[case][1][0]])]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(next_fixtures / "hf-home" / "hub"))
        convert(str(next_fixtures / checkpoint), str(tmp_path / "mlx"), progress=False)
        convert(str(next_fixtures / checkpoint), str(tmp_path / "q8"), quantize=True, q_bits=8, progress=False)
    model, processor = load(str(tmp_path / "mlx"))
    check_case(model, processor, ref, image, str(ref["prompt"]))
    quantized, quantized_processor = load(str(tmp_path / "q8"))
    answer = generate(quantized, quantized_processor, str(ref["prompt"]), image, max_tokens=4, template=False)
    assert answer.prompt_tokens == ref["logits"].shape[0]
    if checkpoint == "next-mixtral":  # the experts as one switch layer, quantized
        layer = quantized.language_model.model.layers[0].block_sparse_moe.switch_mlp
        assert layer.gate_proj.bits == 8


def test_generate_py_answers_as_the_api(next_fixtures, next_loaded, next_images):
    from llava_mlx import generate

    from helpers import run_cli

    result = run_cli(
        "--model", str(next_fixtures / "next-qwen"), "--image", str(next_images["tall"]), "--max-tokens", "8",
        env={"HF_HOME": str(next_fixtures / "hf-home")},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    api = generate(*next_loaded, "Describe this image.", [str(next_images["tall"])], max_tokens=8)
    assert result.stdout.strip() == api.text.strip()


def test_the_server_answers_the_layout_as_generate(next_fixtures, next_loaded, next_images, family, tmp_path):
    """The official client against server.py on the code's Qwen2 checkpoint: two pictures (each
    padded to one crop), and a picture with a clip, answer as generate() does."""
    from helpers import environment
    from serving import ask, start_server, user, video_message

    env = environment(HF_HOME=str(next_fixtures / "hf-home"))
    server = start_server(next_fixtures / "next-qwen", tmp_path / "server.log", "--num-frames", "6", env=env)
    try:
        wide, tall, clip = next_images["wide"], next_images["tall"], family["clip.mp4"]
        api = generate(*next_loaded, "Compare them.", [str(wide), str(tall)], max_tokens=16)
        assert ask(server, [user("Compare them.", wide, tall)]).choices[0].message.content == api.text
        api = generate(*next_loaded, "What happens?", [str(wide)], videos=[str(clip)], num_frames=6, max_tokens=16)
        answer = ask(server, [video_message("What happens?", clip, wide)])
        assert answer.choices[0].message.content == api.text
        assert answer.usage.prompt_tokens == api.prompt_tokens
    finally:
        assert server.stop() == 0, server.log.read_text()[-2000:]


@pytest.mark.parametrize("checkpoint,pipeline", [("next-qwen", False), ("next-llama-video", True)])
def test_two_ranks_answer_the_layout_as_one_process(checkpoint, pipeline, next_fixtures, next_images, family):
    """generate.py under `mlx.launch -n 2` (tensor parallel Qwen2, pipeline parallel Llama-3), a
    picture and a clip: the answer one process gives, printed once."""
    from helpers import environment, launch_two, run_bounded

    args = [ROOT / "generate.py", "--model", next_fixtures / checkpoint, "--image", next_images["wide"],
            "--video", family["clip.mp4"], "--num-frames", "6", "--max-tokens", "12"]  # fmt: skip
    args += ["--pipeline"] if pipeline else []
    env = environment(HF_HOME=str(next_fixtures / "hf-home"))
    alone = run_bounded([sys.executable, *args], timeout=300, env=env)
    assert alone.returncode == 0, alone.stderr
    both = launch_two(*args, timeout=300, env=env)
    assert both.returncode == 0, both.stderr
    assert both.stdout == alone.stdout and alone.stdout.strip()
    assert "[rank 1/2] Generation: 12 tokens" in both.stderr


def test_a_mixtral_decoder_is_refused_by_sharding_in_one_line(next_models):
    """mlx-lm's mixtral has no `shard` and no pipeline stage: under mlx.launch it is refused."""
    from llava_mlx.distributed.shard import check_shardable

    text = next_models("next-mixtral")[0].config.text_config
    with pytest.raises(LlavaError, match="a 'mixtral' decoder cannot be sharded"):
        check_shardable(text, 2, False)


def hf_conversion(next_fixtures, family, out):
    """The next-qwen weights as transformers' conversion lays them out (llava_onevision, as
    llava-hf/llava-onevision-qwen2-*-hf and LLaVA-Video-*-hf): its config and processors, the
    same tensors (the tower's saved layers, the last already dropped by the code)."""
    source = next_fixtures / "next-qwen"
    out.mkdir()
    for item in source.iterdir():
        if item.suffix == ".safetensors" or item.name.startswith("tokenizer") or item.name == "vocab.json":
            os.link(item, out / item.name)
    for name in ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json"):
        shutil.copyfile(family["hub-onevision"] / name, out / name)
    raw = json.loads((source / "config.json").read_text())
    vocab = json.loads((source / "tokenizer.json").read_text())["added_tokens"]
    token = {t["content"]: t["id"] for t in vocab}
    text = {k: raw[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "max_position_embeddings", "rope_theta", "rms_norm_eps",
                                "vocab_size")}  # fmt: skip
    config = {
        "model_type": "llava_onevision", "architectures": ["LlavaOnevisionForConditionalGeneration"],
        "text_config": {**text, "model_type": "qwen2", "tie_word_embeddings": False}, "tie_word_embeddings": False,
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128,
                          "num_attention_heads": 4, "num_hidden_layers": 2, "image_size": 384, "patch_size": 14,
                          "vision_use_head": False},
        "vision_feature_layer": -1, "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_9",
        "image_token_index": token["<image>"], "video_token_index": token["<video>"],
        "use_image_newline_parameter": True,
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_transformers_conversion_runs_the_weights_differently(next_fixtures, next_loaded, next_images, family,
                                                             tmp_path):  # fmt: skip
    """The same weights run as the LLaVA-NeXT code runs them (ours, exact to it above) and as
    transformers runs its conversion (ours in the llava_onevision layout, exact to transformers 5
    in test_parity_family.py): where they part and by how much, printed as a table (-s) for
    docs/fidelity.md. A LLaVA-Video checkpoint (newlines after each row of each frame) loses
    its newlines in transformers (one after the clip); images keep their positions but not
    their numbers (the tiles' preprocessing and the whole-prompt tokenisation differ)."""
    hf = load(str(hf_conversion(next_fixtures, family, tmp_path / "hf")))
    onevision = tmp_path / "onevision-video"  # the OneVision originals' video setting
    shutil.copytree(next_fixtures / "next-qwen", onevision, copy_function=os.link)
    config = json.loads((onevision / "config.json").read_text())
    config.update(mm_newline_position="one_token", mm_spatial_pool_mode="bilinear")
    (onevision / "config.json").write_text(json.dumps(config))
    frames = np.load(next_images["frames"])
    rounding = tmp_path / "423x188.png"  # unpadded: 23 rows by the code's truncation, 25 by transformers' rounding
    Image.open(next_images["wide"]).resize((423, 188)).save(rounding)
    # (every image case of CASES was measured once: equal; these stand for them in CI)
    cases = {name: (None, [str(next_images[i]) for i in CASES[name]], []) for name in ("wide", "two")}
    cases["423x188"] = (None, [str(rounding)], [])
    cases["video, LLaVA-Video (grid, bilinear)"] = (None, [], [frames])
    cases["video, OneVision (one_token, bilinear)"] = (onevision, [], [frames])
    cases["video (frame, average)"] = (next_fixtures / "next-qwen-frame-average", [], [frames])
    rows = []
    for name, (checkpoint, images, videos) in cases.items():
        code_model = next_loaded if checkpoint is None else load_next(next_fixtures, checkpoint)
        media = "<image>\n" * len(images) + "<video>\n" * len(videos)
        prompt = QWEN_PROMPT.format(media + "What is in the image?") + "<|im_start|>assistant\n"
        results = []
        for model, processor in (code_model, hf):
            inputs = processor(prompt, images, videos=videos or None, num_frames=FRAMES)
            logits = np.asarray(model(**inputs)[0].astype(mx.float32))
            answer = generate(model, processor, prompt, images, videos=videos or None, num_frames=FRAMES,
                              max_tokens=16, template=False, ignore_eos=True)  # fmt: skip
            results.append((logits, answer.tokens))
        (code, code_tokens), (theirs, their_tokens) = results
        same = next((i for i, (a, b) in enumerate(zip(code_tokens, their_tokens)) if a != b), 16)
        common = min(code.shape[1], theirs.shape[1])
        last = np.abs(code[-1, :common] - theirs[-1, :common]).max() / np.abs(code[-1, :common]).max()
        rows.append((name, code.shape[0], theirs.shape[0], last, same))
    print("\n| case | positions, the code | positions, transformers | last-position logit diff | greedy tokens equal |")
    print("|---|---|---|---|---|")
    for name, ours, theirs, last, same in rows:
        print(f"| {name} | {ours} | {theirs} | {last:.1e} | {same}/16 |")
    by_name = {r[0]: r for r in rows}
    assert by_name["423x188"][1] - by_name["423x188"][2] == -2 * (54 + 1)  # two rows of 54 and their newlines
    grid = by_name["video, LLaVA-Video (grid, bilinear)"]
    assert grid[1] - grid[2] == FRAMES * 14 - 1  # a newline after each row of each frame, against one
    # average pooling floors 27 to 13 and a newline ends each frame; transformers: 14 by bilinear, one newline
    frame = by_name["video (frame, average)"]
    assert frame[1] - frame[2] == FRAMES * (13**2 + 1) - (FRAMES * 14**2 + 1)
    same = by_name["video, OneVision (one_token, bilinear)"]
    assert same[1] == same[2] and same[3] < 1e-4 and same[4] == 16
