"""gptforge.io: atomic writes, JSON/JSONL reading with file:line errors, file hashing."""

import hashlib
import json
import os

import pytest

from gptforge.errors import GptforgeError
from gptforge.io import (
    atomic_write_bytes,
    atomic_write_text,
    fsync_dir,
    iter_jsonl,
    read_json,
    sha256_file,
    write_json,
)


def test_atomic_writes_create_parents_replace_and_leave_only_the_target(tmp_path):
    path = tmp_path / "a" / "b" / "out.bin"
    assert atomic_write_bytes(path, b"one", fsync=True) == path
    atomic_write_bytes(path, bytearray(b"two"))
    assert path.read_bytes() == b"two"
    atomic_write_text(tmp_path / "t.txt", "naïve 東京\n")
    assert (tmp_path / "t.txt").read_bytes() == "naïve 東京\n".encode()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["out.bin", "t.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # like open(..., "w"), not mkstemp's 0600


def test_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "result.json"
    write_json(path, {"ok": 1})
    before = path.read_bytes()
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})  # the serializer fails
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # the write itself fails after the temp file was opened
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_write_json_is_utf8_with_a_trailing_newline_and_round_trips(tmp_path):
    obj = {"name": "café", "values": [1, 2.5, None], "nested": {"ok": True}}
    path = write_json(tmp_path / "x.json", obj)
    text = path.read_text(encoding="utf-8")
    assert text == json.dumps(obj, indent=2, ensure_ascii=False) + "\n" and "café" in text
    assert read_json(path) == obj
    write_json(path, obj, indent=None)
    assert path.read_text(encoding="utf-8").count("\n") == 1


def test_read_json_errors_name_the_file_line_and_column(tmp_path):
    bad = tmp_path / "cfg.json"
    bad.write_text('{\n  "a": 1,\n  "b": ,\n}\n', encoding="utf-8")
    with pytest.raises(GptforgeError, match=r"run config .*cfg\.json:3:8 is not valid JSON .*fix") as e:
        read_json(bad, "run config")
    assert "\n" not in str(e.value)
    with pytest.raises(GptforgeError, match=r"JSON file not found: .*missing\.json; check the path"):
        read_json(tmp_path / "missing.json")
    (tmp_path / "latin1.json").write_bytes(b'{"a": "caf\xe9"}')
    with pytest.raises(GptforgeError, match=r"latin1\.json is not UTF-8"):
        read_json(tmp_path / "latin1.json")


def test_iter_jsonl_yields_line_numbers_skips_blanks_and_names_the_bad_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"a": 1}\n\n   \n[1, 2]\n"s"\r\n{"a": 2}', encoding="utf-8")
    assert list(iter_jsonl(path)) == [(1, {"a": 1}), (4, [1, 2]), (5, "s"), (6, {"a": 2})]
    path.write_text('{"a": 1}\n\n{"a": }\n{"a": 3}\n', encoding="utf-8")
    rows = iter_jsonl(path)
    assert next(rows) == (1, {"a": 1})  # lazy: records before the bad line are usable
    with pytest.raises(
        GptforgeError,
        match=r"data\.jsonl:3: not valid JSON \(.* at column 7\).*fix or remove",
    ):
        next(rows)
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(GptforgeError, match=r"data\.jsonl:2: not valid JSON \(not UTF-8\)"):
        list(iter_jsonl(path))
    with pytest.raises(GptforgeError, match="JSONL file not found"):
        list(iter_jsonl(tmp_path / "nope.jsonl"))


def test_iter_jsonl_reads_a_real_benchmark_file(data_dir):
    path = data_dir / "eval" / "mmlu_dev.jsonl"
    rows = list(iter_jsonl(path))
    assert len(rows) == 285 and rows[0][0] == 1
    assert {"question", "subject", "choices", "answer"} <= set(rows[0][1])


def test_sha256_file_matches_hashlib_on_a_real_file(data_dir):
    path = data_dir / "pretrain" / "tinyshakespeare.txt"
    want = hashlib.sha256(path.read_bytes()).hexdigest()
    assert sha256_file(path) == want
    assert sha256_file(path, chunk=4097) == want  # chunk boundaries do not matter
    lines = (data_dir / "SHA256SUMS").read_text().splitlines()
    sums = {name: digest for digest, name in (line.split() for line in lines if line.strip())}
    assert sums["./pretrain/tinyshakespeare.txt"] == want  # and the published checksum


def test_fsync_dir_is_best_effort(tmp_path):
    fsync_dir(tmp_path)
    fsync_dir(tmp_path / "does-not-exist")  # ignored, no exception
