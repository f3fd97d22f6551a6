"""benchmarks/gpu_check.sh, the GPU check a session with a CUDA machine runs first: its argument handling and its
no-GPU message here, and its training + report steps rehearsed on the CPU (the parity and bf16 parts need CUDA)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from .conftest import REPO, cli_env

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def check(*args: str, root=None) -> subprocess.CompletedProcess:
    env = cli_env(root) if root else None
    return subprocess.run(["bash", str(SCRIPT), "--python", sys.executable, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("args,message", [
    (["--steps", "abc"], "--steps must be a positive whole number, got 'abc'"),
    (["--batch", "0"], "--batch must be a positive whole number, got '0'"),
    (["--frobnicate"], "unknown argument '--frobnicate'"),
    (["--wheels"], "--wheels needs a folder"),
])
def test_bad_arguments_are_named_before_anything_runs(args, message):
    proc = check(*args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run for real")
def test_without_cuda_it_says_there_is_nothing_to_check():
    proc = check()
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device visible" in proc.stdout and "nothing to check" in proc.stdout
    assert "=== gpu_check" not in proc.stdout  # no install, no tests, no training


@pytest.mark.slow
def test_cpu_rehearsal_trains_and_reports_what_the_run_measured(tmp_path):
    out = tmp_path / "runs"
    proc = check("--cpu-rehearsal", "--presets", "tiny", "--steps", "6", "--batch", "2", "--seq-len", "32",
                 "--out", str(out), root=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = (out / "gpu_check_tiny").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 6
    (row,) = [line.split() for line in proc.stdout.splitlines() if line.strip().startswith("tiny ")]
    assert row[1] == f"{summary['num_params']:,}" and row[2] == f"{summary['tokens_per_s']:,.0f}"
    assert proc.stdout.rstrip().endswith("gpu_check: done")
