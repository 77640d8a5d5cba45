"""Each token's bytes, read from the tokenizer's own decoder (token_bytes.py), for every kind of
tokenizer a LLaVA checkpoint has; structured outputs on each of them."""

import json

import pytest
from transformers import AutoTokenizer

from llava_mlx import LlavaError, generate
from llava_mlx.token_bytes import byte_alphabet, decoder_steps, piece_bytes, token_table

SPM_SEQUENCE = {
    "type": "Sequence",
    "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0},
    ],
}
METASPACE = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
TEXT = "The cat sat on the mat.\nWhat is 42? Ünïcode: 東京 ✓"


def test_the_byte_level_alphabet_by_hand():
    """GPT-2's alphabet: printable bytes are themselves; bytes 0-32, 127-160 and 173 are
    U+0100 on, in byte order."""
    alphabet = byte_alphabet()
    assert len(alphabet) == 256 and sorted(alphabet.values()) == list(range(256))
    assert alphabet["A"] == 0x41 and alphabet["~"] == 0x7E and alphabet["¡"] == 0xA1
    assert alphabet["Ā"] == 0x00 and alphabet["ĉ"] == 0x09 and alphabet["Ċ"] == 0x0A and alphabet["Ġ"] == 0x20
    assert alphabet["ġ"] == 0x7F and alphabet["ł"] == 0xA0  # U+0100 + 33 + 33: the 34th of 127-160
    assert alphabet["Ń"] == 0xAD  # the last of them: U+0100 + 67


def test_pieces_through_each_decoder_by_hand():
    spm, meta = decoder_steps(SPM_SEQUENCE), decoder_steps(METASPACE)
    assert [s["type"] for s in spm] == ["Replace", "ByteFallback", "Fuse", "Strip"]
    assert piece_bytes("▁the", spm) == b" the" and piece_bytes("▁the", meta) == b" the"
    assert piece_bytes("<0x0A>", spm) == b"\n" and piece_bytes("<0xE6>", spm) == b"\xe6"
    assert piece_bytes("<0x0A>", meta) == b"<0x0A>"  # no ByteFallback: decoded as the text it is
    byte_level = decoder_steps({"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True})
    assert piece_bytes("Ġthe", byte_level) == b" the" and piece_bytes("Ċ", byte_level) == b"\n"
    assert piece_bytes("æĿ±", byte_level) == "東".encode()
    # Strip without a Fuse before it acts on every token; after a Fuse, only on the text's start
    strip = decoder_steps({"type": "Sequence", "decoders": [METASPACE, {"type": "Strip", "content": " ", "start": 1}]})
    assert piece_bytes("▁the", strip) == b"the" and piece_bytes("▁the", spm) == b" the"


def kinds(checkpoints, family, tokenizer_variants) -> dict:
    return {
        "sequence (llava-hf)": checkpoints["hf-v1.6-vicuna"],
        "metaspace": tokenizer_variants["metaspace"],
        "sentencepiece only (tokenizer.model)": checkpoints["orig-v1.5-vicuna"],
        "byte-level BPE (Qwen2)": family["hub-onevision"],
    }


KINDS = ["sequence (llava-hf)", "metaspace", "sentencepiece only (tokenizer.model)", "byte-level BPE (Qwen2)"]


@pytest.mark.parametrize("kind", KINDS)
def test_token_bytes_spell_what_the_tokenizer_decodes(kind, checkpoints, family, tokenizer_variants):
    """The tokens' bytes, joined, are the tokenizer's own decoding of them (but the word-start
    space a SentencePiece text begins with, which decoding drops)."""
    hf = AutoTokenizer.from_pretrained(kinds(checkpoints, family, tokenizer_variants)[kind])
    table = token_table(hf)
    assert len(table.tokens) == len(hf)
    ids = hf.encode(TEXT, add_special_tokens=False)
    spelled = b"".join(table.tokens[i] for i in ids)
    decoded = hf.decode(ids).encode()
    assert spelled in (decoded, b" " + decoded), (spelled, decoded)
    for token, info in hf.added_tokens_decoder.items():
        assert table.tokens[token] == info.content.encode()
    words = "cat sat on the mat."  # spelled by every vocabulary (the metaspace one spells no "\n")
    assert b"".join(table.tokens[i] for i in table(words)) == words.encode()


def test_the_table_agrees_with_llguidance_where_it_reads_the_decoder(checkpoints, family):
    """llguidance reads some decoders itself (the Sequence and byte-level ones): our table
    gives the same bytes, but for the byte 0xFF, its mark of a special token."""
    from llguidance import LLTokenizer

    for path in (checkpoints["hf-v1.6-vicuna"], family["hub-onevision"]):
        hf = AutoTokenizer.from_pretrained(path)
        theirs, ours = LLTokenizer(hf.backend_tokenizer.to_str()), token_table(hf).tokens
        different = [i for i in range(len(ours)) if ours[i] != theirs.decode_bytes([i])]
        assert [ours[i] for i in different] in ([], [b"\xff"]), different


@pytest.mark.parametrize("kind", KINDS)
def test_structured_outputs_on_every_tokenizer(kind, checkpoints, family, tokenizer_variants, images):
    from llava_mlx import load

    model, processor = load(str(kinds(checkpoints, family, tokenizer_variants)[kind]))
    schema = {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["color", "n"],
        "additionalProperties": False,
    }
    result = generate(model, processor, "Describe it as JSON.", [images["wide"]], max_tokens=40, response_format=schema)
    assert set(json.loads(result.text)) == {"color", "n"} and result.finish_reason == "stop", result.text


def test_a_decoder_whose_bytes_cannot_be_read_is_one_clear_error(tokenizer_variants, images):
    from llava_mlx import load

    model, processor = load(str(tokenizer_variants["wordpiece"]))
    with pytest.raises(LlavaError, match=r"decoder \(WordPiece\) is not one whose token bytes"):
        generate(model, processor, "Hi", max_tokens=4, response_format={"type": "json_object"})
    assert generate(model, processor, "Hi", max_tokens=4).text is not None  # free text is served
