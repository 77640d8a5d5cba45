"""Config options and a Yi-34B-shaped model against the ORIGINAL LLaVA code, float32.

Each checkpoint of fixtures/build_variants.py changes one option the base fixtures leave
at its default (vision layer, cls_patch, linear projector, GQA on llama, tied embeddings,
linear and dynamic rope scaling) or is shaped like LLaVA-1.6-34B (Nous-Hermes-2-Yi: chatml,
`<|im_end|>`, Yi's tokenizer). The parity rule is the base suite's: the prompt string,
token ids, crops, image-token counts, logits of the whole merged sequence within 1e-4 of
max|logit| and 16 greedy tokens. All cases run in one start of the reference environment.
"""

import pytest

from llava_mlx import load

from reference.original import QUESTION, case_name, check_case, run_original

CASES = [
    ("select-layer", "llava_v1", ["wide"]),
    ("cls-patch", "llava_v1", ["odd1"]),
    ("linear", "llava_v1", ["tall"]),
    ("gqa", "llava_v1", ["wide"]),
    ("tied", "llava_v1", ["square"]),
    ("rope-linear", "llava_v1", ["wide"]),
    ("rope-dynamic", "llava_v1", ["wide"]),  # 600+ positions: past max_position_embeddings 512
    ("yi", "chatml_direct", ["wide"]),
    ("yi", "chatml_direct", ["tiny", "tall"]),
]
# Raw prompts for Yi's tokenizer rules: no BOS, no dummy prefix, chatml pieces, text glued to <image>.
RAW = [
    ("yi", "<|im_start|>user\n<image>What is it?<|im_end|><|im_start|>assistant\n", ["odd1"]),
    ("yi", "<|im_start|>system\n a ▁b  \n\n c<|im_end|> x<|endoftext|>y ünï 42", []),
]


@pytest.fixture(scope="session")
def original_variants(variants, images, tmp_path_factory):
    jobs = [
        {
            "name": case_name(variant, ims, raw=raw),
            "checkpoint": str(variants[f"orig-{variant}"]),
            "images": [str(images[i]) for i in ims],
            **({"prompt": text} if raw else {"question": QUESTION, "conv_mode": text}),
            "new_tokens": 16,
        }
        for cases, raw in ((CASES, False), (RAW, True))
        for variant, text, ims in cases
    ]
    return run_original(jobs, tmp_path_factory.mktemp("original-variants"))


@pytest.fixture(scope="session")
def loaded_variant(variants):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load(str(variants[f"orig-{name}"]))
        return cache[name]

    return get


@pytest.mark.parametrize("variant,mode,ims", CASES, ids=[case_name(v, i) for v, _, i in CASES])
def test_config_options_match_original(variant, mode, ims, original_variants, loaded_variant, images):
    model, processor = loaded_variant(variant)
    assert processor.family == mode
    prompt = processor.apply_template(QUESTION, len(ims))
    check_case(model, processor, original_variants[case_name(variant, ims)], [images[i] for i in ims], prompt)


@pytest.mark.parametrize("variant,prompt,ims", RAW, ids=[case_name(v, i, True) for v, _, i in RAW])
def test_yi_raw_prompts_match_original(variant, prompt, ims, original_variants, loaded_variant, images):
    model, processor = loaded_variant(variant)
    ref = original_variants[case_name(variant, ims, True)]
    check_case(model, processor, ref, [images[i] for i in ims], prompt)


def test_yi_stops_at_im_end(loaded_variant):
    """chatml ends a turn with <|im_end|>: an end-of-sequence id the model can produce."""
    model, processor = loaded_variant("yi")
    im_end = processor.tokenizer._tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in processor.tokenizer.eos_token_ids
    assert im_end < model.config.text_config["vocab_size"]


def test_yi_tokenisation_matches_original(variants, loaded_variant, tmp_path):
    """Yi's slow tokenizer (legacy=False, no dummy prefix, no BOS): the '▁' put before a
    chatml piece stays, because transformers 4.37 strips it only before its special tokens."""
    import json
    import subprocess

    from conftest import ROOT
    from reference.original import REFERENCE_PYTHON, TRICKY

    strings = TRICKY + ["<|im_start|>user\nhi<|im_end|>", "a<|im_end|>\nb", " <|endoftext|>y", "<|im_end|><|im_start|>"]
    (tmp_path / "strings.json").write_text(json.dumps(strings))
    result = subprocess.run(
        [
            REFERENCE_PYTHON,
            str(ROOT / "tests" / "reference" / "tokenize_original.py"),
            str(variants["orig-yi"]),
            str(tmp_path / "strings.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    expected = json.loads(result.stdout.strip().splitlines()[-1])
    _, processor = loaded_variant("yi")
    assert [processor.tokenize(s) for s in strings] == expected
