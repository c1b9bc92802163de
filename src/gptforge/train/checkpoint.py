"""Training checkpoints: weights + optimizer + trainer state, written atomically and verified on load.

Layout (DESIGN.md): ``<run>/ckpt/step_NNNNNNN/`` holds ``model.safetensors``, ``model_config.json`` and
``tokenizer/`` (see :func:`gptforge.checkpoint.save_model`), plus ``optimizer.pt`` (optimizer and grad-scaler
state, read back with ``torch.load(weights_only=True)``), ``state.json`` (step, tokens, RNG states, loader
position, best metric, config) and ``files.json`` (size and SHA-256 of every file). ``ckpt/latest`` and
``ckpt/best`` are pointer files holding a step directory name.

A checkpoint is written into ``ckpt/.tmp-step_NNNNNNN``, every file fsynced, then renamed into place, so a kill
at any moment leaves the previous checkpoints intact; :func:`verify_checkpoint` refuses partial or corrupted ones.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from gptforge.checkpoint import FILES_MANIFEST, read_safetensors, save_model, verify_files
from gptforge.errors import GptforgeError
from gptforge.io import atomic_write_text, fsync_dir, sha256_file

OPTIMIZER = "optimizer.pt"
STATE = "state.json"
STEP_PREFIX = "step_"


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:07d}"


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for d in [directory, *[p for p in directory.rglob("*") if p.is_dir()]]:
        fsync_dir(d)


def write_pointer(ckpt_root: Path, name: str, target: str) -> None:
    """Atomically write pointer file ``ckpt_root/name`` (``latest`` or ``best``) naming ``target``."""
    atomic_write_text(Path(ckpt_root) / name, target + "\n", fsync=True)
    fsync_dir(ckpt_root)


def read_pointer(ckpt_root: Path, name: str) -> str | None:
    p = ckpt_root / name
    return p.read_text(encoding="utf-8").strip() if p.is_file() else None


def gpt_writer(model, tokenizer=None, model_state: dict | None = None, extra: dict | None = None):
    """A ``write_model`` for :func:`save_checkpoint`: a GPT's weights, config and tokenizer.

    ``model`` is the bare model; under FSDP pass the gathered full ``model_state`` (rank 0 writes alone).
    """
    def write(directory: Path) -> None:
        if model_state is None:
            save_model(directory, model, tokenizer, extra=extra)
            return
        from safetensors.torch import save_file

        from gptforge.checkpoint import MODEL_CONFIG, TOKENIZER_DIR, WEIGHTS

        state = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
        if model.config.tie_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(directory / WEIGHTS), metadata={"format": "pt"})
        (directory / MODEL_CONFIG).write_text(json.dumps({"model": model.config.to_dict(), **(extra or {})},
                                                         indent=2), encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(directory / TOKENIZER_DIR)
    return write


def save_checkpoint(ckpt_root: str | Path, step: int, *, write_model, optimizer_state: dict | None,
                    trainer_state: dict, keep_last: int = 3, is_best: bool = False) -> Path:
    """Write checkpoint ``step`` atomically, move ``latest`` (and ``best``), prune to the last ``keep_last``.

    ``write_model(directory)`` writes the model files (e.g. :func:`gpt_writer`); this function adds
    ``optimizer.pt`` (when given), ``state.json`` and the ``files.json`` manifest, fsyncs and renames.
    """
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    final, tmp = ckpt_root / name, ckpt_root / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write_model(tmp)
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / OPTIMIZER)
    (tmp / STATE).write_text(json.dumps(trainer_state, indent=1), encoding="utf-8")
    files = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / FILES_MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1), encoding="utf-8")
    _fsync_tree(tmp)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace the old copy
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(ckpt_root)
    write_pointer(ckpt_root, "latest", name)
    if is_best:
        write_pointer(ckpt_root, "best", name)
    prune_checkpoints(ckpt_root, keep_last)
    return final


def list_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """Completed step directories, oldest first (temporary directories excluded)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX))


def prune_checkpoints(ckpt_root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints; never the one ``best`` points to."""
    if keep_last <= 0:
        return
    protected = {read_pointer(ckpt_root, "best"), read_pointer(ckpt_root, "latest")}
    for old in list_checkpoints(ckpt_root)[:-keep_last]:
        if old.name not in protected:
            shutil.rmtree(old, ignore_errors=True)


def verify_checkpoint(directory: str | Path) -> dict:
    """Check every file against ``files.json`` (presence, size, SHA-256); return the trainer state.

    Raises :class:`GptforgeError` naming the first problem and how to recover.
    """
    hint = ("the checkpoint is partial or corrupted (killed while copying? disk full?); resume with "
            "--checkpoint.fallback=true to use the previous good checkpoint, or delete this directory")
    if not (Path(directory) / FILES_MANIFEST).is_file():
        raise GptforgeError(f"{directory}: no {FILES_MANIFEST}; {hint}")
    verify_files(directory, hint, hashes=True)
    return read_trainer_state(directory)


def read_trainer_state(directory: str | Path) -> dict:
    """``state.json`` of a checkpoint (already verified by :func:`verify_checkpoint`)."""
    path = Path(directory) / STATE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        state = e
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        why = state if isinstance(state, Exception) else "expected an object with an integer step"
        raise GptforgeError(f"{path}: unreadable ({why}); the checkpoint is partial or corrupted: delete it, or "
                            "resume with --checkpoint.fallback=true")
    return state


def find_resume_checkpoint(ckpt_root: str | Path, fallback: bool = False, log=print) -> Path | None:
    """The checkpoint to resume from: the newest when valid; with ``fallback``, the newest valid older one.

    Returns ``None`` when the run has no checkpoint yet.
    """
    root = Path(ckpt_root)
    candidates = list_checkpoints(root)
    if not candidates:
        return None
    # newest step first: a finished fine-tuning run points ``latest`` at its best (possibly older) checkpoint
    ordered = sorted(candidates, reverse=True)
    first_error: GptforgeError | None = None
    for cand in ordered:
        try:
            verify_checkpoint(cand)
            if first_error is not None:
                log(f"warning: {first_error}\nfalling back to the previous good checkpoint {cand}")
            return cand
        except GptforgeError as e:
            if not fallback:
                raise
            first_error = first_error or e
    raise GptforgeError(f"no valid checkpoint in {root}: {first_error}")


def load_optimizer_state(directory: str | Path, map_location="cpu") -> dict:
    """The optimizer/scaler state of a checkpoint (loaded with ``weights_only=True``)."""
    return torch.load(Path(directory) / OPTIMIZER, map_location=map_location, weights_only=True)


def load_weights(directory: str | Path, tie_embeddings: bool = False) -> dict[str, torch.Tensor]:
    """A checkpoint's GPT weights; with ``tie_embeddings`` the head entry is restored from the token table."""
    from gptforge.checkpoint import WEIGHTS

    weights = read_safetensors(Path(directory) / WEIGHTS)
    if tie_embeddings:
        weights["lm_head.weight"] = weights["transformer.wte.weight"]
    return weights


def load_gpt_weights(model, directory: str | Path) -> None:
    """Load a checkpoint's GPT weights into ``model`` (re-tying a tied head)."""
    model.load_state_dict(load_weights(directory, model.config.tie_embeddings))
