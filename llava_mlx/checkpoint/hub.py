"""Where a checkpoint is: a local directory, or a Hugging Face repo id (downloaded, or found in
the cache; with HF_HUB_OFFLINE=1 or no network, one line that says so)."""

import os
from pathlib import Path
from typing import Optional

from ..errors import LlavaError

# + the .bin files of LoRA and projector-only checkpoints (adapters.py), which ship no others
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"] + [
    "adapter_model.bin",
    "non_lora_trainables.bin",
    "mm_projector.bin",
]


def resolve(path_or_repo: str, what: str = "model", patterns=HUB_PATTERNS) -> Path:
    """A local directory, or a Hugging Face repo id fetched (or found in the cache)."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.exists() or path_or_repo.startswith((".", "/", "~")) or path_or_repo.count("/") != 1:
        raise LlavaError(f"{what} '{path_or_repo}' is not a directory nor a Hugging Face repo id")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(path_or_repo, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        reason = "HF_HUB_OFFLINE is set" if offline else "no network"
        raise LlavaError(
            f"cannot download {what} '{path_or_repo}' ({reason}) and it is not in the local "
            f"cache; pass --{what.replace(' ', '-')} PATH to a local checkpoint"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise LlavaError(f"cannot download {what} '{path_or_repo}': {str(e).splitlines()[0]}") from None


def cached_tower(location: str) -> Optional[Path]:
    """The named tower's config directory when it can be had (a path, the hub cache, or a
    download of its small JSON files), else None.

    LLaVA-1.6 ships its fine-tuned tower: the named one only supplies the vision config
    and the image processor's settings, which default to CLIP ViT-L/14-336's (the tower
    of every released LLaVA) when it is not at hand; the weights' shapes are checked.
    """
    path = Path(location).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(location, allow_patterns=["*.json"]))
    except (LocalEntryNotFoundError, HfHubHTTPError, ValueError, OSError):
        return None
