"""``gptforge tokenizer train|info|encode``: train a byte-level BPE, inspect a tokenizer, encode text."""

from __future__ import annotations

import json

from gptforge.commands import add_parser


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
    train.add_argument("--vocab-size", type=int, required=True, help="including 256 bytes and special tokens")
    train.add_argument(
        "--out", required=True, help="output directory (tokenizer.json, tokenizer.tiktoken, config)"
    )
    train.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge")
    train.add_argument(
        "--max-bytes", type=float, default=None, help="stop reading after this many bytes (e.g. 2e9)"
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
    from gptforge.tokenizer import SPECIAL_TOKENS, train_bpe

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


def run_info(args) -> int:
    from pathlib import Path

    from gptforge.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    info = tok.describe()
    if args.sample:
        text = Path(args.sample).read_text(encoding="utf-8", errors="replace")
        n = len(tok.encode(text))
        info["sample"] = {
            "file": args.sample,
            "bytes": len(text.encode()),
            "tokens": n,
            "bytes_per_token": round(len(text.encode()) / max(n, 1), 3),
        }
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
        )
    return 0


def run_encode(args) -> int:
    from pathlib import Path

    from gptforge.errors import GptforgeError
    from gptforge.tokenizer import load_tokenizer

    if (args.text is None) == (args.file is None):
        raise GptforgeError("give the text to encode, or --file FILE (not both)")
    text = args.text if args.file is None else Path(args.file).read_text(encoding="utf-8", errors="replace")
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
