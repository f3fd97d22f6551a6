"""`groundthink-tokenize`: tokenize a corpus once into memory-mapped token shards (groundthink/data/shards.py).

    groundthink-tokenize INPUT OUT [--tokenizer char|bpe|TOKENIZER_DIR] [--vocab-size N] [--val-fraction F]
                         [--seed S] [--shard-tokens N] [--text-field NAME] [--split-paragraphs]
                         [--chunk-chars N|none] [--max-documents N] [--overwrite] [--verify]

INPUT is ``embedded`` (the corpus that ships with Python), ``hub:<dataset>`` (streamed from the Hugging Face hub;
``--hub-config``/``--hub-split``), or a .txt/.jsonl/.json file or a folder of them: the sources of `data.source`,
read as `load_documents` reads them but streamed. A progress bar shows bytes done/total, rate and ETA. Killed
half-way, the same command continues from the last complete shards; on a finished folder it does nothing.
The printed summary ends with the folder to pass to the training stream.
"""

from __future__ import annotations

import argparse
import sys
import time

from groundthink.data.corpus import DEFAULT_CHUNK_CHARS
from groundthink.data.doc_stream import DocumentSource
from groundthink.data.errors import DataError
from groundthink.data.shards import DEFAULT_SHARD_TOKENS, ShardSet, tokenize_corpus

PROG = "groundthink-tokenize"


def _optional_int(text: str) -> int | None:
    if text.lower() in ("none", "null", "all"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer (or 'none')") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Tokenize a corpus into memory-mapped token shards with a train/validation split and an index.",
    )
    p.add_argument("input", help="embedded | hub:<dataset name> | a .txt/.jsonl/.json file or a folder of them")
    p.add_argument("out", help="output folder for the shards (created; a finished one is left as it is)")
    p.add_argument("--tokenizer", default="char",
                   help="char (default), bpe (trained on the training documents; needs --vocab-size), or a saved "
                        "GroundThink tokenizer folder such as a run's tokenizer/")
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary size (with --tokenizer bpe), e.g. 24000")
    p.add_argument("--bpe-documents", type=_optional_int, default=20_000,
                   help="training documents the BPE is trained on (default 20000; 'all' for every one)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="expected share of documents held out for validation (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation draw (default 0)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS})")
    p.add_argument("--text-field", default="text", help="JSON field with the text (default: text)")
    p.add_argument("--split-paragraphs", action="store_true", help="text files: one document per blank-line "
                                                                   "paragraph")
    p.add_argument("--chunk-chars", type=_optional_int, default=DEFAULT_CHUNK_CHARS,
                   help=f"text files: cut documents into pieces of at most this many characters "
                        f"(default {DEFAULT_CHUNK_CHARS}; 'none' keeps whole files)")
    p.add_argument("--max-documents", type=_optional_int, default=None, help="stop after this many documents")
    p.add_argument("--hub-config", default=None, help="hub dataset config name")
    p.add_argument("--hub-split", default="train", help="hub dataset split (default train)")
    p.add_argument("--no-eos", action="store_true", help="do not append the end-of-text token to each document")
    p.add_argument("--overwrite", action="store_true", help="replace shards made with other settings")
    p.add_argument("--verify", action="store_true", help="afterwards, check every shard's sha256 against the index")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # Fault injection for the crash-recovery test: exit like a killed process after the N-th group of shards.
    p.add_argument("--fault-exit-after-shards", type=int, default=None, help=argparse.SUPPRESS)
    return p


def source_from_input(args: argparse.Namespace) -> DocumentSource:
    common = {"text_field": args.text_field, "split_paragraphs": args.split_paragraphs,
              "chunk_chars": args.chunk_chars, "max_documents": args.max_documents}
    if args.input == "embedded":
        return DocumentSource("embedded", **common)
    if args.input.startswith("hub:"):
        return DocumentSource("hub", hub_name=args.input[4:], hub_config=args.hub_config, hub_split=args.hub_split,
                              **common)
    return DocumentSource("file", path=args.input, **common)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.time()
    try:
        source = source_from_input(args)
        result = tokenize_corpus(
            source,
            args.out,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            bpe_documents=args.bpe_documents,
            val_fraction=args.val_fraction,
            seed=args.seed,
            shard_tokens=args.shard_tokens,
            append_eos=not args.no_eos,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            fault_exit_after_shards=args.fault_exit_after_shards,
        )
        if args.verify:
            for split in ("train", "val"):
                if result.index["splits"][split]["shards"]:
                    ShardSet(result.path, split).verify()
    except DataError as exc:
        print(f"Error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"\nInterrupted; run the same command again to continue from the last complete shards in {args.out}",
              file=sys.stderr, flush=True)
        return 130
    index = result.index
    seconds = time.time() - t0
    lines = ["", f"=== token shards {'(already complete, nothing to do)' if result.skipped else 'written'}: "
                 f"{result.path} ==="]
    for split in ("train", "val"):
        info = index["splits"][split]
        lines.append(f"{split:5s}  {info['num_documents']:>10,d} documents  {info['num_tokens']:>14,d} tokens  "
                     f"{len(info['shards'])} shard(s)")
    tok = index["tokenizer"]
    lines.append(f"tokenizer  {tok['kind']}, {tok['vocab_size']} ids, fingerprint {tok['fingerprint'][:12]} "
                 f"(saved in {result.path / tok['dir']})")
    if not result.skipped:
        total = sum(index["splits"][s]["num_tokens"] for s in ("train", "val"))
        lines.append(f"time       {seconds:.1f} s ({total / max(seconds, 1e-9) / 1e6:.2f}M tokens/s)")
    lines.append(f"dataset id {index['dataset_id'][:16]}" + ("   (every sha256 verified)" if args.verify else ""))
    lines.append(f"stream     ShardTBPTTStream({str(result.path)!r}, batch_size=...) "
                 f"(groundthink.data.shard_stream)")
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
