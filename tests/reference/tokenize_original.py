"""Token ids from the ORIGINAL LLaVA tokenisation (run by the reference venv).

    .venv-orig/bin/python tests/reference/tokenize_original.py CHECKPOINT STRINGS.json

Loads the tokenizer as llava/model/builder.py does (slow LlamaTokenizer, except the fast
one for Mistral checkpoints) and prints a JSON list of `tokenizer(s).input_ids`.
"""

import json
import sys
import warnings

warnings.simplefilter("ignore")
from transformers import AutoTokenizer  # noqa: E402


def main(checkpoint, strings_file):
    with open(strings_file, encoding="utf-8") as f:
        strings = json.load(f)
    with open(f"{checkpoint}/config.json", encoding="utf-8") as f:
        mistral = "mistral" in json.load(f).get("model_type", "")
    tokenizer = (
        AutoTokenizer.from_pretrained(checkpoint)
        if mistral
        else AutoTokenizer.from_pretrained(checkpoint, use_fast=False)
    )
    print(json.dumps([tokenizer(s).input_ids for s in strings]))


if __name__ == "__main__":
    main(*sys.argv[1:])
