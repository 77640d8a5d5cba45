"""A checkpoint's own chat_template (llava-hf, transformers 5) renders as transformers' processor
renders it: images first in the first user turn, the system prompt, earlier turns."""

import pytest

QUESTION = "What is in the image?"
HISTORY = [("Describe it.", "A red square."), ("And the corner?", "Blue.")]
CASES = [
    (1, None, ()),
    (2, None, ()),
    (1, "You are terse.", ()),
    (1, None, HISTORY),
    (2, "Answer briefly.", HISTORY[:1]),
]


def messages(question, num_images, system, history):
    """The conversation in transformers' message format, written out independently."""
    out = [] if system is None else [{"role": "system", "content": [{"type": "text", "text": system}]}]
    turns = list(history) + [(question, None)]
    for i, (q, a) in enumerate(turns):
        content = [{"type": "image"} for _ in range(num_images if i == 0 else 0)] + [{"type": "text", "text": q}]
        out.append({"role": "user", "content": content})
        if a is not None:
            out.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    return out


@pytest.fixture(scope="module")
def hf_processor():
    from transformers import AutoProcessor

    cache = {}

    def get(path):
        if path not in cache:
            cache[path] = AutoProcessor.from_pretrained(path)
        return cache[path]

    return get


@pytest.mark.parametrize("name", ["hf-v1.5-vicuna", "hf-v1.6-vicuna", "hf-v1.6-mistral", "tf5-v1.6-mistral"])
@pytest.mark.parametrize(
    "num_images,system,history", CASES, ids=[f"{n}img-{s is not None}-{len(h)}" for n, s, h in CASES]
)
def test_chat_template_matches_transformers(name, num_images, system, history, checkpoints, loaded, hf_processor):
    _, processor = loaded(name)
    assert processor.tokenizer._tokenizer.chat_template  # the checkpoint's own template is used
    theirs = hf_processor(str(checkpoints[name])).apply_chat_template(
        messages(QUESTION, num_images, system, history), add_generation_prompt=True, tokenize=False
    )
    theirs = theirs.removeprefix("<s>")  # BOS comes from tokenisation, as in the original
    ours = processor.apply_template(QUESTION, num_images, system, history)
    assert ours == theirs
    assert ours.count("<image>") == num_images


@pytest.mark.parametrize(
    "name,num_images,system,history,expected",
    [
        ("hf-v1.5-vicuna", 1, None, [("D.", "A.")], "USER: <image>\nD. ASSISTANT: A. USER: Q? ASSISTANT:"),
        ("hf-v1.5-vicuna", 2, "S.", (), "S. USER: <image>\n<image>\nQ? ASSISTANT:"),
        ("hf-v1.6-mistral", 1, None, [("D.", "A.")], "[INST] <image>\nD. [/INST] A.</s> [INST] Q? [/INST]"),
        ("hf-v1.6-mistral", 2, "S.", (), "<<SYS>>\nS.\n<</SYS>>\n\n[INST] <image>\n<image>\nQ? [/INST]"),
    ],
)
def test_chat_template_by_hand(name, num_images, system, history, expected, loaded):
    """The llava-hf templates of the fixtures, rendered by hand."""
    _, processor = loaded(name)
    assert processor.apply_template("Q?", num_images, system, history) == expected


@pytest.mark.parametrize("name", ["hf-v1.6-vicuna", "orig-v1.5-vicuna", "orig-v1.6-mistral"])
def test_typed_placeholders_place_the_images(name, loaded):
    """A question holding one <image> per image puts each image there (checkpoint template and
    family template alike); none puts them first; any other number is one clear error."""
    from llava_mlx.errors import LlavaError

    _, processor = loaded(name)
    placed = processor.apply_template("Compare <image> with <image>, please.", 2)
    assert "Compare <image> with <image>, please." in placed and placed.count("<image>") == 2
    first = processor.apply_template("Compare them, please.", 2)
    assert first.count("<image>") == 2 and first.index("<image>") < first.index("Compare them")
    for question, images, typed in (("<image><image> two?", 1, 2), ("What is <image>?", 0, 1), ("<image>", 3, 1)):
        with pytest.raises(LlavaError, match=f"holds {typed} <image> placeholder\\(s\\) but {images} image"):
            processor.apply_template(question, images)


def test_typed_placeholder_in_generate(loaded, images):
    """Through generate(): the image where the question puts it, the same image positions."""
    from llava_mlx import LlavaError, generate

    model, processor = loaded("hf-v1.6-vicuna")
    here = generate(model, processor, "Is <image> a picture?", [images["wide"]], max_tokens=2)
    first = generate(model, processor, "Is it a picture?", [images["wide"]], max_tokens=2)
    assert here.image_positions == first.image_positions == 1948
    with pytest.raises(LlavaError, match="holds 1 <image> placeholder"):
        generate(model, processor, "What is <image>?", [], max_tokens=2)
