"""Shared fixtures: the offline data folder (../shared/data) and small helpers."""

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("GPTFORGE_DATA_DIR", ROOT.parent / "shared" / "data")).resolve()
os.environ["GPTFORGE_DATA_DIR"] = str(DATA)
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(DATA / "tokenizers" / "gpt2" / "tiktoken_cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"offline data not found at {DATA}; set GPTFORGE_DATA_DIR")
    return DATA
