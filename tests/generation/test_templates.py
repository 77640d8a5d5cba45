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
