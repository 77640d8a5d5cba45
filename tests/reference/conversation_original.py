"""Prompts from the ORIGINAL llava/conversation.py (run by the reference venv).

    .venv-orig/bin/python tests/reference/conversation_original.py TURNS.json

TURNS.json: {"system": str or null, "turns": [[question, answer or null], ...]}. Prints a
JSON object {template name: conv.get_prompt()} for llava_v1, mistral_instruct, chatml_direct.
"""

import json
import sys

from llava.conversation import conv_templates


def main(path):
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    prompts = {}
    for name in ("llava_v1", "mistral_instruct", "chatml_direct"):
        conv = conv_templates[name].copy()
        if spec.get("system") is not None:  # chatml keeps its role header in `system`
            conv.system = ("<|im_start|>system\n" if name == "chatml_direct" else "") + spec["system"]
        for question, answer in spec["turns"]:
            conv.append_message(conv.roles[0], question)
            conv.append_message(conv.roles[1], answer)
        prompts[name] = conv.get_prompt()
    print(json.dumps(prompts))


if __name__ == "__main__":
    main(sys.argv[1])
