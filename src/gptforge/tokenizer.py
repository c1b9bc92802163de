"""One tokenizer interface over two backends: a trained byte-level BPE (HF ``tokenizers``) and GPT-2 (``tiktoken``).

A tokenizer is saved as a directory: ``tokenizer_config.json`` (backend, special tokens, chat template) plus
``tokenizer.json`` for the BPE backend. ``load_tokenizer`` accepts such a directory, a bare ``tokenizer.json``,
or the name ``gpt2``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from gptforge.errors import GptforgeError
from gptforge.io import atomic_write_text, read_json, write_json

EOT = "<|endoftext|>"
PAD = "<|pad|>"
# Chat tokens used by the SFT chat template (ChatML-like).
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CHAT_TOKENS = (IM_START, IM_END)
# Special tokens every trained BPE gets (ids 0..3, in this order).
SPECIAL_TOKENS = (EOT, PAD, IM_START, IM_END)
# tiktoken-format ranks saved next to tokenizer.json when the trained vocabulary allows it.
TIKTOKEN_FILE = "tokenizer.tiktoken"

# GPT-2's pre-tokenization regex (as in tiktoken's r50k_base / gpt2 encodings).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class Tokenizer:
    """Common interface. Backends implement ``_encode``, ``_encode_batch``, ``decode``, ``id_to_piece``."""

    name: str
    kind: str
    special_tokens: dict[str, int]
    chat_template: str | None = None

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def eot_id(self) -> int:
        return self.special_tokens[EOT]

    @property
    def pad_id(self) -> int:
        """The pad id: ``<|pad|>`` when the vocabulary has one, else end-of-text (padding is always masked)."""
        return self.special_tokens.get(PAD, self.eot_id)

    def token_id(self, token: str) -> int:
        if token not in self.special_tokens:
            raise GptforgeError(f"tokenizer {self.name!r} has no special token {token!r}")
        return self.special_tokens[token]

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``. Special-token strings are plain text unless ``allow_special``.

        Lone surrogates (JSON escapes like ``"\\ud800"`` decode to them) are replaced with U+FFFD first, as
        tiktoken does, so every backend accepts any Python string.
        """
        try:
            return self._encode(text, allow_special)
        except (TypeError, UnicodeEncodeError):
            cleaned = replace_surrogates(text)
            if cleaned is text:
                raise
            return self._encode(cleaned, allow_special)

    def encode_batch(self, texts: list[str], allow_special: bool = False, num_threads: int = 0) -> list[list[int]]:
        """Encode many texts with the backend's native threads (lone surrogates replaced, as in :meth:`encode`)."""
        threads = num_threads or os.cpu_count() or 1
        try:
            return self._encode_batch(texts, allow_special, threads)
        except (TypeError, UnicodeEncodeError):
            return self._encode_batch([replace_surrogates(t) for t in texts], allow_special, threads)

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def id_to_piece(self, token_id: int) -> str:
        raise NotImplementedError

    def _encode(self, text: str, allow_special: bool) -> list[int]:
        raise NotImplementedError

    def _encode_batch(self, texts, allow_special, num_threads) -> list[list[int]]:
        return [self._encode(t, allow_special) for t in texts]

    def add_special_tokens(self, tokens: list[str] | tuple[str, ...]) -> list[str]:
        """Append special tokens not yet present (ids after the current vocabulary); returns the added ones."""
        raise NotImplementedError

    def content_hash(self) -> str:
        """A short hash of everything that affects ids (vocabulary, merges, special tokens)."""
        raise NotImplementedError

    def save(self, directory: str | Path) -> Path:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "vocab_size": self.vocab_size, "hash": self.content_hash(),
                "special_tokens": dict(self.special_tokens)}


# ---- GPT-2 through tiktoken --------------------------------------------------------------------------------


def find_gpt2_ranks(explicit: str | Path | None = None) -> Path | None:
    """Locate a local ``r50k_base.tiktoken`` (explicit path/dir, then ``$GPTFORGE_DATA_DIR/tokenizers/gpt2``)."""
    candidates = []
    if explicit:
        p = Path(explicit)
        candidates += [p, p / "r50k_base.tiktoken"]
    data_dir = os.environ.get("GPTFORGE_DATA_DIR")
    if data_dir:
        candidates.append(Path(data_dir) / "tokenizers" / "gpt2" / "r50k_base.tiktoken")
    for c in candidates:
        if c.is_file():
            return c
    return None


class TiktokenTokenizer(Tokenizer):
    """GPT-2's BPE via tiktoken, with optional extra special tokens appended after id 50256."""

    kind = "tiktoken"

    def __init__(self, extra_special: list[str] | None = None, ranks_path: str | Path | None = None):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        self.name = "gpt2"
        path = find_gpt2_ranks(ranks_path)
        if path is not None:
            ranks = load_tiktoken_bpe(str(path))
        else:
            try:
                ranks = tiktoken.get_encoding("gpt2")._mergeable_ranks
            except Exception as e:  # offline without a local copy
                raise GptforgeError(
                    "cannot load the GPT-2 vocabulary: set GPTFORGE_DATA_DIR to a data directory with "
                    "tokenizers/gpt2/r50k_base.tiktoken, or TIKTOKEN_CACHE_DIR to a tiktoken cache, "
                    f"or go online once ({type(e).__name__})"
                ) from None
        self._ranks = ranks
        self.special_tokens = {EOT: 50256}
        for tok in extra_special or []:
            if tok not in self.special_tokens:
                self.special_tokens[tok] = 50256 + len(self.special_tokens)
        self._enc = tiktoken.Encoding(
            name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    def _encode(self, text, allow_special):
        return self._enc.encode(text, allowed_special="all" if allow_special else set(), disallowed_special=())

    def _encode_batch(self, texts, allow_special, num_threads):
        return self._enc.encode_batch(
            texts, num_threads=num_threads, allowed_special="all" if allow_special else set(), disallowed_special=()
        )

    def decode(self, ids):
        return self._enc.decode(list(ids))

    def decode_bytes(self, ids) -> bytes:
        return self._enc.decode_bytes(list(ids))

    def id_to_piece(self, token_id):
        return self._enc.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")

    def add_special_tokens(self, tokens):
        added = [t for t in tokens if t not in self.special_tokens]
        if added:
            self.__init__(extra_special=[t for t in self.special_tokens if t != EOT] + added)
        return added

    def content_hash(self):
        h = hashlib.sha256(b"tiktoken-gpt2")
        h.update(json.dumps(self.special_tokens, sort_keys=True).encode())
        return h.hexdigest()[:16]

    def save(self, directory):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cfg = {"kind": self.kind, "name": self.name, "special_tokens": self.special_tokens,
               "chat_template": self.chat_template}
        write_json(directory / "tokenizer_config.json", cfg)
        return directory


# ---- trained byte-level BPE through HF tokenizers ----------------------------------------------------------


class BPETokenizer(Tokenizer):
    """A byte-level BPE saved as ``tokenizer.json`` (HF ``tokenizers``)."""

    kind = "bpe"

    def __init__(self, hf_tokenizer, name: str = "bpe"):
        self._tok = hf_tokenizer
        self.name = name
        self.special_tokens = {t.content: i for i, t in sorted(hf_tokenizer.get_added_tokens_decoder().items())}
        if EOT not in self.special_tokens:
            raise GptforgeError(f"tokenizer {name!r} has no {EOT} special token; retrain it with one")

    @classmethod
    def from_file(cls, path: str | Path, name: str | None = None) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise GptforgeError(f"cannot read tokenizer file {path}: {e}") from None
        return cls(tok, name or path.parent.name or "bpe")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _encode(self, text, allow_special):
        if allow_special:
            return self._tok.encode(text, add_special_tokens=False).ids
        return self._encode_plain(text)

    def _encode_plain(self, text):
        # Treat special-token strings as text: split around them and encode each piece without special matching.
        pieces = _split_specials(text, self.special_tokens)
        ids: list[int] = []
        for piece, is_special in pieces:
            if is_special:
                ids.extend(self._encode_without_specials(piece))
            elif piece:
                ids.extend(self._tok.encode(piece, add_special_tokens=False).ids)
        return ids

    def _encode_without_specials(self, text):
        # Encode a special-token string as ordinary bytes by breaking it after its first character.
        head, tail = text[:1], text[1:]
        return self._tok.encode(head, add_special_tokens=False).ids + self._tok.encode(tail, add_special_tokens=False).ids

    def _encode_batch(self, texts, allow_special, num_threads):
        if not allow_special and any(s in t for t in texts for s in self.special_tokens):
            return [self._encode_plain(t) for t in texts]
        os.environ.setdefault("RAYON_NUM_THREADS", str(num_threads))
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids):
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def id_to_piece(self, token_id):
        return self.decode([token_id])

    def add_special_tokens(self, tokens):
        from tokenizers import AddedToken

        added = [t for t in tokens if t not in self.special_tokens]
        if added:
            self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
            self.special_tokens = {t.content: i for i, t in sorted(self._tok.get_added_tokens_decoder().items())}
        return added

    def content_hash(self):
        return hashlib.sha256(self._tok.to_str().encode()).hexdigest()[:16]

    def tiktoken_ranks(self) -> dict[bytes, int] | None:
        """The vocabulary as tiktoken mergeable ranks (rank = id), or None when tiktoken cannot reproduce it.

        tiktoken merges the adjacent pair whose concatenation has the lowest rank; HF BPE applies its merge
        list in order. The two agree when every merge creates a new token whose id grows with the merge
        order, which is what ``train_bpe`` produces; other vocabularies (e.g. imported ones) are refused.
        """
        spec = json.loads(self._tok.to_str())
        model = spec.get("model", {})
        if not _gpt2_style(spec):
            return None
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        vocab: dict[str, int] = model["vocab"]
        ranks: dict[bytes, int] = {}
        for piece, idx in vocab.items():
            if piece in self.special_tokens:
                continue
            try:
                ranks[bytes(byte_of[c] for c in piece)] = idx
            except KeyError:
                return None  # not a byte-level vocabulary
        if any(bytes([b]) not in ranks for b in range(256)):
            return None
        last = -1
        for merge in model.get("merges", []):
            left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
            idx = vocab.get(left + right)
            if idx is None or idx <= last:
                return None
            last = idx
        return ranks

    def to_tiktoken(self):
        """A ``tiktoken.Encoding`` giving the same ids as this tokenizer (error when the vocabulary does not allow)."""
        ranks = self.tiktoken_ranks()
        if ranks is None:
            raise GptforgeError(f"tokenizer {self.name!r} cannot be expressed as tiktoken ranks")
        return tiktoken_encoding(ranks, self.special_tokens, self.name)

    def save(self, directory):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / "tokenizer.json"))
        ranks = self.tiktoken_ranks()
        if ranks is not None:
            write_tiktoken_ranks(ranks, directory / TIKTOKEN_FILE)
        cfg = {"kind": self.kind, "name": self.name, "special_tokens": self.special_tokens,
               "chat_template": self.chat_template}
        write_json(directory / "tokenizer_config.json", cfg)
        return directory


def _split_specials(text: str, specials: dict[str, int]) -> list[tuple[str, bool]]:
    """Split ``text`` into (piece, is_special_string) around occurrences of special-token strings."""
    import re

    if not specials:
        return [(text, False)]
    pattern = re.compile("(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")")
    out = []
    for i, part in enumerate(pattern.split(text)):
        out.append((part, i % 2 == 1))
    return out


def replace_surrogates(text: str) -> str:
    """``text`` with lone surrogates replaced by U+FFFD (the same object when it has none)."""
    if not isinstance(text, str):
        raise GptforgeError(f"text to encode must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def load_tokenizer(spec: str | Path, extra_special: list[str] | tuple[str, ...] | None = None) -> Tokenizer:
    """``gpt2`` → tiktoken GPT-2; a directory with ``tokenizer_config.json``/``tokenizer.json``; or a ``tokenizer.json``.

    ``gpt2-chat`` is GPT-2 plus the chat tokens (``<|im_start|>`` 50257, ``<|im_end|>`` 50258);
    ``extra_special`` appends further special tokens to whatever was loaded.
    """
    tok = _load_tokenizer(spec)
    if extra_special:
        tok.add_special_tokens(list(extra_special))
    return tok


def _load_tokenizer(spec: str | Path) -> Tokenizer:
    spec_str = str(spec)
    if spec_str == "gpt2":
        return TiktokenTokenizer()
    if spec_str == "gpt2-chat":
        return TiktokenTokenizer(extra_special=list(CHAT_TOKENS))
    path = Path(spec_str)
    if path.is_dir():
        cfg_path = path / "tokenizer_config.json"
        cfg = read_json(cfg_path, "tokenizer config") if cfg_path.is_file() else {}
        if cfg.get("kind") == "tiktoken":
            tok: Tokenizer = TiktokenTokenizer(extra_special=[t for t in cfg.get("special_tokens", {}) if t != EOT])
        elif (path / "tokenizer.json").is_file():
            tok = BPETokenizer.from_file(path / "tokenizer.json", name=cfg.get("name"))
        else:
            raise GptforgeError(f"{path} holds no tokenizer (expected tokenizer_config.json or tokenizer.json)")
        tok.chat_template = cfg.get("chat_template")
        return tok
    if path.is_file():
        return BPETokenizer.from_file(path)
    raise GptforgeError(f"tokenizer not found: {spec_str!r} (use 'gpt2', a tokenizer directory or a tokenizer.json)")


# ---- training and tiktoken export ---------------------------------------------------------------------------


def _gpt2_style(spec: dict) -> bool:
    """True for a plain byte-level BPE with GPT-2's pre-tokenization (what tiktoken reproduces exactly):
    no normalizer, ByteLevel with the built-in GPT-2 regex (or our Split(GPT2_PATTERN) + ByteLevel), no
    prefix space, and a BPE model without dropout, suffixes, byte fallback or merge skipping."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or spec.get("normalizer") is not None:
        return False
    if any(model.get(k) for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback",
                                  "ignore_merges")):
        return False
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        return pre.get("use_regex", True) and not pre.get("add_prefix_space", False)
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 2:
        split, byte_level = pre["pretokenizers"]
        return (split.get("type") == "Split" and split.get("pattern", {}).get("Regex") == GPT2_PATTERN
                and split.get("behavior") == "Isolated" and not split.get("invert")
                and byte_level.get("type") == "ByteLevel" and not byte_level.get("use_regex", True)
                and not byte_level.get("add_prefix_space", False))
    return False


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-character map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tiktoken_ranks(ranks: dict[bytes, int], path: str | Path) -> Path:
    """Write ranks in tiktoken's file format (``base64(token) rank`` per line), atomically."""
    import base64

    ordered = sorted(ranks.items(), key=lambda kv: kv[1])
    return atomic_write_text(path, "".join(f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in ordered))


def tiktoken_encoding(ranks: dict[bytes, int], special_tokens: dict[str, int], name: str = "bpe"):
    """A ``tiktoken.Encoding`` with GPT-2's pre-tokenization regex."""
    import tiktoken

    return tiktoken.Encoding(name=name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=dict(special_tokens))


def load_tiktoken_file(directory: str | Path):
    """The ``tiktoken.Encoding`` stored in a trained tokenizer directory (``tokenizer.tiktoken`` + its config)."""
    from tiktoken.load import load_tiktoken_bpe

    directory = Path(directory)
    path = directory / TIKTOKEN_FILE
    if not path.is_file():
        raise GptforgeError(f"{path} not found: this tokenizer has no tiktoken export (retrain or re-save it)")
    cfg = read_json(directory / "tokenizer_config.json", "tokenizer config")
    return tiktoken_encoding(load_tiktoken_bpe(str(path)), cfg["special_tokens"], cfg.get("name", "bpe"))


def train_bpe(texts, vocab_size: int, min_frequency: int = 2, special_tokens=SPECIAL_TOKENS,
              name: str = "bpe") -> BPETokenizer:
    """Train a byte-level BPE (GPT-2 regex, 256 byte symbols, ``special_tokens`` at ids 0..k-1) on ``texts``.

    ``texts`` is any iterable of strings and is consumed once, streaming: the trainer keeps word counts,
    not the corpus. ``vocab_size`` counts special tokens and the 256 byte symbols.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    special_tokens = list(dict.fromkeys(special_tokens))
    if EOT not in special_tokens:
        special_tokens.insert(0, EOT)
    minimum = 256 + len(special_tokens)
    if vocab_size < minimum:
        raise GptforgeError(f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least {minimum} "
                            f"(256 bytes + {len(special_tokens)} special tokens)")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's regex
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    seen = {"n": 0}

    def counted():
        for t in texts:
            seen["n"] += 1
            yield t

    hf.train_from_iterator(counted(), trainer)
    if seen["n"] == 0:
        raise GptforgeError("no training text: the sources produced no documents")
    return BPETokenizer(hf, name=name)
