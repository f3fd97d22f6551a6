"""groundthink-datagen throughput against a local server with a fixed per-request latency, by concurrency.

    python -m benchmarks.bench_datagen                             # 64 records, 0.15 s latency, concurrency 1,4,16
    python -m benchmarks.bench_datagen --records 200 --latency 0.5 --concurrency 1,8,32

Runs the real CLI (`python -m groundthink.datagen`, responses pipeline, chat mode) against the fault-injecting test
server without faults (tests/datagen_fault_server.py, 127.0.0.1, ephemeral port) and reads records/s of the
generation phase from each run's manifest.json (written records / phase wall time, start-up not included).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    from tests.datagen_fault_server import FaultServer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=64, help="records per run (prompts x 2 variants)")
    parser.add_argument("--latency", type=float, default=0.15, help="seconds the server waits per request")
    parser.add_argument("--concurrency", default="1,4,16")
    args = parser.parse_args()
    server = FaultServer(latency_s=args.latency, api_key="bench-key")
    url = server.start()
    print("| concurrency | records | records/s | server latency |")
    print("|---|---|---|---|")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            prompts = root / "prompts.jsonl"
            prompts.write_text("".join(json.dumps({"id": f"p{i:04d}", "text": f"[[p{i:04d}]] Topic {i}."}) + "\n"
                                       for i in range((args.records + 1) // 2)))
            for concurrency in [int(c) for c in args.concurrency.split(",")]:
                name = f"bench{concurrency}"
                env = dict(os.environ, GROUNDTHINK_OUTPUT_ROOT=str(root / "outputs"), BENCH_KEY="bench-key")
                proc = subprocess.run(
                    [sys.executable, "-m", "groundthink.datagen", "backend=openai", f"backend.base_url={url}",
                     "backend.model=fault-model", "backend.api_key_env=BENCH_KEY", "backend.mode=chat",
                     "prompts=file", f"prompts.path={prompts}", f"count={args.records}",
                     f"concurrency={concurrency}", f"name={name}", "qc.fail_exit=false"],
                    env=env, capture_output=True, text=True, timeout=3600)
                if proc.returncode != 0:
                    raise SystemExit(proc.stderr[-3000:])
                manifest = json.loads((root / "outputs" / "datagen" / name / "manifest.json").read_text())
                phase = manifest["invocations"][-1]["phases"][0]
                print(f"| {concurrency} | {phase['written']} | {phase['records_per_s']:.1f} | {args.latency} s |")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
