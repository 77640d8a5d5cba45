"""The training data as the original's LazySupervisedDataset gives it: for every conversation
template train.py knows, each record's token ids and labels (and the tokenization-mismatch rule)
equal to its own dataset's, live; the pictures' pixels equal; OpenAI-style messages read as the
same records."""

import json

import numpy as np
import pytest

from llava_mlx import LlavaError
from llava_mlx.model import IMAGE_PLACEHOLDER
from llava_mlx.train.data import Example, modality_grouped, order, pixels, prepare
from llava_mlx.train.templates import TEMPLATES, prompt, template

from fixtures.build_training import CAPTION_RECORDS, TRAIN_RECORDS
from reference.training import reference_preprocess

# Every --version train() takes; plain (pretraining) takes captions only.
VERSIONS = [v for v in TEMPLATES if v not in ("plain", "v0_plain")]
MAX_LENGTH = 2048


def positions_576(size, several):  # LLaVA-1.5's, per picture
    return 576


def tokenizer_of(training, max_length=MAX_LENGTH, version="v1"):
    from llava_mlx.train.arguments import parse
    from llava_mlx.train.run import training_tokenizer

    args = parse(["--data_path", "x", "--output_dir", "x", "--version", version, "--model_max_length", str(max_length)])
    return training_tokenizer(training["vicuna"], args)


@pytest.fixture(scope="session")
def reference_items(training, tmp_path_factory):
    cases = [{"version": v, "data": TRAIN_RECORDS} for v in VERSIONS]
    cases += [{"version": v, "data": CAPTION_RECORDS} for v in ("plain", "v0_plain")]
    jobs = {
        "model": str(training["vicuna"]),
        "vision_tower": str(training["tower"]),
        "model_max_length": MAX_LENGTH,
        "image_folder": str(training["data"]),
        "image_aspect_ratio": "pad",
        "cases": cases,
    }
    items = reference_preprocess(jobs, tmp_path_factory.mktemp("preprocess"))
    by_version = {}
    for item in items:
        by_version.setdefault(item["version"], []).append(item)
    return by_version


@pytest.mark.parametrize("version", list(TEMPLATES))
def test_ids_and_labels_are_the_originals(version, training, reference_items, tmp_path):
    records = CAPTION_RECORDS if "plain" in version else TRAIN_RECORDS
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    examples, masked = prepare(
        data, training["data"], template(version), tokenizer_of(training, version=version), positions_576
    )
    expected = reference_items[version]
    assert [e.id for e in examples] == [r["id"] for r in expected]
    for e, r in zip(examples, expected):
        assert e.ids == r["input_ids"], e.id
        assert e.labels == r["labels"], e.id
        assert e.mismatch == bool(r["mismatch_warnings"]), e.id
    assert masked == sum(r["mismatch_warnings"] for r in expected)


def test_pixels_are_the_datasets(training, reference_items):
    from llava_mlx.checkpoint.preprocessing import image_settings
    from llava_mlx.train.arguments import parse
    from llava_mlx.train.build import build

    args = parse(["--model_name_or_path", str(training["vicuna"]), "--vision_tower", str(training["tower"]),
                  "--mm_projector_type", "mlp2x_gelu", "--image_aspect_ratio", "pad", "--data_path", "x",
                  "--output_dir", "x"])  # fmt: skip
    trainable = build(args)
    settings = image_settings(trainable.source, trainable.tower_dir, trainable.model.config)
    for record, item in zip(TRAIN_RECORDS, reference_items["v1"]):
        if "image" not in record:
            continue
        source = str(training["data"] / record["image"])
        ours = pixels(source, settings, trainable.model.config, False)[0].transpose(2, 0, 1)
        np.testing.assert_allclose(ours, np.load(item["pixels"]), atol=1e-5)


def test_prompts_by_hand():
    turns = ["<image>\nHi?", "Hello.", "And?", "Yes."]
    assert prompt(template("v1"), turns) == (
        TEMPLATES["v1"].system + " USER: <image>\nHi? ASSISTANT: Hello.</s>USER: And? ASSISTANT: Yes.</s>"
    )
    assert (
        prompt(template("mistral_instruct"), turns)
        == "[INST] <image>\nHi? [/INST] Hello. </s>[INST] And? [/INST] Yes. </s>"
    )
    # str.lstrip("<s>") strips those characters: the first "<s>" goes, and nothing of "[INST]"
    assert prompt(template("llava_llama_2"), turns).startswith("[INST] <<SYS>>\n")
    assert prompt(template("chatml_direct"), turns[:2]) == (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nHi?<|im_end|>"
        "<|im_start|>assistant\nHello.<|im_end|>"
    )


def test_messages_jsonl_reads_as_the_same_records(training, tmp_path):
    """OpenAI-style messages (the picture as an image_url part where it stands) give the same
    ids and labels as the LLaVA records they say."""
    lines = []
    for record in TRAIN_RECORDS:
        messages = []
        for turn in record["conversations"]:
            role = "user" if turn["from"] == "human" else "assistant"
            text = turn["value"]
            if "<image>" in text:
                before, after = text.split("<image>")
                parts = [{"type": "text", "text": before.strip()}] if before.strip() else []
                parts.append({"type": "image_url", "image_url": {"url": record["image"]}})
                parts += [{"type": "text", "text": after.strip()}] if after.strip() else []
                messages.append({"role": role, "content": parts})
            else:
                messages.append({"role": role, "content": text})
        lines.append(json.dumps({"id": record["id"], "messages": messages}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "data.json").write_text(json.dumps(TRAIN_RECORDS))
    tokenizer = tokenizer_of(training)
    jsonl = prepare(tmp_path / "data.jsonl", training["data"], template("v1"), tokenizer, positions_576)[0]
    llava = prepare(tmp_path / "data.json", training["data"], template("v1"), tokenizer, positions_576)[0]
    assert [(e.id, e.ids, e.labels) for e in jsonl] == [(e.id, e.ids, e.labels) for e in llava]


BAD_RECORDS = {
    "missing picture": ({"image": "pictures/none.png"}, "its picture .*none.png does not exist"),
    "corrupt picture": ({"image": "broken.png"}, "is not a readable image"),
    "turns that do not alternate": (
        {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
        "do not alternate human, gpt",
    ),
    "more <image> than pictures": (
        {"conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "<image> x"}]},
        "one picture and 2 <image> placeholders",
    ),
    "<image> without a picture": ({"image": None}, "has <image> in its turns but no picture"),
    "nothing within model_max_length": (
        {"conversations": [{"from": "human", "value": "<image>\n" + "word " * 200}, {"from": "gpt", "value": "ok"}]},
        "nothing of its answers lies within model_max_length",
    ),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_a_bad_record_is_one_line_naming_it_and_the_file(case, training, tmp_path):
    (tmp_path / "broken.png").write_bytes((training["data"] / "pictures" / "wide.png").read_bytes()[:400])
    (tmp_path / "pictures").symlink_to(training["data"] / "pictures")
    change, message = BAD_RECORDS[case]
    bad = {**TRAIN_RECORDS[0], "id": "the-bad-one", **change}
    if bad.get("image") is None:
        bad.pop("image")
    data = tmp_path / "data.json"
    data.write_text(json.dumps([TRAIN_RECORDS[1], bad, TRAIN_RECORDS[2]]))
    with pytest.raises(LlavaError, match=message) as error:
        prepare(data, tmp_path, template("v1"), tokenizer_of(training, 700), positions_576)
    line = str(error.value)
    assert "\n" not in line and line.startswith(f"{data}: record 'the-bad-one': ")


def test_the_orders_of_an_epoch():
    examples = [
        Example(
            str(i),
            ["x"] if i % 3 else [],
            [(1, 1)] if i % 3 else [],
            [IMAGE_PLACEHOLDER],
            [],
            False,
            (i + 1) * (1 if i % 3 else -1),
        )
        for i in range(10)
    ]
    assert order(examples, 0, 42, shuffle=False, group=False, batch=2, world=1) == list(range(10))
    shuffled = order(examples, 0, 42, shuffle=True, group=False, batch=2, world=1)
    assert sorted(shuffled) == list(range(10)) and shuffled != list(range(10))
    assert order(examples, 1, 42, True, False, 2, 1) != shuffled  # each epoch its own order
    assert order(examples, 0, 42, True, False, 2, 1) == shuffled  # seeded
    grouped = order(examples, 0, 42, shuffle=True, group=True, batch=2, world=1)
    assert sorted(grouped) == list(range(10))
    megabatches = [grouped[i : i + 2] for i in range(0, 8, 2)]  # all but the last: pictures or texts alone
    for m in megabatches[:-1]:
        assert len({examples[i].has_image for i in m}) == 1


def test_modality_grouping_by_hand():
    """Megabatches of batch x world, longest first within each; the mixed leftovers last, sorted."""

    class Fixed:
        def permutation(self, n):
            return np.arange(n)

    lengths = [5, 3, -4, 8, -2, 1]  # pictures 0, 1, 3, 5 in megabatches [0, 1], [3, 5]; texts [2, 4]
    assert modality_grouped(lengths, 2, 1, Fixed()) == [0, 1, 2, 3, 4, 5]  # last: [3, 5] + [2, 4], sorted
    assert modality_grouped([3, 9, 1, 7], 2, 1, Fixed()) == [1, 0, 3, 2]
