"""Models by Hugging Face Hub name: ``gptforge import openai-community/gpt2`` and ``--checkpoint gpt2`` anywhere.

A name that is not a local path resolves to a snapshot of the Hub repo (``config.json``, the weights and the
tokenizer files only), downloaded once into the Hugging Face cache and read from there afterwards, offline too.
Offline with nothing cached, it is one error that says where to get the files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from gptforge.errors import GptforgeError

# The GPT-2 family under its short names (the Hub ids OpenAI's weights live under since 2024).
MODELS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}
FILES = ["config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
         "model-*.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
         "special_tokens_map.json"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_repo(spec: str | Path) -> str | None:
    """The Hub repo id ``spec`` names (a short name or ``OWNER/NAME``), or None when it is a local path."""
    text = str(spec)
    if Path(text).exists():
        return None
    if text in MODELS:
        return MODELS[text]
    return text if _REPO_ID.match(text) and not text.startswith((".", "/")) else None


def offline() -> bool:
    return any(os.environ.get(k) == "1" for k in ("HF_HUB_OFFLINE", "GPTFORGE_OFFLINE", "TRANSFORMERS_OFFLINE"))


def download(repo_id: str) -> Path:
    """A local snapshot of ``repo_id`` (from the cache when present; downloaded when online)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise GptforgeError(f"{repo_id} is a Hub model name; reading it needs huggingface_hub: "
                            "pip install 'gptforge[hf]', or pass a local directory") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=FILES, local_files_only=offline()))
    except Exception as e:
        where = ("offline (HF_HUB_OFFLINE/GPTFORGE_OFFLINE is set) and it is not in the Hugging Face cache"
                 if offline() else f"{type(e).__name__}: {' '.join(str(e).split())[:160]}")
        raise GptforgeError(f"cannot get the Hub model {repo_id}: {where}; on a machine with internet run "
                            f"`gptforge import {repo_id} --out DIR` and pass DIR instead") from None
