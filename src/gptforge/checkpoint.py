"""Model checkpoints on disk: weights (safetensors), model config and tokenizer in one directory.

A model directory holds ``model.safetensors``, ``model_config.json`` and ``tokenizer/``. Training checkpoints
(``train/checkpoint.py``) add optimizer and trainer state beside them. :func:`load_model` accepts a step
directory, a run directory (its latest checkpoint), a ``ckpt`` directory, or a Hugging Face GPT-2 directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gptforge.errors import GptforgeError
from gptforge.model import GPT, GPTConfig
from gptforge.tokenizer import Tokenizer, load_tokenizer

WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"
TOKENIZER_DIR = "tokenizer"


def model_state_for_saving(model: GPT) -> dict[str, torch.Tensor]:
    """State dict without the tied head (safetensors refuses shared storage) and without DDP/compile prefixes."""
    model = unwrap(model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def unwrap(model: torch.nn.Module) -> GPT:
    """The bare :class:`GPT` inside DDP/FSDP/``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model  # type: ignore[return-value]


def save_model(directory: str | Path, model: GPT, tokenizer: Tokenizer | None = None, extra: dict | None = None) -> Path:
    """Write weights, model config (plus ``extra`` metadata) and tokenizer into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bare = unwrap(model)
    save_file(model_state_for_saving(bare), str(directory / WEIGHTS), metadata={"format": "pt"})
    meta = {"model": bare.config.to_dict(), **(extra or {})}
    (directory / MODEL_CONFIG).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save(directory / TOKENIZER_DIR)
    return directory


def resolve_checkpoint(path: str | Path) -> Path:
    """Map a run directory, ``ckpt`` directory or pointer file to the concrete checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise GptforgeError(f"checkpoint not found: {path}")
    if path.is_file() and path.name in ("latest", "best"):
        return _follow_pointer(path)
    if (path / WEIGHTS).is_file() and (path / MODEL_CONFIG).is_file():
        return path
    if (path / "config.json").is_file():  # a Hugging Face directory
        return path
    for pointer in (path / "latest", path / "ckpt" / "latest"):
        if pointer.is_file():
            return _follow_pointer(pointer)
    raise GptforgeError(
        f"{path} is not a checkpoint: expected {WEIGHTS} + {MODEL_CONFIG}, a run directory with ckpt/latest, "
        "or a Hugging Face GPT-2 directory with config.json"
    )


def _follow_pointer(pointer: Path) -> Path:
    target = pointer.read_text(encoding="utf-8").strip()
    resolved = (pointer.parent / target).resolve()
    if not (resolved / WEIGHTS).is_file():
        raise GptforgeError(f"{pointer} points to {target}, which holds no {WEIGHTS} (deleted or partial?)")
    return resolved


def is_hf_directory(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / MODEL_CONFIG).is_file()


def read_model_config(directory: str | Path) -> dict:
    path = Path(directory) / MODEL_CONFIG
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise GptforgeError(f"cannot read {path}: {e}") from None


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
               ) -> tuple[GPT, Tokenizer | None, dict]:
    """Load ``(model, tokenizer, metadata)`` from any checkpoint form (see :func:`resolve_checkpoint`)."""
    from safetensors.torch import load_file

    directory = resolve_checkpoint(path)
    if is_hf_directory(directory):
        from gptforge.hf import import_hf

        model, tokenizer = import_hf(directory)
        meta = {"model": model.config.to_dict(), "source": str(directory)}
    else:
        if (directory / "files.json").is_file():  # written by training: check sizes and hashes before use
            from gptforge.train.checkpoint import verify_checkpoint

            verify_checkpoint(directory)
        meta = read_model_config(directory)
        model = GPT(GPTConfig(**meta["model"]))
        state = load_file(str(directory / WEIGHTS))
        if model.config.tie_embeddings:
            state["lm_head.weight"] = state["transformer.wte.weight"]
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise GptforgeError(f"{directory / WEIGHTS} does not match its {MODEL_CONFIG}: {e}") from None
        tok_dir = directory / TOKENIZER_DIR
        tokenizer = load_tokenizer(tok_dir) if tok_dir.is_dir() else None
    meta["path"] = str(directory)
    model.to(device=device, dtype=dtype) if dtype else model.to(device)
    model.eval()
    return model, tokenizer, meta
