"""``gptforge tokenizer train|info|encode``: train a byte-level BPE, inspect a tokenizer, encode text."""

from __future__ import annotations

import json

from gptforge.commands import add_parser, positive_float, positive_int


def _add_source_options(p) -> None:
    p.add_argument(
        "--text-sep",
        "--separator",
        dest="separator",
        default=None,
        help="how .txt files split into documents: file (whole file), blank (blank lines), line, or a literal "
        "such as '<|endoftext|>'; default auto: <|endoftext|> if the file has it, else blank lines if any, "
        "else the whole file (a named dataset uses its own rule)",
    )
    p.add_argument("--field", default="text", help="text field of .jsonl/.json records and hub datasets")
    p.add_argument("--column", default=None, help="text column of .parquet files (default: --field)")
    p.add_argument("--hub-config", default=None, help="hub dataset configuration, e.g. sample-10BT")
    p.add_argument("--hub-split", default="train", help="hub dataset split")
    p.add_argument(
        "--skip-bad", action="store_true", help="skip malformed records (counted) instead of failing"
    )


def register(sub) -> None:
    p = sub.add_parser("tokenizer", help="train, inspect and try tokenizers")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="<action>", required=True)

    train = add_parser(
        tsub,
        "train",
        "train a byte-level BPE (GPT-2 regex) on text files or a hub dataset",
        "gptforge tokenizer train $GPTFORGE_DATA_DIR/pretrain/tinyshakespeare.txt "
        "--vocab-size 8192 --out tok/shakespeare-8k",
    )
    train.add_argument("sources", nargs="+", help="files, globs, dataset names or hub ids (hf:OWNER/NAME)")
    train.add_argument("--vocab-size", type=positive_int, required=True, help="including 256 bytes and special tokens")
    train.add_argument(
        "--out", required=True, help="output directory (tokenizer.json, tokenizer.tiktoken, config)"
    )
    train.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    train.add_argument("--min-frequency", type=positive_int, default=2, help="minimum pair count for a merge")
    train.add_argument(
        "--max-bytes", type=positive_float, default=None, help="stop reading after this many bytes (e.g. 2e9)"
    )
    train.add_argument("--name", default=None, help="tokenizer name (default: the output directory's name)")
    train.add_argument(
        "--special",
        nargs="*",
        default=None,
        help="special tokens (default: <|endoftext|> <|pad|> <|im_start|> <|im_end|>)",
    )
    _add_source_options(train)
    train.set_defaults(func=run_train)

    info = add_parser(
        tsub,
        "info",
        "vocabulary size, special tokens, hash; bytes/token on a sample file",
        "gptforge tokenizer info gpt2 --sample $GPTFORGE_DATA_DIR/pretrain/wikitext2-raw-test.txt",
    )
    info.add_argument("tokenizer", help="gpt2, gpt2-chat, a tokenizer directory or a tokenizer.json")
    info.add_argument("--sample", default=None, help="a text file to measure compression (bytes/token) on")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=run_info)

    enc = add_parser(
        tsub,
        "encode",
        "token ids and pieces of a text, with a round-trip check",
        "gptforge tokenizer encode gpt2 'Hello world, this is gptforge.'",
    )
    enc.add_argument("tokenizer", help="gpt2, gpt2-chat, a tokenizer directory or a tokenizer.json")
    enc.add_argument("text", nargs="?", default=None, help="the text (or use --file)")
    enc.add_argument("--file", default=None, help="encode the contents of this file instead")
    enc.add_argument("--allow-special", action="store_true", help="turn special-token strings into their ids")
    enc.add_argument("--json", action="store_true", help="print JSON")
    enc.set_defaults(func=run_encode)


def run_train(args) -> int:
    import time
    from pathlib import Path

    from tqdm import tqdm

    from gptforge.data.sources import ReadStats, expand_sources
    from gptforge.io import output_directory
    from gptforge.tokenizer import SPECIAL_TOKENS, train_bpe

    output_directory(args.out, "--out", args.overwrite)
    sources = expand_sources(
        args.sources, args.separator, args.field, args.column, args.hub_config, args.hub_split
    )
    stats = ReadStats()
    sizes = [s.size for s in sources]
    total = sum(sizes) if all(x is not None for x in sizes) else None
    if args.max_bytes:
        total = min(total, int(args.max_bytes)) if total else int(args.max_bytes)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="read corpus", dynamic_ncols=True)
    limit = int(args.max_bytes) if args.max_bytes else None

    def texts():
        read = 0
        for src in sources:
            for piece in src.pieces(stats, skip_bad=args.skip_bad):
                yield piece.text
                read += piece.nbytes
                bar.update(piece.nbytes)
                if limit and read >= limit:
                    return

    start = time.time()
    name = args.name or Path(args.out).name
    tok = train_bpe(
        texts(),
        args.vocab_size,
        args.min_frequency,
        special_tokens=args.special if args.special is not None else SPECIAL_TOKENS,
        name=name,
    )
    bar.close()
    out = tok.save(args.out)
    exported = (out / "tokenizer.tiktoken").exists()
    print(
        f"trained BPE {name!r}: vocab {tok.vocab_size:,} ({len(tok.special_tokens)} special tokens: "
        f"{', '.join(tok.special_tokens)}) on {stats.documents:,} documents, {bar.n / 1e6:.1f} MB in "
        f"{time.time() - start:.1f}s; saved {out / 'tokenizer.json'}"
        + (f" and {out / 'tokenizer.tiktoken'} (tiktoken ranks)" if exported else "")
        + (f"; {stats.bad_utf8} invalid UTF-8 sequences replaced" if stats.bad_utf8 else "")
        + (f"; {stats.skipped} bad records skipped" if stats.skipped else "")
    )
    return 0


# The sample is read and tokenized in pieces of at most this many characters. Pieces are cut only where
# GPT-2's pre-tokenizer splits anyway (gptforge.data.sources: before " X" after a non-space, after "x\n"
# before a non-space), so the summed count equals encoding the whole text at once. Only a stretch of
# SAMPLE_PIECE_CHARS/2 characters with no such point (binary data, one endless "word", a huge whitespace
# run) is cut where the limit falls, which can move the count by a token or two per such cut (measured:
# 0.2 on average; a relative error below 1e-4). 256 Ki also stays well below the ~1 M-character whitespace
# run at which tiktoken's regex fails ("Max stack size exceeded for backtracking").
SAMPLE_PIECE_CHARS = 1 << 18


def sample_stats(tok, path, piece_chars: int = SAMPLE_PIECE_CHARS) -> dict:
    """Bytes and tokens of a text file, read and tokenized in bounded pieces (memory does not grow with the
    file or line length); invalid UTF-8 is replaced with U+FFFD and counted, as ``data prepare`` does."""
    import sys
    from pathlib import Path

    import numpy as np
    from tqdm import tqdm

    from gptforge.data.shards import token_dtype
    from gptforge.data.sources import ReadStats, file_text_chunks
    from gptforge.data.workers import _init_local_encoder, encode_batch, encoder_payload
    from gptforge.errors import GptforgeError

    p = Path(path)
    if not p.exists():
        raise GptforgeError(f"sample file not found: {path}; pass an existing text file to --sample")
    if not p.is_file():
        raise GptforgeError(f"sample {path} is not a file; pass a text file to --sample")
    _init_local_encoder(tok, encoder_payload(tok), token_dtype(tok.vocab_size))  # data prepare's encoder
    stats = ReadStats()
    no_eot = np.zeros(1, dtype=bool)
    tokens = nbytes = 0
    bar = tqdm(total=p.stat().st_size, unit="B", unit_scale=True, desc="tokenize sample", delay=2.0,
               leave=False, file=sys.stderr, dynamic_ncols=True)
    try:
        for text, n in file_text_chunks(p, stats, piece_chars):
            tokens += len(encode_batch([text], no_eot)[0])
            nbytes += n
            bar.update(n)
    except OSError as e:
        raise GptforgeError(f"cannot read sample file {path}: {e.strerror or e}") from None
    finally:
        bar.close()
    result = {"file": str(path), "bytes": nbytes, "tokens": tokens,
              "bytes_per_token": round(nbytes / max(tokens, 1), 3)}
    if stats.bad_utf8:
        result["invalid_utf8_replaced"] = stats.bad_utf8
    return result


def run_info(args) -> int:
    from gptforge.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    info = tok.describe()
    if args.sample:
        info["sample"] = sample_stats(tok, args.sample)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"tokenizer {info['name']!r} ({info['kind']}): vocab {info['vocab_size']:,}, hash {info['hash']}")
    print("special tokens: " + ", ".join(f"{k}={v}" for k, v in info["special_tokens"].items()))
    print(f"eot_id={tok.eot_id} pad_id={tok.pad_id}; chat template: {'yes' if tok.chat_template else 'no'}")
    if "sample" in info:
        s = info["sample"]
        print(
            f"{s['file']}: {s['bytes']:,} bytes → {s['tokens']:,} tokens ({s['bytes_per_token']} bytes/token)"
            + (
                f"; {s['invalid_utf8_replaced']:,} invalid UTF-8 sequences replaced with U+FFFD"
                if s.get("invalid_utf8_replaced")
                else ""
            )
        )
    return 0


def run_encode(args) -> int:
    from pathlib import Path

    from gptforge.errors import GptforgeError
    from gptforge.tokenizer import load_tokenizer, replace_surrogates

    if (args.text is None) == (args.file is None):
        raise GptforgeError("give the text to encode, or --file FILE (not both)")
    if args.file is not None and not Path(args.file).is_file():
        what = "is not a file" if Path(args.file).exists() else "not found"
        raise GptforgeError(f"--file {args.file} {what}; pass an existing text file")
    # Bytes decoded as they are (read_text would turn \r\n into \n and change the ids).
    text = args.text if args.file is None else Path(args.file).read_bytes().decode("utf-8", errors="replace")
    text = replace_surrogates(text)  # undecodable argv bytes arrive as lone surrogates
    tok = load_tokenizer(args.tokenizer)
    ids = tok.encode(text, allow_special=args.allow_special)
    pieces = [tok.id_to_piece(i) for i in ids]
    decoded = tok.decode(ids)
    nbytes = len(text.encode("utf-8"))
    result = {
        "ids": ids,
        "pieces": pieces,
        "tokens": len(ids),
        "bytes": nbytes,
        "bytes_per_token": round(nbytes / max(len(ids), 1), 3),
        "round_trip": decoded == text,
    }
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(f"ids ({len(ids)}): {ids}")
        print("pieces: " + " ".join(repr(p) for p in pieces))
        print(
            f"{nbytes} bytes → {len(ids)} tokens ({result['bytes_per_token']} bytes/token); "
            f"round trip: {'ok' if result['round_trip'] else 'MISMATCH'}"
        )
    return 0 if result["round_trip"] else 1
