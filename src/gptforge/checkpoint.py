"""Model checkpoints on disk: weights (safetensors), model config and tokenizer in one directory.

A model directory holds ``model.safetensors``, ``model_config.json`` and ``tokenizer/``. Training checkpoints
(``train/checkpoint.py``) add optimizer and trainer state beside them. :func:`load_model` accepts a step
directory, a run directory (its latest checkpoint), a ``ckpt`` directory, or a Hugging Face GPT-2 directory.

Every read goes through the checks here: :func:`verify_files` (sizes and SHA-256 from ``files.json`` where a
training run wrote one; ``GPTFORGE_VERIFY_HASHES=0`` checks sizes only, for huge files), :func:`read_safetensors`
and :func:`read_model_config`, each turning a damaged or malformed file into one error naming it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from gptforge.errors import GptforgeError
from gptforge.model import GPT, GPTConfig
from gptforge.model_modern import build_model
from gptforge.tokenizer import Tokenizer, load_tokenizer

WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"
TOKENIZER_DIR = "tokenizer"
FILES_MANIFEST = "files.json"
DAMAGED = ("the checkpoint is damaged (a partial copy? a disk error?): copy it again from its source, or use "
           "another checkpoint of the run")


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
    meta = {"family": getattr(bare.config, "family", "gpt2"), "model": bare.config.to_dict(), **(extra or {})}
    (directory / MODEL_CONFIG).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save(directory / TOKENIZER_DIR)
    return directory


def resolve_checkpoint(path: str | Path) -> Path:
    """Map a run directory, ``ckpt`` directory, pointer file or Hub model name (``gpt2``,
    ``openai-community/gpt2``: see :mod:`gptforge.hub_models`) to the concrete checkpoint directory."""
    from gptforge.hub_models import download, hub_repo

    repo = hub_repo(path)
    if repo is not None:  # gpt2, openai-community/gpt2, ...: a Hub snapshot (cached after the first download)
        try:
            return download(repo)
        except GptforgeError as e:
            raise GptforgeError(f"checkpoint not found: {path} is not a local path; as a Hub model: {e}") from None
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
    target = pointer.read_text(encoding="utf-8", errors="replace").strip()
    resolved = (pointer.parent / target).resolve()
    if not (resolved / WEIGHTS).is_file():
        raise GptforgeError(f"{pointer} points to {target}, which holds no {WEIGHTS} (deleted or partial?)")
    return resolved


def is_hf_directory(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / MODEL_CONFIG).is_file()


def verify_files(directory: str | Path, hint: str = DAMAGED, hashes: bool | None = None) -> None:
    """Check every file listed in ``directory/files.json`` (presence, size, and SHA-256 unless ``hashes`` is
    false; default: ``GPTFORGE_VERIFY_HASHES`` unset or not ``0``). A directory without the manifest passes."""
    from gptforge.io import sha256_file

    d = Path(directory)
    manifest_path = d / FILES_MANIFEST
    if not manifest_path.is_file():
        return
    if hashes is None:
        hashes = os.environ.get("GPTFORGE_VERIFY_HASHES", "1") != "0"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GptforgeError(f"{manifest_path}: not valid JSON ({e}); {hint}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
            isinstance(i, dict) and isinstance(i.get("bytes"), int) and isinstance(i.get("sha256"), str)
            for i in files.values()):
        raise GptforgeError(f"{manifest_path}: expected {{\"files\": {{NAME: {{\"bytes\": N, \"sha256\": HEX}}}}}}; "
                            f"{hint}")
    for rel, info in files.items():
        p = d / rel
        if not p.is_file():
            raise GptforgeError(f"{d}: file {rel} is missing; {hint}")
        size = p.stat().st_size
        if size != info["bytes"]:
            raise GptforgeError(f"{p}: {size} bytes, expected {info['bytes']}; {hint}")
        if hashes and sha256_file(p) != info["sha256"]:
            raise GptforgeError(f"{p}: SHA-256 does not match {FILES_MANIFEST}; {hint}")


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a truncated, empty or foreign file is one error naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise GptforgeError(f"{path} not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise GptforgeError(f"{path} is not a readable safetensors file ({' '.join(str(e).split())}): the file is "
                            "truncated or damaged; copy it again from its source") from None


def read_model_config(directory: str | Path, name: str = MODEL_CONFIG) -> dict:
    """``model_config.json`` (or the classifier's config): a mapping whose ``model`` key is a mapping."""
    path = Path(directory) / name
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GptforgeError(f"cannot read {path}: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise GptforgeError(f"{path}: expected an object with a \"model\" section (n_layer, n_head, ...); the file is "
                            "damaged or not a gptforge model config")
    return meta


def model_config(meta: dict, directory: str | Path, name: str = MODEL_CONFIG) -> GPTConfig:
    """The config in a model config file, of its family (``family`` at the top or in ``model``; default GPT-2,
    :class:`GPTConfig`; ``modern``: :class:`~gptforge.model_modern.ModernConfig`), every key type-checked (errors
    name the file and key)."""
    from gptforge.model_modern import config_from_dict

    data = dict(meta["model"])
    if "family" in meta and "family" not in data:
        data["family"] = meta["family"]
    return config_from_dict(data, where=f"{Path(directory) / name}: model")


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
               ) -> tuple[GPT, Tokenizer | None, dict]:
    """Load ``(model, tokenizer, metadata)`` from any checkpoint form (see :func:`resolve_checkpoint`)."""
    directory = resolve_checkpoint(path)
    if is_hf_directory(directory):
        from gptforge.hf import import_hf

        model, tokenizer = import_hf(directory)
        meta = {"model": model.config.to_dict(), "source": str(directory)}
    else:
        verify_files(directory)  # training wrote files.json: sizes and hashes before use
        meta = read_model_config(directory)
        model = build_model(model_config(meta, directory))
        state = read_safetensors(directory / WEIGHTS)
        if model.config.tie_embeddings:
            state["lm_head.weight"] = state["transformer.wte.weight"]
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise GptforgeError(f"{directory / WEIGHTS} does not match its {MODEL_CONFIG}: "
                                f"{' '.join(str(e).split())[:300]}") from None
        tok_dir = directory / TOKENIZER_DIR
        tokenizer = load_tokenizer(tok_dir) if tok_dir.is_dir() else None
    meta["path"] = str(directory)
    model.to(device=device, dtype=dtype) if dtype else model.to(device)
    model.eval()
    return model, tokenizer, meta
