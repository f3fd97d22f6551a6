"""benchmarks/gpu_check.sh, the GPU check a session with a CUDA machine runs first: its argument handling and its
no-GPU message here, and its training + report steps rehearsed on the CPU (the parity and bf16 parts need CUDA)."""

from __future__ import annotations

import json
import re
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
    (["--impls", "fast"], "--impls: unknown impl 'fast'"),
    (["--impls", "auto causal_conv1d"], "--impls: unknown impl 'causal_conv1d'"),  # an op's kernel, not a model's
    (["--impls", " "], "--impls needs at least one impl"),
    (["--tests"], "--tests needs a pytest -k expression"),
    (["--build", "mamba"], "--build: unknown package 'mamba' (mamba_ssm, causal_conv1d)"),
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
def test_cpu_rehearsal_trains_each_impl_and_reports_what_the_runs_measured(tmp_path):
    out = tmp_path / "runs"
    proc = check("--cpu-rehearsal", "--presets", "tiny", "--impls", "auto chunked", "--steps", "6", "--batch", "2",
                 "--seq-len", "32", "--out", str(out), root=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The torch-only run goes first whatever the order given: it needs no kernel; the parity tests come between,
    # every one skipped here (no CUDA), none failed or missing.
    assert proc.stdout.index("impl=chunked, 6 steps") < proc.stdout.index("parity: chunked ops") \
        < proc.stdout.index("impl=auto, 6 steps")
    assert re.search(r"=+ [1-9]\d* skipped(, \d+ deselected)? in ", proc.stdout), proc.stdout[-3000:]
    rows = {}
    for impl in ("auto", "chunked"):
        (run,) = (out / f"gpu_check_tiny_{impl}").iterdir()
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["step"] == 6
        (rows[impl],) = [line.split() for line in proc.stdout.splitlines() if line.split()[:2] == ["tiny", impl]]
        assert rows[impl][2] == f"{summary['num_params']:,}" and rows[impl][3] == f"{summary['startup_s']:.1f}s"
        # 6 steps end before the warm-up does: the summary's rate, marked
        assert rows[impl][4] == f"{summary['tokens_per_s']:,.0f}*"
        assert "wkv6=chunked," in rows[impl]  # on the CPU auto resolves to the torch ops
    # Speeds are relative to the first impl listed.
    assert rows["auto"][7] == "1.00x"
    ratio = float(rows["chunked"][4].rstrip("*").replace(",", "")) / float(rows["auto"][4].rstrip("*").replace(",", ""))
    assert abs(float(rows["chunked"][7].rstrip("x")) - ratio) < 0.02
    assert "gpu_check: done in" in proc.stdout.splitlines()[-1]


def test_the_report_names_a_missing_or_unfinished_run(tmp_path):
    from benchmarks.gpu_report import table

    run = tmp_path / "gpu_check_8m_chunked" / "2026-01-01_00-00-00_abcd"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"status": "failed", "num_params": 10, "tokens_per_s": 1.0}))
    lines = table(tmp_path, ["8m"], ["chunked", "auto"])
    assert "run failed, not completed" in lines[1]
    assert f"no run under {tmp_path}" in lines[2]


def test_the_report_rates_the_steps_after_the_warm_up_as_tokens_over_time():
    from benchmarks.gpu_report import steady_rate

    windows = [(10, 50.0), (20, 100.0), (30, 200.0), (40, 400.0)]  # equal tokens per window: time is 1/rate
    mfus = [(10, 0.005), (20, 0.01), (30, 0.02), (40, 0.04)]
    rate, mfu = steady_rate(windows, mfus, warmup=20)
    assert rate == pytest.approx(2 / (1 / 200 + 1 / 400)) and mfu == pytest.approx(rate * 0.04 / 400)
    assert steady_rate(windows, mfus, warmup=40) == (None, None)  # nothing after the warm-up: the caller falls back
    assert steady_rate(windows, [], warmup=0)[1] is None  # no MFU logged (no known peak): rate only


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run for real")
def test_the_install_build_and_parity_steps_run_in_order_around_a_background_build(tmp_path):
    """The steps that only a GPU machine reaches, rehearsed with an interpreter that answers the script's three
    device questions as an H200 would (every other call goes to the real one, so the parity tests skip: no CUDA).
    The wheel folder holds a mamba_ssm source archive whose build fails (a setup.py without architectures): the
    tests that need no build run while it builds, the build's failure is reported, not fatal, and the tests that
    needed it run (and skip) after it. causal-conv1d's archive is there too, and left alone (--build)."""
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
case "$*" in
  *get_device_name*) echo "Rehearsal GPU"; exit 0 ;;
  *get_device_capability*) echo 90; exit 0 ;;
  *torch.version.cuda*) echo "rehearsal 0.0"; exit 0 ;;
esac
exec {sys.executable} "$@"
""")
    fake.chmod(0o755)
    wheels = tmp_path / "wheels"
    source = tmp_path / "mamba_ssm-0.0"
    source.mkdir(parents=True)
    (source / "setup.py").write_text("cc_flag = []\n")
    wheels.mkdir()
    subprocess.run(["tar", "-czf", str(wheels / "mamba_ssm-0.0.tar.gz"), "-C", str(tmp_path), source.name],
                   check=True)
    (wheels / "causal_conv1d-0.0.tar.gz").write_bytes(b"")  # left alone: --build names mamba_ssm only
    proc = subprocess.run(["bash", str(SCRIPT), "--python", str(fake), "--wheels", str(wheels), "--skip-train",
                           "--build", "mamba_ssm"],
                          cwd=REPO, env=cli_env(tmp_path, TMPDIR=str(tmp_path)), capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    steps = ["gpu_check: Rehearsal GPU",
             'not building causal_conv1d (--build "mamba_ssm"; its parity tests will be skipped)',
             "building mamba_ssm from mamba_ssm-0.0.tar.gz for sm_90 in the background",
             "parity: chunked ops vs the installed kernels (while mamba_ssm build)",
             "waiting for the kernel builds",
             "found no cc_flag.append(\"-gencode\") pairs in setup.py",
             "gpu_check: mamba_ssm was not built (the parity tests that need it will be skipped)",
             "parity: chunked ops vs mamba_ssm",
             "gpu_check: done in"]
    at = [out.find(step) for step in steps]
    assert -1 not in at and at == sorted(at), list(zip(steps, at))
    # the first parity run left out exactly the build's tests, the second ran only those
    first, second = out.split("parity: chunked ops vs mamba_ssm")
    assert "test_mamba_ssm_matches_chunked" not in first.split("(while mamba_ssm build)")[1]
    assert "test_fla_matches_chunked" not in second and "test_mamba_ssm_matches_chunked" in second
