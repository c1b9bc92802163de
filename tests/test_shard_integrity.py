"""Shard integrity on read (sha256, token ids vs the vocabulary) and `data prepare` refusing changed inputs."""

import json
import shutil
from pathlib import Path

import pytest

from gptforge.cli import main
from gptforge.data import prepare as prep
from gptforge.data import shards
from gptforge.data.loader import TokenLoader, validation_windows
from gptforge.data.prepare import PrepareConfig, prepare
from gptforge.data.shards import MANIFEST, read_shard, verify_shard
from gptforge.errors import GptforgeError
from gptforge.eval.loss import shard_stream
from gptforge.io import sha256_file

T = 16


@pytest.fixture(scope="module")
def slice_txt(data_dir, tmp_path_factory):
    """The first 30 kB of tinyshakespeare (paragraphs as documents)."""
    path = tmp_path_factory.mktemp("src") / "slice.txt"
    path.write_text((data_dir / "pretrain/tinyshakespeare.txt").read_text(encoding="utf-8")[:30_000],
                    encoding="utf-8")
    return path


def _cfg(sources, out, **kw):
    opts = {"separator": "blank", "val_fraction": 0.2, "workers": 1, "shard_tokens": 2000, "progress": False,
            "histogram": False}
    return PrepareConfig([str(s) for s in sources], str(out), **{**opts, **kw})


@pytest.fixture(scope="module")
def prepared(slice_txt, tmp_path_factory):
    """~7k GPT-2 tokens in 2,000-token shards: three or four train shards, one val shard, per-shard sha256."""
    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare(_cfg([slice_txt], out))
    return out


@pytest.fixture
def copy(prepared, tmp_path):
    """A private copy of the prepared data to damage."""
    return shutil.copytree(prepared, tmp_path / "data")


def _flip_middle(path):
    """Corrupt a shard in place without changing its size (bit rot, a bad copy)."""
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 8] = bytes(b ^ 0x01 for b in raw[mid:mid + 8])  # ids change by 1 or 256: still plausible
    path.write_bytes(bytes(raw))


def test_manifest_records_a_sha256_per_shard(prepared):
    m = json.loads((prepared / MANIFEST).read_text())
    assert {s["split"] for s in m["shards"]} == {"train", "val"}
    for s in m["shards"]:
        assert verify_shard(prepared / s["name"], s["sha256"]) == int(read_shard(prepared / s["name"]).max())


def test_same_size_corruption_is_refused_by_loader_validation_and_eval(copy):
    for name in ("train_00000.bin", "val_00000.bin"):
        _flip_middle(copy / name)
    # lazy: building the loader reads headers only; the first batch (shard 0 in unshuffled order) checks it
    loader = TokenLoader(copy, "train", T, micro_batch=2, mode="sequential", shuffle=False)
    with pytest.raises(GptforgeError, match=r"shard .*train_00000\.bin is corrupted: sha256 [0-9a-f]{64}, the "
                                            r"manifest records [0-9a-f]{64}; re-run `gptforge data prepare .*"
                                            r"--overwrite`"):
        loader.next_batch()
    with pytest.raises(GptforgeError, match=r"val_00000\.bin is corrupted"):
        validation_windows(copy, T, max_tokens=200)
    with pytest.raises(GptforgeError, match=r"val_00000\.bin is corrupted"):
        shard_stream(copy, "val")
    # an intact shard of the same directory is still read
    rest = TokenLoader(copy, "train", T, micro_batch=1, mode="sequential", shuffle=False)
    rest.step = (len(read_shard(copy / "train_00000.bin")) - 1) // T  # the first window of shard 1
    x, _ = rest.next_batch()
    assert x[0].tolist() == read_shard(copy / "train_00001.bin")[:T].tolist()


def test_token_ids_beyond_the_model_vocabulary_are_a_tokenizer_mismatch(prepared):
    top = max(int(read_shard(p).max()) for p in sorted(prepared.glob("val_*.bin")))
    assert 1000 <= top < 50257  # GPT-2 ids
    msg = rf"val_00000\.bin holds token id {top} but the model's vocabulary has only 1,000 tokens .*tokenizer"
    with pytest.raises(GptforgeError, match=msg):
        validation_windows(prepared, T, max_tokens=10_000, vocab_size=1000)
    with pytest.raises(GptforgeError, match=msg):
        shard_stream(prepared, "val", vocab_size=1000)
    with pytest.raises(GptforgeError, match=r"train_0000\d\.bin holds token id \d+ but .* only 1,000 tokens"):
        TokenLoader(prepared, "train", T, micro_batch=4, vocab_size=1000).next_batch()
    # the model's own vocabulary passes
    TokenLoader(prepared, "train", T, micro_batch=4, vocab_size=50257).next_batch()
    assert validation_windows(prepared, T, max_tokens=200, vocab_size=50257).shape == (200 // T, T + 1)


def test_shards_without_a_manifest_entry_still_get_the_vocabulary_check(shakespeare_shards):
    """The fixture's manifest lists no shards: no sha256 to compare, but ids are still checked."""
    loader = TokenLoader(shakespeare_shards, "train", T, micro_batch=2, vocab_size=512)
    assert loader.next_batch()[0].max() < 512
    with pytest.raises(GptforgeError, match=r"holds token id \d+ but the model's vocabulary has only 100 tokens"):
        TokenLoader(shakespeare_shards, "train", T, micro_batch=2, vocab_size=100).next_batch()


def test_a_shard_the_manifest_lists_but_the_directory_lacks_is_an_error(copy):
    (copy / "train_00001.bin").unlink()
    with pytest.raises(GptforgeError, match=r"lists \d train shards but train_00001\.bin is missing from"):
        TokenLoader(copy, "train", T, micro_batch=2)


def test_each_shard_is_read_once_per_process_until_it_changes(copy, monkeypatch):
    monkeypatch.setattr(shards, "_VERIFIED", {})
    reads = []
    real = shards._scan_shard
    monkeypatch.setattr(shards, "_scan_shard", lambda path, dtype: reads.append(path.name) or real(path, dtype))
    n_train = len(list(copy.glob("train_*.bin")))
    for seed in range(3):  # random windows from every shard
        loader = TokenLoader(copy, "train", T, micro_batch=32, seed=seed)
        for _ in range(3):
            loader.next_batch()
    for _ in range(2):
        validation_windows(copy, T, max_tokens=500, vocab_size=50257)
        shard_stream(copy, "val", vocab_size=1 << 16)
    assert sorted(reads) == sorted({*reads}) and len(reads) == n_train + 1
    # a rewritten file is a new cache key: the damage is seen
    _flip_middle(copy / "val_00000.bin")
    with pytest.raises(GptforgeError, match="corrupted"):
        shard_stream(copy, "val")
    assert reads.count("val_00000.bin") == 2


# ---- data prepare: inputs that change between runs ------------------------------------------------------------


class _Killed(Exception):
    pass


def _interrupted_prepare(cfg, monkeypatch):
    """Run prepare up to its last checkpoint and stop before the manifest, as a kill there would."""

    def killed(self):
        raise _Killed

    with monkeypatch.context() as m:
        m.setattr(prep._Run, "_finish", killed)
        with pytest.raises(_Killed):
            prepare(cfg)
    out = Path(cfg.out)
    assert (out / prep.STATE).is_file() and not (out / MANIFEST).exists()


def test_an_input_edited_between_kill_and_rerun_is_refused(slice_txt, tmp_path, monkeypatch):
    src = shutil.copyfile(slice_txt, tmp_path / "input.txt")
    original = src.read_text(encoding="utf-8")
    out = tmp_path / "out"
    _interrupted_prepare(_cfg([src], out), monkeypatch)
    state = json.loads((out / prep.STATE).read_text())
    assert state["fingerprint"]["sources"][0]["sha256"] == sha256_file(src)
    assert state["shards"]["train"]  # it had written shards: resuming would mix old and new text

    src.write_text(original.replace("Citizen", "Citizan", 1), encoding="utf-8")  # same size, other text
    with pytest.raises(GptforgeError, match=r"holds data prepared with different options \(sources\): "
                                            r".*input\.txt changed since the interrupted run \(same size, sha256 "
                                            r"[0-9a-f]{12} -> [0-9a-f]{12}\); use a new --out directory or pass "
                                            r"--overwrite"):
        prepare(_cfg([src], out))
    assert (out / prep.STATE).is_file()  # the refused rerun left the checkpoint alone

    # the same text again resumes, and finishes with the bytes of an uninterrupted run
    src.write_text(original, encoding="utf-8")
    resumed = prepare(_cfg([src], out))
    fresh = prepare(_cfg([src], tmp_path / "fresh"))
    assert resumed["shards"] == fresh["shards"] and resumed["fingerprint"] == fresh["fingerprint"]


def test_finished_prepare_is_done_with_the_same_inputs_and_refused_with_edited_ones(slice_txt, tmp_path,
                                                                                     capsys):
    src = shutil.copyfile(slice_txt, tmp_path / "input.txt")
    out = tmp_path / "out"
    first = prepare(_cfg([src], out, progress=True))
    capsys.readouterr()
    assert prepare(_cfg([src], out, progress=True)) == first
    assert "already prepared" in capsys.readouterr().out
    with src.open("a", encoding="utf-8") as f:
        f.write("\n\nA new paragraph.\n")
    with pytest.raises(GptforgeError, match=r"\(sources\): .*input\.txt changed since it was prepared \("
                                            r"\d+ -> \d+ bytes"):
        prepare(_cfg([src], out))


def test_a_manifest_from_before_inputs_were_hashed_still_counts_as_done(slice_txt, tmp_path, capsys):
    src = shutil.copyfile(slice_txt, tmp_path / "input.txt")
    out = tmp_path / "out"
    prepare(_cfg([src], out))
    manifest = json.loads((out / MANIFEST).read_text())
    for s in manifest["fingerprint"]["sources"]:
        del s["sha256"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    prepare(_cfg([src], out, progress=True))
    assert "already prepared" in capsys.readouterr().out


# ---- data prepare: impossible options ----------------------------------------------------------------------


@pytest.mark.parametrize(("option", "value", "message"), [
    ("buffer_mb", 0, r"--buffer-mb must be a finite number > 0 .*got 0"),
    ("buffer_mb", float("nan"), r"--buffer-mb must be a finite number > 0 .*got nan"),
    ("buffer_mb", float("inf"), r"--buffer-mb must be a finite number > 0 .*got inf"),
    ("workers", -3, r"--workers must be an integer >= 0 \(0: all cores\), got -3"),
    ("shard_tokens", 0, r"--shard-tokens must be an integer >= 1, got 0"),
    ("max_tokens", 0, r"--max-tokens must be an integer >= 1 .*got 0"),
])
def test_impossible_prepare_options_are_one_line_errors(slice_txt, tmp_path, option, value, message):
    with pytest.raises(GptforgeError, match=message) as err:
        prepare(_cfg([slice_txt], tmp_path / "out", **{option: value}))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def _exit_code(argv) -> int:
    """``main``'s exit status, whether a bad flag is refused by argparse (SystemExit) or by prepare()."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_cli_refuses_bad_options_and_a_file_as_out_with_exit_2(slice_txt, tmp_path, capsys):
    base = ["data", "prepare", str(slice_txt), "--no-progress"]
    for flag, value in (("--workers", "-3"), ("--buffer-mb", "0"), ("--buffer-mb", "nan")):
        assert _exit_code([*base, "--out", str(tmp_path / "a"), flag, value]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("gptforge: error:") and flag in err and value in err and "\n" not in err
    assert not (tmp_path / "a").exists()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a directory")
    assert _exit_code([*base, "--out", str(a_file)]) == 2
    assert f"--out {a_file} is an existing file, not a directory" in capsys.readouterr().err
    assert a_file.read_text() == "not a directory"
