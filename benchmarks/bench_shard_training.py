"""Training from token shards at two corpus sizes: `python -m benchmarks.bench_shard_training [--sizes 100M,1G]`.

For each size S it generates S bytes of JSON Lines text as bench_shards does (three sources: A medium documents,
B short, C long), tokenizes each with `groundthink-tokenize` (char), then runs `groundthink-train data=shards` on the
60/30/10 token-weighted mixture of the three for `--steps` steps (the tiny model, W&B off) in a child process, and
reports the child's peak resident memory (ru_maxrss). The claim checked: peak RSS does not grow with the corpus
(within `--flat-mb`). Not a test: times depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_shards import SOURCES, WEIGHTS, _child, _size, generate

REPO = Path(__file__).resolve().parent.parent


def train(shards: dict[str, Path], root: Path, steps: int) -> dict:
    """groundthink-train data=shards on the mixture in a child process: its peak RSS (MB), wall time, summary."""
    mixture = "[" + ", ".join(f"{{path: '{shards[k]}', weight: {WEIGHTS[k]}}}" for k in SOURCES) + "]"
    env = dict(os.environ, WANDB_MODE="disabled", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               GROUNDTHINK_OUTPUT_ROOT=str(root / "outputs"))
    args = ["debug=fast", "trainer.num_threads=1", "data=shards", f"data.mixture={mixture}",
            f"trainer.max_steps={steps}", "trainer.val_every_n_steps=25", "callbacks.checkpoint.every_n_steps=25",
            "logger.wandb.enabled=false", "callbacks.progress_bar=false"]
    # groundthink-train in this child process, which prints its own peak RSS (VmHWM) when training has ended
    code = ("import json, runpy, sys\nsys.argv = ['groundthink-train'] + json.loads(sys.argv[1])\ntry:\n"
            "    runpy.run_module('groundthink.train', run_name='__main__')\nfinally:\n"
            "    from benchmarks.bench_shards import memory\n    print('RSS' + json.dumps(memory()), flush=True)\n")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], cwd=root,
                          env=dict(env, PYTHONPATH=str(REPO)), capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rss = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RSS"))[3:])
    (run,) = [p for p in (root / "outputs" / "default").iterdir() if p.is_dir()]
    summary = json.loads((run / "summary.json").read_text())
    return {"peak_rss_mb": rss["VmHWM"], "end_rss_mb": rss["VmRSS"], "anon_mb": rss.get("RssAnon"),
            "file_mb": rss.get("RssFile"), "wall_s": wall, "step": summary["step"],
            "val_loss": summary["final"].get("val/loss")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100M,1G")
    p.add_argument("--workdir", default=None, help="where to generate (default: a temporary folder, removed)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--flat-mb", type=float, default=32.0, help="allowed peak-RSS growth from the smallest size")
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for size_text in args.sizes.split(","):
            folder = Path(tmp) / size_text
            t0 = time.time()
            srcs = generate(folder / "text", _size(size_text))
            tok = {k: _child("tokenize", str(v), str(folder / f"shards_{k}")) for k, v in srcs.items()}
            prepare_s = time.time() - t0
            result = train({k: folder / f"shards_{k}" for k in SOURCES}, folder, args.steps)
            results[size_text] = {"prepare_s": prepare_s, "tokens": sum(t["tokens"] for t in tok.values()),
                                  "shard_bytes": sum(t["shard_bytes"] for t in tok.values()), **result}
            print(f"{size_text}: {results[size_text]['tokens'] / 1e6:.0f}M tokens, "
                  f"{results[size_text]['shard_bytes'] / 2**30:.2f} GiB of shards; training {args.steps} steps: peak "
                  f"RSS {result['peak_rss_mb']:.0f} MB (at the end {result['end_rss_mb']:.0f} MB: anon "
                  f"{result['anon_mb']:.0f}, file {result['file_mb']:.0f}), {result['wall_s']:.0f} s, "
                  f"val/loss {result['val_loss']}", flush=True)
            subprocess.run(["rm", "-rf", str(folder / "text")])
    print(json.dumps(results, indent=1))
    peaks = [r["peak_rss_mb"] for r in results.values()]
    ok = max(peaks) - peaks[0] <= args.flat_mb
    print(f"{'PASS' if ok else 'FAIL'}: training peak RSS {', '.join(f'{p:.0f}' for p in peaks)} MB for "
          f"{', '.join(results)}: grows by {max(peaks) - peaks[0]:.0f} MB (allowed {args.flat_mb:.0f})")


if __name__ == "__main__":
    main()
