"""Named datasets: the corpora, instruction sets and benchmarks the seed recipes use, and where to find them.

``resolve(name_or_path)`` (``locate`` when the caller wants to know where it was found) finds a dataset file in
this order:

1. an explicit path that exists;
2. ``$GPTFORGE_DATA_DIR/<relpath>`` (a local data directory, e.g. for air-gapped machines and CI);
3. ``~/.cache/gptforge/<relpath>`` (or ``$GPTFORGE_CACHE_DIR``), filled by an earlier download;
4. the copy embedded in the package (``gptforge/embedded/``, listed in its ``manifest.json`` with sha256,
   sources and licenses in its ``NOTICE``): the quickstart's public-domain / permissive defaults. A copy that
   is only part of the dataset (HellaSwag: its first 1,000 items) is used only when the caller accepts a
   subset (``subset_ok=True``); its sha256 is checked before use, a mismatch is an error;
5. a download into that cache when online (a file URL, or a small hub dataset written as JSONL);
6. otherwise a ``GptforgeError`` naming the file and where to place it.

``GPTFORGE_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1``) disables step 5. Large hub corpora
(FineWeb) are not files: ``gptforge data prepare fineweb-edu`` streams them from the hub instead.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from gptforge.errors import GptforgeError
from gptforge.io import sha256_file


@dataclass(frozen=True)
class Dataset:
    """A named dataset: canonical public source, local layout, format and checksum."""

    name: str
    description: str
    relpath: str  # path inside a data directory (layout of GPTFORGE_DATA_DIR)
    format: str  # txt | jsonl | json | tsv | tiktoken
    url: str | None = None  # a single downloadable file
    hub: str | None = None  # Hugging Face dataset id
    hub_config: str | None = None
    hub_split: str = "train"
    sha256: str | None = None  # of the file at relpath, when it is one canonical file
    separator: str | None = None  # txt documents: file | blank | literal
    text_field: str | None = None  # jsonl/parquet/hub text field
    streamable: bool = (
        False  # a large hub corpus: `data prepare NAME` streams it, resolve() does not download
    )
    license: str = ""


DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in [
        # One file of plays: its blank-line-separated speeches serve as documents, so a per-document split works.
        Dataset(
            "tinyshakespeare",
            "Shakespeare plays, plain text (1.1 MB; speeches as documents)",
            "pretrain/tinyshakespeare.txt",
            "txt",
            url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
            sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            separator="blank",
            license="public domain",
        ),
        Dataset(
            "wikitext2",
            "WikiText-2 raw, test split (1.3 MB)",
            "pretrain/wikitext2-raw-test.txt",
            "txt",
            hub="Salesforce/wikitext",
            hub_config="wikitext-2-raw-v1",
            hub_split="test",
            sha256="173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
            separator="blank",
            license="CC BY-SA 3.0",
        ),
        Dataset(
            "tinystories",
            "TinyStories (roneneldan/TinyStories); locally a ~200-story sample, blank-line separated",
            "pretrain/tinystories-sample.txt",
            "txt",
            hub="roneneldan/TinyStories",
            separator="blank",
            text_field="text",
            streamable=True,
            license="CDLA-Sharing-1.0",
        ),
        Dataset(
            "fineweb-edu",
            "FineWeb-Edu sample-10BT (~10B GPT-2 tokens, parquet on the hub)",
            "pretrain/fineweb-edu-sample-10BT",
            "parquet",
            hub="HuggingFaceFW/fineweb-edu",
            hub_config="sample-10BT",
            text_field="text",
            streamable=True,
            license="ODC-By 1.0",
        ),
        Dataset(
            "fineweb",
            "FineWeb sample-10BT (~10B GPT-2 tokens, parquet on the hub)",
            "pretrain/fineweb-sample-10BT",
            "parquet",
            hub="HuggingFaceFW/fineweb",
            hub_config="sample-10BT",
            text_field="text",
            streamable=True,
            license="ODC-By 1.0",
        ),
        Dataset(
            "alpaca",
            "Stanford Alpaca, 52k instructions {instruction, input, output}",
            "instruct/alpaca_data.json",
            "json",
            url="https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json",
            hub="tatsu-lab/alpaca",
            license="CC BY-NC 4.0",
        ),
        Dataset(
            "dolly",
            "databricks-dolly-15k {instruction, context, response, category}",
            "instruct/databricks-dolly-15k.jsonl",
            "jsonl",
            url="https://huggingface.co/datasets/databricks/databricks-dolly-15k/resolve/main/databricks-dolly-15k.jsonl",
            hub="databricks/databricks-dolly-15k",
            license="CC BY-SA 3.0",
        ),
        Dataset(
            "instruction-data",
            "the book's 1.1k Alpaca-format instruction set (LLMs-from-scratch ch07)",
            "instruct/instruction-data.json",
            "json",
            url="https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/"
            "instruction-data.json",
            sha256="7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
            license="Apache-2.0",
        ),
        Dataset(
            "instruction-preference",
            "the book's 1.1k instructions with a chosen and a rejected answer (LLMs-from-scratch ch07, DPO)",
            "instruct/instruction-data-with-preference.json",
            "json",
            url="https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/04_preference-tuning-with-dpo/"
            "instruction-data-with-preference.json",
            sha256="305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e",
            license="Apache-2.0",
        ),
        Dataset(
            "sms-spam",
            "SMS Spam Collection v.1, TSV label<TAB>text (5,574 messages)",
            "classify/SMSSpamCollection",
            "tsv",
            url="https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
            sha256="7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d",
            license="CC BY 4.0",
        ),
        Dataset(
            "hellaswag",
            "HellaSwag validation (10,042 items, rowanz format)",
            "eval/hellaswag_val.jsonl",
            "jsonl",
            url="https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
            hub="Rowan/hellaswag",
            sha256="dc1be2fa1bef56aab8e92a5be597a617e363b09239fa66822939d7fb7a8da4ec",
            license="MIT",
        ),
        Dataset(
            "mmlu",
            "MMLU test split {question, subject, choices, answer} (14,042 items)",
            "eval/mmlu_test.jsonl",
            "jsonl",
            hub="cais/mmlu",
            hub_config="all",
            hub_split="test",
            sha256="903179ca496c3a80683685a3e4bcec761d2826df64682892cde15def955f6e7d",
            license="MIT",
        ),
        Dataset(
            "mmlu-validation",
            "MMLU validation split (1,531 items)",
            "eval/mmlu_validation.jsonl",
            "jsonl",
            hub="cais/mmlu",
            hub_config="all",
            hub_split="validation",
            sha256="e2bdfcb1d829e58e22b229e35c04fed377b8d5ed74197d5ef25c28cd9ad2f39d",
            license="MIT",
        ),
        Dataset(
            "mmlu-dev",
            "MMLU dev split, the 5-shot examples (285 items)",
            "eval/mmlu_dev.jsonl",
            "jsonl",
            hub="cais/mmlu",
            hub_config="all",
            hub_split="dev",
            sha256="0b841f7363db50b453f487870576f828e3b8bb106b6a721db67fa382e4a37ec8",
            license="MIT",
        ),
        Dataset(
            "gpt2-vocab",
            "GPT-2 BPE ranks in tiktoken format (50,256 ranks + <|endoftext|>)",
            "tokenizers/gpt2/r50k_base.tiktoken",
            "tiktoken",
            url="https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken",
            sha256="306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
            license="Modified MIT",
        ),
    ]
}
ALIASES = {
    "fineweb-edu-10bt": "fineweb-edu",
    "fineweb-10bt": "fineweb",
    "sms": "sms-spam",
    "book-instructions": "instruction-data",
    "book-preferences": "instruction-preference",
    "gpt2": "gpt2-vocab",
    "wikitext": "wikitext2",
}


def get(name: str) -> Dataset:
    """The registry entry for ``name`` (or an alias); a clear error listing the known names otherwise."""
    entry = DATASETS.get(ALIASES.get(name, name))
    if entry is None:
        raise GptforgeError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)} (or pass a file path)")
    return entry


def is_offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes")
        for v in ("GPTFORGE_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def cache_dir() -> Path:
    return Path(os.environ.get("GPTFORGE_CACHE_DIR") or Path.home() / ".cache" / "gptforge")


def find_local(entry: Dataset) -> Path | None:
    """The dataset's file in ``$GPTFORGE_DATA_DIR`` or the download cache, if present."""
    found = _find_local(entry)
    return found[0] if found else None


def _find_local(entry: Dataset) -> tuple[Path, str] | None:
    data_dir = os.environ.get("GPTFORGE_DATA_DIR")
    roots = ([(Path(data_dir), "GPTFORGE_DATA_DIR")] if data_dir else []) + [(cache_dir(), "cache")]
    for root, origin in roots:
        path = root / entry.relpath
        if path.exists():
            return path, origin
    return None


# ---- embedded package data ---------------------------------------------------------------------------------

# gptforge/embedded, beside this package (tests point it at a copy)
EMBEDDED_DIR = Path(__file__).resolve().parents[1] / "embedded"
EMBEDDED_MANIFEST = "manifest.json"
_verified: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256 already checked


def embedded_manifest() -> dict:
    """``{name: {file, sha256, bytes, license, license_file, source, subset}}`` of the embedded datasets."""
    path = EMBEDDED_DIR / EMBEDDED_MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))["datasets"]
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GptforgeError(
            f"{path}: unreadable embedded-data manifest ({type(e).__name__}: {e}); reinstall gptforge"
        ) from None


def find_embedded(entry: Dataset, subset_ok: bool = False) -> Path | None:
    """The package's embedded copy of ``entry`` after checking its sha256 (None when there is none, or when it
    is a subset and ``subset_ok`` is false); a copy whose bytes differ from the manifest is an error."""
    info = embedded_manifest().get(entry.name)
    if info is None or (info.get("subset") and not subset_ok):
        return None
    path = EMBEDDED_DIR / info["file"]
    if not path.is_file():
        raise GptforgeError(
            f"embedded data file {path} is missing (listed in {EMBEDDED_DIR / EMBEDDED_MANIFEST}); "
            "reinstall gptforge, or set GPTFORGE_DATA_DIR to a data directory"
        )
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if _verified.get(key) != info["sha256"]:
        got = sha256_file(path)
        if got != info["sha256"]:
            raise GptforgeError(
                f"embedded data file {path} is damaged: sha256 {got}, expected {info['sha256']} "
                f"(from {EMBEDDED_DIR / EMBEDDED_MANIFEST}); reinstall gptforge, or set GPTFORGE_DATA_DIR "
                "to a data directory"
            )
        _verified[key] = got
    return path


# ---- resolution --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Located:
    """Where ``locate`` found a dataset: ``origin`` is ``path`` (given explicitly), ``GPTFORGE_DATA_DIR``,
    ``cache`` (an earlier download), ``embedded`` (package data) or ``download`` (fetched just now)."""

    path: Path
    origin: str
    entry: Dataset | None = None

    @property
    def subset(self) -> dict | None:
        """For an embedded partial copy: how it was made (``how``, ``records``, ``of_records``, ...)."""
        if self.origin != "embedded" or self.entry is None:
            return None
        return (embedded_manifest().get(self.entry.name) or {}).get("subset")


def resolve(name_or_path: str | Path, download: bool = True, subset_ok: bool = False) -> Path:
    """A local path for a dataset name or an explicit path (see the module doc for the search order)."""
    return locate(name_or_path, download=download, subset_ok=subset_ok).path


def locate(name_or_path: str | Path, download: bool = True, subset_ok: bool = False) -> Located:
    """Like ``resolve``, and says where the file was found (see the module doc for the search order)."""
    path = Path(name_or_path)
    if path.exists():
        return Located(path, "path")
    key = ALIASES.get(str(name_or_path), str(name_or_path))
    if key not in DATASETS:
        if os.sep in str(name_or_path) or path.suffix:
            raise GptforgeError(f"file not found: {name_or_path}")
        get(key)  # raises the unknown-name error
    entry = DATASETS[key]
    local = _find_local(entry)
    if local is not None:
        return Located(local[0], local[1], entry)
    embedded = find_embedded(entry, subset_ok=subset_ok)
    if embedded is not None:
        return Located(embedded, "embedded", entry)
    if download and not is_offline() and not entry.streamable and (entry.url or entry.hub):
        return Located(_download(entry), "download", entry)
    return _missing(entry)


def _missing(entry: Dataset):
    where = os.environ.get("GPTFORGE_DATA_DIR")
    target = f"{where}/{entry.relpath}" if where else f"$GPTFORGE_DATA_DIR/{entry.relpath}"
    origin = entry.url or (
        f"hub dataset {entry.hub}" + (f" (config {entry.hub_config})" if entry.hub_config else "")
    )
    hint = (
        f"; or run `gptforge data prepare {entry.name}` online, which streams it from the hub"
        if entry.streamable
        else "; or run online once to download it into the cache"
    )
    raise GptforgeError(
        f"dataset {entry.name!r} not found: place {Path(entry.relpath).name} (from {origin}) at "
        f"{target}{hint}"
        + (" (downloads are off: GPTFORGE_OFFLINE/HF_*_OFFLINE is set)" if is_offline() else "")
    )


def verify(entry: Dataset, path: str | Path) -> bool:
    """True when the file matches the registry checksum (or there is none to check)."""
    return entry.sha256 is None or sha256_file(path) == entry.sha256


def _download(entry: Dataset) -> Path:
    target = cache_dir() / entry.relpath
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    try:
        if entry.url and not entry.url.endswith(".zip"):
            _download_url(entry.url, tmp)
        elif entry.url:  # a zip archive holding the file (sms-spam)
            _download_url(entry.url, tmp.with_suffix(".zip"))
            import zipfile

            with (
                zipfile.ZipFile(tmp.with_suffix(".zip")) as z,
                z.open(Path(entry.relpath).name) as src,
                open(tmp, "wb") as dst,
            ):
                shutil.copyfileobj(src, dst)
            tmp.with_suffix(".zip").unlink()
        else:
            _download_hub_as_jsonl(entry, tmp)
    except GptforgeError:
        raise
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise GptforgeError(
            f"downloading dataset {entry.name!r} failed ({type(e).__name__}: {e}); place "
            f"{Path(entry.relpath).name} at $GPTFORGE_DATA_DIR/{entry.relpath} instead"
        ) from None
    if not verify(entry, tmp):
        got = sha256_file(tmp)
        tmp.unlink()
        raise GptforgeError(
            f"downloaded {entry.name!r} has sha256 {got}, expected {entry.sha256}; "
            "the source changed or the download is corrupt"
        )
    os.replace(tmp, target)
    return target


def _download_url(url: str, dest: Path) -> None:
    import urllib.request  # here, not at the top: every `data prepare` imports this module, few download

    from tqdm import tqdm

    with urllib.request.urlopen(url, timeout=30) as r, open(dest, "wb") as f:
        total = int(r.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
            for block in iter(lambda: r.read(1 << 20), b""):
                f.write(block)
                bar.update(len(block))


def _download_hub_as_jsonl(entry: Dataset, dest: Path) -> None:
    """Small hub datasets (e.g. MMLU) written as JSONL records, the layout of the local data directory."""
    import json

    try:
        import datasets
    except ImportError:
        raise GptforgeError(
            f"downloading {entry.name!r} needs `datasets`: pip install 'gptforge[data]'"
        ) from None
    ds = datasets.load_dataset(entry.hub, name=entry.hub_config, split=entry.hub_split)
    with open(dest, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in ds)


def table() -> list[dict]:
    """Rows for `gptforge data list`: name, description, local path status, source."""
    rows = []
    for entry in DATASETS.values():
        local = find_local(entry)
        rows.append(
            {
                "name": entry.name,
                "description": entry.description,
                "format": entry.format,
                "local": str(local) if local else None,
                "source": entry.url or entry.hub,
                "hub": entry.hub,
                "relpath": entry.relpath,
                "sha256": entry.sha256,
                "license": entry.license,
                "embedded": (embedded_manifest().get(entry.name) or {}).get("file"),
            }
        )
    return rows
