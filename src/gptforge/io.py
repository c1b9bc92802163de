"""The one copy of atomic writes, JSON/JSONL and hashing."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gptforge.errors import GptforgeError


def atomic_write_bytes(path: str | Path, data: bytes | bytearray | memoryview, *, fsync: bool = False
                       ) -> Path:
    """Write ``data`` to a temporary file beside ``path``, optionally fsync it, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")  # opened with "x": honours the umask
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str, *, fsync: bool = False) -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2, fsync: bool = False, default=None) -> Path:
    """Write ``obj`` as UTF-8 JSON (non-ASCII kept, trailing newline) atomically; ``default`` as in json.dumps."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False, default=default) + "\n"
    return atomic_write_text(path, text, fsync=fsync)


def read_text(path: str | Path, what: str = "file") -> str:
    """A UTF-8 text file's content; a missing, unreadable or binary file is a GptforgeError naming it."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError):
        raise GptforgeError(f"{what} not found: {path}; check the path") from None
    except UnicodeDecodeError as e:
        raise GptforgeError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                            "fix or regenerate it") from None
    except OSError as e:
        raise GptforgeError(f"cannot read {what} {path}: {e.strerror or e}") from None


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """The parsed content of a JSON file; a missing, unreadable or invalid file is a GptforgeError."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise GptforgeError(f"{what} {path}:{e.lineno}:{e.colno} is not valid JSON ({e.msg}); "
                            "fix or regenerate it") from None


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for each non-blank line; an invalid line is an error naming ``path:line``."""
    path = Path(path)
    if not path.is_file():
        raise GptforgeError(f"JSONL file not found: {path}; check the path")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                obj = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                why = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else "not UTF-8"
                raise GptforgeError(f"{path}:{lineno}: not valid JSON ({why}); "
                                    "each line must hold one JSON value: fix or remove that line") from None
            yield lineno, obj


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in ``chunk``-byte blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str | Path) -> None:
    """Best-effort fsync of a directory (makes renames in it durable); OSError is ignored."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def output_directory(path: str | Path, flag: str = "--out", overwrite: bool = False) -> Path:
    """A directory a command may write into: new or empty, or (with ``--overwrite``) anything but a file.

    An existing file, or a directory that already holds files, is refused with a one-line error, so a command
    never replaces what a user keeps there without being asked.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise GptforgeError(f"{flag} {path} is an existing file, not a directory: pass a new directory name")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise GptforgeError(f"{flag} {path} is not empty: pass a new or empty directory, or --overwrite to replace "
                            "the files this command writes there")
    path.mkdir(parents=True, exist_ok=True)
    return path
