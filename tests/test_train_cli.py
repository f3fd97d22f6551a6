"""End-to-end tests of `groundthink-train` through its real command line (Hydra + Lightning + W&B offline)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FAST = ["debug=fast", "trainer.num_threads=1"]


def run_train(tmp_path: Path, *overrides: str, expect_ok: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", HF_DATASETS_OFFLINE="1")
    env["GROUNDTHINK_OUTPUT_ROOT"] = str(tmp_path / "outputs")
    tmp_path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "groundthink.train", *FAST, *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if expect_ok and proc.returncode != 0:
        raise AssertionError(
            f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
        )
    return proc


def run_dirs(tmp_path: Path, name: str = "default") -> list[Path]:
    return sorted(p for p in (tmp_path / "outputs" / name).iterdir() if p.is_dir())


def read_losses(run_dir: Path, column: str = "train/loss") -> dict[int, float]:
    with open(run_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r[column]) for r in csv.DictReader(f) if r.get(column)}


def test_default_run_writes_every_artifact(tmp_path):
    proc = run_train(tmp_path)
    (run,) = run_dirs(tmp_path)
    for rel in ["config.yaml", "metrics.csv", "summary.json", "tokenizer", ".hydra/overrides.yaml",
                "checkpoints/last.safetensors", "checkpoints/last.json"]:
        assert (run / rel).exists(), f"missing {rel}"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 20
    assert "val/loss" in summary["final"] and "val/bpb" in summary["final"]
    sidecar = json.loads((run / "checkpoints/last.json").read_text())
    for key in ["step", "metrics", "data_position", "run_id", "wandb_run_id", "config", "provenance"]:
        assert key in sidecar, key
    for key in ["git_sha", "git_branch", "git_dirty", "python", "torch"]:
        assert key in sidecar["provenance"], key
    assert sidecar["config"]["model"]["d_model"] == 64
    assert list((run / "wandb").glob("offline-run-*")), "W&B offline run folder missing"
    losses = read_losses(run)
    assert losses and min(losses) >= 1
    assert "bits/byte" in proc.stdout and "resume" in proc.stdout


def test_resume_after_sigterm_is_bit_exact(tmp_path):
    steps = ["trainer.max_steps=16", "trainer.log_every_n_steps=1", "trainer.val_every_n_steps=5",
             "callbacks.checkpoint.every_n_steps=100"]
    run_train(tmp_path / "a", *steps)
    (full,) = run_dirs(tmp_path / "a")

    killed = run_train(tmp_path / "b", *steps, "faults.sigterm_at_step=7", expect_ok=False)
    assert killed.returncode == 143, killed.stderr[-3000:]
    (part,) = run_dirs(tmp_path / "b")
    assert json.loads((part / "summary.json").read_text())["status"] == "interrupted"
    sidecar = json.loads((part / "checkpoints/last.json").read_text())
    assert 7 <= sidecar["step"] < 16

    run_train(tmp_path / "b", *steps, f"resume={part}")
    assert run_dirs(tmp_path / "b") == [part], "resume must continue in the same folder"
    reference, resumed = read_losses(full), read_losses(part)
    assert sorted(resumed) == sorted(reference) and len(reference) == 16
    for step, loss in reference.items():
        assert abs(resumed[step] - loss) <= 1e-6, (step, resumed[step], loss)
    val_ref, val_res = read_losses(full, "val/loss"), read_losses(part, "val/loss")
    assert val_ref == pytest.approx(val_res, abs=1e-6)
    summary = json.loads((part / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["wandb_run_id"] == sidecar["wandb_run_id"]
    assert {p.name.split("-")[-1] for p in (part / "wandb").glob("offline-run-*")} == {sidecar["wandb_run_id"]}


def test_nan_stops_the_run_and_keeps_last_good_checkpoint(tmp_path):
    proc = run_train(tmp_path, "faults.nan_at_step=13", expect_ok=False)
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    assert "step 13" in err and "non-finite" in err
    assert any(c in err for c in ("rwkv", "mamba")), err[-2000:]
    (run,) = run_dirs(tmp_path)
    assert json.loads((run / "summary.json").read_text())["status"] == "failed"
    sidecar = json.loads((run / "checkpoints/last.json").read_text())
    assert sidecar["step"] == 10
    from groundthink.training.checkpoint import load_checkpoint

    tensors, _ = load_checkpoint(run / "checkpoints/last.safetensors")
    assert all(bool(t.isfinite().all()) for t in tensors.values() if t.is_floating_point())


def test_unknown_key_names_the_closest_valid_one(tmp_path):
    proc = run_train(tmp_path, "model.alpah=0.5", expect_ok=False)
    assert proc.returncode != 0
    assert "model.alpah" in proc.stderr and "model.alpha" in proc.stderr


def test_missing_and_empty_data_files_fail_before_training(tmp_path):
    proc = run_train(tmp_path, "data=file", f"data.path={tmp_path / 'nope.txt'}", expect_ok=False)
    assert proc.returncode != 0 and "nope.txt" in proc.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    proc = run_train(tmp_path, "data=file", f"data.path={empty}", expect_ok=False)
    assert proc.returncode != 0 and "empty.txt" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_tampered_checkpoint_is_detected_on_resume(tmp_path):
    run_train(tmp_path, "trainer.max_steps=20")
    (run,) = run_dirs(tmp_path)
    last = run / "checkpoints" / "last.safetensors"
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF
    last.write_bytes(bytes(data))
    proc = run_train(tmp_path, "trainer.max_steps=30", f"resume={run}")
    assert "last.safetensors" in proc.stdout + proc.stderr  # says which file was skipped
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 30


def test_read_only_output_root_is_a_clear_error(tmp_path):
    env_root = "/proc/groundthink-cannot-write-here"
    env = dict(os.environ, WANDB_MODE="offline", GROUNDTHINK_OUTPUT_ROOT=env_root)
    proc = subprocess.run([sys.executable, "-m", "groundthink.train", *FAST], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "groundthink-cannot-write-here" in proc.stderr
    assert "paths.output_root" in proc.stderr
