"""Text → ids exactly as the original LLaVA code tokenised it (transformers 4.37).

The original loads LLaMA-family tokenizers from `tokenizer.model` (SentencePiece): the
slow `LlamaTokenizer` for Vicuna and Yi, the converted fast one for Mistral. transformers 5
converts `tokenizer.model` differently (it drops the leading '▁' the original puts before
every chunk), so where a checkpoint has `tokenizer.model` we run SentencePiece ourselves
with the original's rules:

- legacy=False (liuhaotian's Vicuna configs): '▁' is put once before the whole text; a
  piece right after a special token gets none.
- legacy (Mistral's converted fast tokenizer, and slow ones without `legacy: false`):
  every piece between special tokens gets SentencePiece's dummy prefix.
"""

import json
import re
from pathlib import Path
from typing import Dict, List, Optional

SPIECE_UNDERLINE = "▁"
# transformers 4.37's `all_special_tokens`: these attributes and additional_special_tokens,
# not every added token (Yi's <|im_start|> is added, not one of them).
SPECIAL_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def original_special_tokens(*configs: dict) -> set:
    """The tokens transformers 4.37 counted as special, from tokenizer_config.json and
    special_tokens_map.json (strings or AddedToken dicts)."""
    names = set()
    for config in configs:
        values = [config.get(k) for k in SPECIAL_ATTRIBUTES] + list(config.get("additional_special_tokens") or [])
        names |= {v["content"] if isinstance(v, dict) else v for v in values if v}
    return names


class SentencePieceTokenizer:
    def __init__(
        self,
        model_file: Path,
        special: Dict[str, int],
        bos_id: Optional[int],
        add_bos: bool,
        legacy: bool,
        all_special: Optional[set] = None,
    ):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(Path(model_file).read_bytes())
        if not legacy:  # as LlamaTokenizer.get_spm_processor does
            proto.normalizer_spec.add_dummy_prefix = False
        self.sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.special = special  # every added token: the text is split at them
        self.all_special = set(special) if all_special is None else all_special
        self.bos_id, self.add_bos, self.legacy = bos_id, add_bos, legacy
        self.unk_length = len(self.sp.encode(self.sp.id_to_piece(self.sp.unk_id()), out_type=str))

    @classmethod
    def from_checkpoint(
        cls, path: Path, hf_tokenizer, family_legacy: Optional[bool]
    ) -> Optional["SentencePieceTokenizer"]:
        """For a checkpoint with `tokenizer.model`; None otherwise (then transformers tokenises).

        `family_legacy` forces legacy rules (Mistral's fast tokenizer); None reads the config.
        """
        model_file = path / "tokenizer.model"
        if not model_file.exists():
            return None
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
        map_file = path / "special_tokens_map.json"
        special_map = json.loads(map_file.read_text(encoding="utf-8")) if map_file.exists() else {}
        legacy = family_legacy if family_legacy is not None else config.get("legacy", True) is not False
        special = {t.content: i for i, t in hf_tokenizer.added_tokens_decoder.items()}
        return cls(
            model_file,
            special,
            hf_tokenizer.bos_token_id,
            config.get("add_bos_token", True),
            legacy,
            original_special_tokens(config, special_map),
        )

    def split(self, text: str) -> List[str]:
        """Text and special tokens, longest special token first at each position."""
        parts, start, i = [], 0, 0
        names = sorted(self.special, key=len, reverse=True)
        while i < len(text):
            match = next((s for s in names if text.startswith(s, i)), None)
            if match is None:
                i += 1
                continue
            parts += [text[start:i], match] if i > start else [match]
            i = start = i + len(match)
        if start < len(text):
            parts.append(text[start:])
        return parts

    def encode_piece(self, text: str) -> List[int]:
        if self.legacy or not text.startswith((SPIECE_UNDERLINE, " ")):
            return self.sp.encode(text)
        # '<unk>' in front keeps SentencePiece from treating the leading '▁' specially.
        pieces = self.sp.encode(self.sp.id_to_piece(self.sp.unk_id()) + text, out_type=str)
        return [self.sp.piece_to_id(p) for p in pieces[self.unk_length :]]

    def encode(self, text: str) -> List[int]:
        ids = [self.bos_id] if self.add_bos and self.bos_id is not None else []
        if not text:
            return ids
        if not self.legacy:
            text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        parts = self.split(text)
        if not self.legacy and len(parts) > 1 and parts[0] == SPIECE_UNDERLINE and parts[1] in self.all_special:
            parts = parts[1:]
        for part in parts:
            ids += [self.special[part]] if part in self.special else self.encode_piece(part)
        return ids


def chunked_ids(prompt: str, encode, bos: Optional[int], marks: Dict[str, int]) -> List[int]:
    """The original's `tokenizer_image_token`: the prompt split at each placeholder of `marks`
    (`<image>` → its id), every chunk encoded with its BOS, the first chunk's BOS kept only,
    the placeholder's id between chunks."""
    parts = re.split("(" + "|".join(map(re.escape, marks)) + ")", prompt)
    chunks, found = [encode(chunk) for chunk in parts[::2]], parts[1::2]
    offset = 1 if chunks and chunks[0] and bos is not None and chunks[0][0] == bos else 0
    ids = [bos] if offset else []
    for i, chunk in enumerate(chunks):
        if i > 0:
            ids.append(marks[found[i - 1]])
        ids.extend(chunk[offset:])
    return ids
