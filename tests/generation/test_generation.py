"""Generation behaviour the parity tests do not reach: stopping at EOS, sampling, the
quantized and the rotating KV cache, the vocabulary the sampler may pick from, --system."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.sample_utils import make_sampler

from llava_mlx import generate, load
from llava_mlx.cache import SessionCache
from llava_mlx.cli.generate import main
from llava_mlx.generation import stream_generate, vocabulary_sampler

QUESTION = "What is here?"


def steps(model, processor, images, **kwargs):
    """(tokens, stacked logprobs, last response, session cache) of a 12-token answer."""
    cache = SessionCache()
    options = dict(max_tokens=12, ignore_eos=True, cache=cache, **kwargs)
    out = list(stream_generate(model, processor, QUESTION, images, **options))
    return [r.token for r in out[:-1]], np.stack([np.asarray(r.logprobs) for r in out[:-1]]), out[-1], cache


def teacher_forced_hidden(model, processor, images, tokens):
    """The decoder's final (normed) hidden state at every generated position, from one
    forward pass over prompt + tokens: logits are these times lm_head."""
    inputs = processor(processor.apply_template(QUESTION, len(images)), images)
    ids = mx.concatenate([inputs["input_ids"], mx.array([tokens[:-1]], dtype=mx.int32)], axis=1)
    embeddings = model.embed(ids, inputs["pixel_values"], inputs["image_sizes"])
    return np.asarray(model.language_model.model(None, input_embeddings=embeddings)[0, -len(tokens) :])


def make_eos_win_at(model, processor, images, eos, step=3):
    """Replace lm_head's row `eos` so that `eos` is the greedy pick at `step` and at no step
    before (its logit 1 above the best at `step`, 1 below it earlier: a least-squares row
    through those targets). Returns the greedy tokens the answer must stop after."""
    tokens = generate(model, processor, QUESTION, images, max_tokens=step + 1, ignore_eos=True).tokens
    hidden = teacher_forced_hidden(model, processor, images, tokens)
    head = model.language_model.lm_head
    top = (hidden @ np.asarray(head.weight).T).max(axis=1)
    target = top + np.where(np.arange(len(tokens)) == step, 1.0, -1.0)
    row = np.linalg.lstsq(hidden[: step + 1], target[: step + 1], rcond=None)[0]
    assert np.allclose(hidden[: step + 1] @ row, target[: step + 1], atol=1e-2)
    head.weight = mx.concatenate(
        [head.weight[:eos], mx.array(row[None], dtype=head.weight.dtype), head.weight[eos + 1 :]]
    )
    return tokens[:step]


def test_stops_at_eos_with_finish_reason_stop(checkpoints, images):
    model, processor = load(str(checkpoints["orig-v1.5-vicuna"]))  # its own copy: lm_head is edited
    eos = processor.tokenizer.eos_token_id
    expected = make_eos_win_at(model, processor, [images["wide"]], eos)
    result = generate(model, processor, QUESTION, [images["wide"]], max_tokens=20)
    assert result.tokens == expected and result.finish_reason == "stop"
    assert result.text == processor.tokenizer.decode(expected)
    # ignore_eos runs on through it; the stream's last piece carries the reason
    assert (
        generate(model, processor, QUESTION, [images["wide"]], max_tokens=20, ignore_eos=True).finish_reason == "length"
    )
    last = list(stream_generate(model, processor, QUESTION, [images["wide"]], max_tokens=20))[-1]
    assert last.finish_reason == "stop" and last.generation_tokens == len(expected)


def test_eos_added_past_the_base_vocabulary_still_stops(checkpoints, images, tmp_path):
    """A chatml end of turn added after the base vocabulary (id 1002 of 1064 rows, base 1000)
    must stay reachable: the sampler masks the padding rows, not the end-of-turn id."""
    from tokenizers import AddedToken, Tokenizer

    path = shutil.copytree(checkpoints["hf-v1.5-vicuna"], tmp_path / "im-end")
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken("<|im_end|>", special=True, normalized=False)])
    tokenizer.save(str(path / "tokenizer.json"))
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["1002"] = dict(config["added_tokens_decoder"]["1000"], content="<|im_end|>")
    (path / "tokenizer_config.json").write_text(json.dumps(config))

    model, processor = load(str(path))
    im_end = processor.tokenizer._tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end == 1002 and processor.tokenizer.vocab_size == 1000 and im_end in processor.tokenizer.eos_token_ids
    expected = make_eos_win_at(model, processor, [images["wide"]], im_end)
    result = generate(model, processor, QUESTION, [images["wide"]], max_tokens=20)
    assert result.tokens == expected and result.finish_reason == "stop"


def test_sampler_renormalises_over_the_kept_vocabulary():
    """Hand-worked: 4 base ids hold half the mass, 2 padding rows the rest.

    Kept and renormalised: [0.5, 0.3, 0.15, 0.05]; top-p 0.7 keeps ids 0 and 1 (0.8), drawn
    0.625 / 0.375. With id 5 an end of turn, the kept mass is 0.7: [5/14, 3/14, 1.5/14,
    0.5/14, 4/14]; top-p 0.7 keeps ids 0, 5, 1 (12/14), drawn 5/12, 4/12, 3/12.
    """
    probs = np.array([0.25, 0.15, 0.075, 0.025, 0.3, 0.2])
    logprobs = mx.broadcast_to(mx.array(np.log(probs), dtype=mx.float32), (20000, 6))
    for eos, expected in (((), {0: 0.625, 1: 0.375}), ((5,), {0: 5 / 12, 5: 4 / 12, 1: 3 / 12})):
        mx.random.seed(3)
        sampler = vocabulary_sampler(make_sampler(1.0, 0.7), 4, 6, eos)
        drawn = np.asarray(sampler(logprobs)).tolist()
        assert set(drawn) == set(expected)
        for token, p in expected.items():
            assert abs(drawn.count(token) / len(drawn) - p) < 0.015, (eos, token)
    greedy = vocabulary_sampler(make_sampler(0.0), 4, 6, ())
    assert np.asarray(greedy(logprobs[:1])).tolist() == [0]  # id 4 (0.3) is padding


def test_greedy_is_the_argmax_and_temperature_zero(loaded, images):
    model, processor = loaded("orig-v1.6-mistral")
    ims = [images["odd2"]]
    tokens = generate(model, processor, QUESTION, ims, max_tokens=10, ignore_eos=True).tokens
    logits = teacher_forced_hidden(model, processor, ims, tokens) @ np.asarray(model.language_model.lm_head.weight).T
    assert tokens == logits[:, : processor.tokenizer.vocab_size].argmax(-1).tolist()
    zero = generate(model, processor, QUESTION, ims, max_tokens=10, ignore_eos=True, temperature=0.0, top_p=0.3, seed=5)
    assert zero.tokens == tokens


def test_seeded_sampling_reproduces(loaded, images):
    model, processor = loaded("orig-v1.6-mistral")
    ims = [images["odd2"]]
    greedy = generate(model, processor, QUESTION, ims, max_tokens=10, ignore_eos=True).tokens
    for temperature, top_p in ((0.9, 1.0), (1.3, 0.8)):
        runs = [
            generate(
                model,
                processor,
                QUESTION,
                ims,
                max_tokens=10,
                ignore_eos=True,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
            ).tokens
            for seed in (11, 11, 12)
        ]
        assert runs[0] == runs[1]
        assert runs[0] != runs[2] and runs[0] != greedy  # it does sample


@pytest.fixture(scope="module")
def gqa(variants):
    """Head size 32: the KV cache can be quantized (MLX groups of 32)."""
    return load(str(variants["orig-gqa"]))


def test_quantized_kv_cache_is_close_to_float(gqa, images):
    model, processor = gqa
    assert model.language_model.layers[0].self_attn.head_dim == 32
    ims = [images["wide"]]
    tokens, logprobs, _, _ = steps(model, processor, ims)
    scale = np.abs(logprobs[0]).max()
    for bits, first_step_tol in ((8, 0.005), (4, 0.05)):
        q_tokens, q_logprobs, _, cache = steps(model, processor, ims, kv_bits=bits)
        assert type(cache.kv[0]).__name__ == "QuantizedKVCache" and cache.kv[0].bits == bits
        err = np.abs(q_logprobs[0] - logprobs[0]).max()
        assert 0 < err <= first_step_tol * scale, (bits, err / scale)
        assert q_tokens[0] == tokens[0]
        if bits == 8:
            assert q_tokens == tokens
            assert np.abs(q_logprobs - logprobs).max() <= 0.005 * scale


def test_kv_bits_on_the_command_line(variants, images, capsys):
    args = ["--model", str(variants["orig-gqa"]), "--image", str(images["wide"]), "--max-tokens", "4"]
    assert main(args + ["--kv-bits", "4"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and "Peak memory" in out.err
    assert main(args + ["--kv-bits", "8", "--max-kv-size", "256"]) == 1
    assert capsys.readouterr().err.strip() == (
        "error: kv_bits and max_kv_size cannot be combined: MLX's rotating KV cache is not quantized"
    )


def test_max_kv_size_smaller_than_the_prompt(gqa, images):
    """The cache never holds more than max_kv_size positions, so the answer is not the full cache's."""
    model, processor = gqa
    ims = [images["wide"]]
    tokens, logprobs, _, _ = steps(model, processor, ims)
    r_tokens, r_logprobs, last, cache = steps(model, processor, ims, max_kv_size=256)
    assert last.prompt_tokens > 600 and len(r_tokens) == 12 and last.finish_reason == "length"
    assert all(c.keys.shape[2] == 256 for c in cache.kv)
    assert np.abs(r_logprobs[0] - logprobs[0]).max() > 0.1
    big_tokens, big_logprobs, _, _ = steps(model, processor, ims, max_kv_size=4096)
    assert big_tokens == tokens and np.abs(big_logprobs - logprobs).max() <= 1e-5 * np.abs(logprobs).max()


def test_system_prompt_on_the_command_line(checkpoints, loaded, images, capsys):
    """--system replaces the template's system prompt (llava_v1 here): the CLI answers as the
    API given the same system prompt, and not as without it."""
    model, processor = loaded("orig-v1.6-vicuna")
    system = "You are terse."
    assert processor.apply_template("Hi", 1, system) == f"{system} USER: <image>\nHi ASSISTANT:"
    args = [
        "--model",
        str(checkpoints["orig-v1.6-vicuna"]),
        "--image",
        str(images["tiny"]),
        "--prompt",
        "Hi",
        "--max-tokens",
        "6",
    ]
    assert main(args + ["--system", system]) == 0
    with_system = capsys.readouterr().out
    expected = generate(model, processor, "Hi", [images["tiny"]], max_tokens=6, system=system)
    default = generate(model, processor, "Hi", [images["tiny"]], max_tokens=6)
    assert with_system == expected.text + "\n" and expected.text != default.text
