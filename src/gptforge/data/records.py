"""Instruction and preference records from local ``.json``/``.jsonl``/``.parquet`` files or a hub dataset name."""

from __future__ import annotations

import json
from pathlib import Path

from gptforge.errors import GptforgeError
from gptforge.io import iter_jsonl


def load_records(source: str | Path, hub_split: str = "train") -> list[dict]:
    """Records from a local ``.json`` (a list, or a dict holding one), ``.jsonl`` or ``.parquet`` file,
    or from a Hugging Face hub dataset name (``tatsu-lab/alpaca``) via ``datasets``."""
    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        return _read_json(path)
    if path.exists():
        raise GptforgeError(f"{path} is not a file; pass a .json/.jsonl/.parquet file or a hub dataset name")
    looks_like_file = path.suffix.lower() in (".json", ".jsonl", ".parquet") or str(source).startswith((".", "/"))
    if looks_like_file or str(source).count("/") != 1:
        raise GptforgeError(f"data file not found: {source} (pass a .json/.jsonl/.parquet file or a hub "
                            "dataset name like tatsu-lab/alpaca)")
    try:
        import datasets
    except ImportError:
        raise GptforgeError(f"{source} is not a local file; loading hub datasets needs: pip install "
                            "'gptforge[data]'") from None
    try:
        ds = datasets.load_dataset(str(source), split=hub_split)
    except Exception as e:
        raise GptforgeError(f"cannot load hub dataset {source!r} (split {hub_split!r}): {e}; "
                            "check the name and your network, or pass a local file") from None
    return [dict(r) for r in ds]


def _read_json(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{") and "\n{" in text:
            return _read_jsonl(path)  # JSON lines saved as .json
        raise GptforgeError(f"invalid JSON in {path}:{e.lineno}: {e.msg}") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise GptforgeError(f"{path}: expected a list of records (or an object holding exactly one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise GptforgeError(f"{path}: expected a list of records, got {type(data).__name__}")
    return data


def _read_jsonl(path: Path) -> list[dict]:
    return [record for _, record in iter_jsonl(path)]
