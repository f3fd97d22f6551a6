"""Token shards at corpus sizes beyond a memory cap: `python -m benchmarks.bench_shards [--sizes 100M,1G]`.

For each size S it generates S bytes of JSON Lines text in a temporary folder (real English: slices of the
embedded corpus, documents of varied length) as three sources with different document lengths (A: medium, half of
S; B: short, 35%; C: long, 15%), tokenizes each with `groundthink-tokenize` (char tokenizer: 2 bytes per character
on disk), then streams `ShardTBPTTStream` batches from the 60/30/10 token-weighted mixture of the three. Each step
runs in its own process and reports its resident memory from /proc/self/status (VmRSS now, VmHWM = peak, and the
anonymous / file-backed split), so the numbers of one size do not leak into the other's.

It checks, and prints PASS/FAIL for: peak RSS of tokenizing and of streaming below `--cap-mb` (default 512 MB, so
the 1G corpus, 2 GB of shards, is 4x the cap); streaming RSS at the end within `--flat-mb` (default 32 MB) of the
RSS after the first batches, and of the smaller corpus's; the realised mixture within 1 point of 60/30/10 over the
streamed tokens (> 10^6). Not a test: times depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SOURCES = {"A": (0.50, 4_000), "B": (0.35, 600), "C": (0.15, 30_000)}  # share of bytes, mean document chars
WEIGHTS = {"A": 0.6, "B": 0.3, "C": 0.1}


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def memory() -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process in MB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    return out


def generate(folder: Path, total_bytes: int, seed: int = 0) -> dict[str, Path]:
    """Three JSON Lines sources under `folder`, about `total_bytes` of text in all."""
    from groundthink.data.corpus import embedded_documents

    text = "\n\n".join(embedded_documents())
    rng = random.Random(seed)
    paths = {}
    for name, (share, mean_chars) in SOURCES.items():
        src = folder / name
        src.mkdir(parents=True, exist_ok=True)
        budget, part, written = int(share * total_bytes), 0, 0
        out = None
        while written < budget:
            if out is None or out.tell() > 256 << 20:  # 256 MB files
                if out is not None:
                    out.close()
                out = open(src / f"part_{part:03d}.jsonl", "w")
                part += 1
            n = max(1, int(rng.expovariate(1.0 / mean_chars)))
            start = rng.randrange(0, len(text) - n) if n < len(text) else 0
            line = json.dumps({"text": text[start:start + n]}) + "\n"
            out.write(line)
            written += len(line)
        out.close()
        paths[name] = src
    return paths


def tokenize_step(src: str, out: str) -> dict:
    from groundthink.data.tokenize_cli import main

    t0 = time.time()
    rc = main([src, out, "--no-progress"])
    index = json.loads((Path(out) / "index.json").read_text())
    return {"rc": rc, "seconds": time.time() - t0, "memory": memory(),
            "tokens": sum(index["splits"][s]["num_tokens"] for s in ("train", "val")),
            "shard_bytes": sum((Path(out) / r["tokens"]).stat().st_size for s in ("train", "val")
                               for r in index["splits"][s]["shards"])}


def stream_step(shards: dict[str, str], batches: int, batch_size: int, seq_len: int) -> dict:
    from groundthink.data.shard_stream import ShardTBPTTStream

    stream = ShardTBPTTStream([(shards[k], WEIGHTS[k]) for k in SOURCES], batch_size, seed=0)
    samples = []
    t0 = time.time()
    for i in range(batches):
        stream.next_batch(seq_len)
        if i in (9, batches // 4, batches // 2, 3 * batches // 4, batches - 1):
            samples.append({"batch": i + 1, "tokens": stream.tokens_seen, **memory()})
    return {"seconds": time.time() - t0, "tokens": stream.tokens_seen, "samples": samples,
            "mixture": list(stream.mixture().values()), "memory": memory()}


def _child(step: str, *args: str) -> dict:
    code = (f"import json, sys; from benchmarks.bench_shards import {step}_step as f; "
            f"print('RESULT' + json.dumps(f(*json.loads(sys.argv[1]))))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(list(args))], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"{step} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100M,1G", help="corpus sizes in bytes (K/M/G suffixes), comma-separated")
    p.add_argument("--workdir", default=None, help="where to generate (default: a temporary folder, removed)")
    p.add_argument("--batches", type=int, default=10_000, help="batches streamed per size")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--cap-mb", type=float, default=512.0, help="peak RSS allowed to tokenizing and streaming")
    p.add_argument("--flat-mb", type=float, default=32.0, help="allowed RSS growth while streaming / across sizes")
    args = p.parse_args()
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gt-bench-shards-"))
    results = {}
    try:
        for size_text in args.sizes.split(","):
            size = _size(size_text)
            folder = root / size_text
            t0 = time.time()
            srcs = generate(folder / "text", size)
            gen_s = time.time() - t0
            tok = {k: _child("tokenize", str(v), str(folder / f"shards_{k}")) for k, v in srcs.items()}
            shards = {k: str(folder / f"shards_{k}") for k in srcs}
            stream = _child("stream", shards, args.batches, args.batch_size, args.seq_len)
            results[size_text] = {"generate_s": gen_s, "tokenize": tok, "stream": stream}
            text_bytes = sum(f.stat().st_size for v in srcs.values() for f in v.iterdir())
            shard_bytes = sum(t["shard_bytes"] for t in tok.values())
            print(f"\n== corpus {size_text}: {text_bytes / 2**20:.0f} MiB of JSON Lines text -> "
                  f"{sum(t['tokens'] for t in tok.values()) / 1e6:.0f}M tokens, "
                  f"{shard_bytes / 2**20:.0f} MiB of shards "
                  f"(generated in {gen_s:.0f} s)")
            for k, t in tok.items():
                m = t["memory"]
                print(f"tokenize {k}: {t['tokens'] / 1e6:7.1f}M tokens in {t['seconds']:6.1f} s "
                      f"({t['tokens'] / t['seconds'] / 1e6:.2f}M tok/s); peak RSS {m['VmHWM']:.0f} MB")
            print(f"stream {args.batches} batches of {args.batch_size}x{args.seq_len} ({stream['tokens'] / 1e6:.1f}M "
                  f"tokens) in {stream['seconds']:.1f} s ({stream['tokens'] / stream['seconds'] / 1e6:.2f}M tok/s)")
            print("  batch      tokens   VmRSS  RssAnon  RssFile  VmHWM (MB)")
            for s in stream["samples"]:
                print(f"  {s['batch']:5d} {s['tokens']:11,d} {s['VmRSS']:7.1f} {s['RssAnon']:8.1f} {s['RssFile']:8.1f} "
                      f"{s['VmHWM']:6.1f}")
            mix = stream["mixture"]
            print(f"  realised mixture A/B/C: {' / '.join(f'{x:.4f}' for x in mix)} (target 0.6 / 0.3 / 0.1)")
        print("\n== checks")
        ok = True
        for size_text, r in results.items():
            peak_tok = max(t["memory"]["VmHWM"] for t in r["tokenize"].values())
            samples = r["stream"]["samples"]
            growth = samples[-1]["VmRSS"] - samples[0]["VmRSS"]
            err = max(abs(a - b) for a, b in zip(r["stream"]["mixture"], WEIGHTS.values()))
            checks = [
                (f"{size_text}: tokenize peak RSS {peak_tok:.0f} MB <= cap {args.cap_mb:.0f} MB",
                 peak_tok <= args.cap_mb),
                (f"{size_text}: stream peak RSS {r['stream']['memory']['VmHWM']:.0f} MB <= cap {args.cap_mb:.0f} MB",
                 r["stream"]["memory"]["VmHWM"] <= args.cap_mb),
                (f"{size_text}: stream RSS growth over the run {growth:+.1f} MB within {args.flat_mb:.0f} MB",
                 abs(growth) <= args.flat_mb),
                (f"{size_text}: mixture max |share - weight| {err:.4f} <= 0.01 over {r['stream']['tokens']:,d} tokens",
                 err <= 0.01 and r["stream"]["tokens"] >= 1_000_000),
            ]
            for text, passed in checks:
                ok &= passed
                print(f"{'PASS' if passed else 'FAIL'}  {text}")
        sizes = list(results)
        if len(sizes) > 1:
            a, b = (results[s]["stream"]["samples"][-1]["VmRSS"] for s in (sizes[0], sizes[-1]))
            passed = abs(b - a) <= args.flat_mb
            ok &= passed
            print(f"{'PASS' if passed else 'FAIL'}  stream RSS {sizes[0]} {a:.1f} MB vs {sizes[-1]} {b:.1f} MB: "
                  f"difference {b - a:+.1f} MB within {args.flat_mb:.0f} MB")
        print("ALL PASS" if ok else "SOME CHECKS FAILED")
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    main()
