"""What a ``data prepare`` output directory already holds, and whether a run may continue there.

The fingerprint names the options, the tokenizer and every input (local files by size and SHA-256); the
checkpoint and the manifest carry it, and a rerun whose fingerprint differs is refused with the difference
named, instead of mixing old and new text.
"""

from __future__ import annotations

from pathlib import Path

from gptforge.data import shards as shardfmt
from gptforge.errors import GptforgeError
from gptforge.io import read_json, sha256_file

STATE = ".prepare_state.json"
HISTOGRAM_PNG = "doc_lengths.png"


def _source_id(src) -> dict:
    """What identifies an input in the fingerprint: its description, size and (local files) content hash."""
    ident = {**src.describe(), "bytes": src.size}
    if src.kind != "hub":
        try:
            ident["sha256"] = sha256_file(src.path)
        except OSError as e:
            raise GptforgeError(f"cannot read input {src.path}: {e.strerror or e}; check the path") from None
    return ident


def fingerprint_of(cfg, tokenizer, sources) -> dict:
    """Options, tokenizer and inputs of a prepare run (``cfg`` is its PrepareConfig). The val inputs of
    --val-split/--val-source are among ``sources`` (marked ``all_val``); options left at their defaults add
    no key, so directories prepared before those options existed keep their fingerprint."""
    fingerprint = {
        "tokenizer": {
            "name": tokenizer.name,
            "hash": tokenizer.content_hash(),
            "vocab_size": tokenizer.vocab_size,
        },
        # ~1.5 GB/s of sha256, well under tokenizing speed: a 38 MB file costs ~25 ms
        "sources": [_source_id(s) for s in sources],
        "val_fraction": cfg.val_fraction,
        "split_salt": cfg.split_salt,
        "shard_tokens": cfg.shard_tokens,
        "max_tokens": cfg.max_tokens,
        "skip_bad": cfg.skip_bad,
    }
    if cfg.sample_docs is not None:
        fingerprint["sample"] = {"docs": cfg.sample_docs, "seed": cfg.sample_seed}
    if cfg.val_split is not None:
        fingerprint["val_split"] = cfg.val_split
    return fingerprint


def our_files(out: Path) -> list[Path]:
    names = [shardfmt.MANIFEST, STATE, HISTOGRAM_PNG]
    return (
        [out / n for n in names if (out / n).exists()]
        + sorted(out.glob("train_*.bin*"))
        + sorted(out.glob("val_*.bin*"))
        + sorted(out.glob(".prepare_tail_*.npz"))
        + temp_files(out)
    )


def temp_files(out: Path) -> list[Path]:
    """Temporary files a killed run may leave behind (``.<name>.<random>.tmp``, see :mod:`gptforge.io`)."""
    names = ["train_*.bin", "val_*.bin", shardfmt.MANIFEST, STATE, HISTOGRAM_PNG]
    return sorted(p for n in names for p in out.glob(f".{n}.*.tmp"))


def _comparable(old: dict, fingerprint: dict) -> dict:
    """``fingerprint`` without the input hashes ``old`` lacks (written before inputs were hashed), so such a
    directory still compares by path and size rather than failing as 'changed'."""
    old_sources, new_sources = old.get("sources"), fingerprint["sources"]
    if not isinstance(old_sources, list) or len(old_sources) != len(new_sources):
        return fingerprint
    sources = [n if isinstance(o, dict) and "sha256" in o else {k: v for k, v in n.items() if k != "sha256"}
               for o, n in zip(old_sources, new_sources)]
    return {**fingerprint, "sources": sources}


def _sources_change(old: list, new: list, since: str) -> str:
    """Which inputs differ between two fingerprints, in a few words."""
    if not isinstance(old, list) or not all(isinstance(o, dict) for o in old):
        return "the recorded inputs are unreadable"
    old_paths, new_paths = [o.get("path") for o in old], [n.get("path") for n in new]
    if old_paths != new_paths:
        added = [p for p in new_paths if p not in old_paths]
        removed = [p for p in old_paths if p not in new_paths]
        parts = ([f"added {', '.join(map(str, added[:3]))}"] if added else []) + (
            [f"removed {', '.join(map(str, removed[:3]))}"] if removed else [])
        return "; ".join(parts) or "the inputs are in a different order"
    details = []
    for o, n in zip(old, new):
        if o == n:
            continue
        if o.get("sha256") != n.get("sha256") or o.get("bytes") != n.get("bytes"):
            ob, nb = o.get("bytes"), n.get("bytes")
            size = "same size" if ob == nb else f"{ob} -> {nb} bytes"
            sha = f"sha256 {str(o.get('sha256'))[:12]} -> {str(n.get('sha256'))[:12]}"
            details.append(f"{n['path']} changed since {since} ({size}, {sha})")
        else:
            keys = sorted(k for k in set(o) | set(n) if o.get(k) != n.get(k))
            details.append(f"{n['path']}: " + ", ".join(f"{k} {o.get(k)!r} -> {n.get(k)!r}" for k in keys))
    more = f" and {len(details) - 3} more" if len(details) > 3 else ""
    return "; ".join(details[:3]) + more


def check_existing(out: Path, fingerprint: dict, overwrite: bool) -> tuple[str, dict | None]:
    """('fresh'|'done'|'resume', previous state) after checking what ``out`` already holds."""
    manifest_path, state_path = out / shardfmt.MANIFEST, out / STATE
    previous = None
    if manifest_path.is_file():
        previous = shardfmt.read_manifest(out)
    elif state_path.is_file():
        previous = read_json(state_path, "prepare checkpoint")
    if overwrite:
        for p in our_files(out):
            p.unlink()
        return "fresh", None
    if previous is None:
        stray = sorted(out.glob("train_*.bin")) + sorted(out.glob("val_*.bin"))
        if stray:
            raise GptforgeError(
                f"{out} already holds shards ({stray[0].name}, ...) but no manifest: "
                "use a new --out directory or pass --overwrite"
            )
        return "fresh", None
    old = previous.get("fingerprint", {})
    old_tok, new_tok = old.get("tokenizer", {}), fingerprint["tokenizer"]
    if old_tok.get("hash") != new_tok["hash"]:
        raise GptforgeError(
            f"{out} holds shards made with tokenizer {old_tok.get('name')!r} (hash {old_tok.get('hash')}, vocab "
            f"{old_tok.get('vocab_size')}), not {new_tok['name']!r} (hash {new_tok['hash']}, vocab "
            f"{new_tok['vocab_size']}): use a new --out directory or pass --overwrite"
        )
    fingerprint = _comparable(old, fingerprint)
    if old != fingerprint:
        changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        since = "it was prepared" if manifest_path.is_file() else "the interrupted run"
        detail = (f": {_sources_change(old.get('sources'), fingerprint['sources'], since)}"
                  if "sources" in changed else "")
        raise GptforgeError(
            f"{out} holds data prepared with different options ({', '.join(changed)}){detail}; "
            "use a new --out directory or pass --overwrite"
        )
    return ("done" if manifest_path.is_file() else "resume"), previous
