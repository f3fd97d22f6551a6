"""End-to-end tests of `groundthink-train` through its real command line (Hydra + Lightning + W&B offline): what a
run writes, exact resume after SIGTERM and SIGKILL, and every failure path a user hits ending cleanly (the cases
of issue 11: messages that state only what is true, bad input refused before a run folder exists, no lost rows)."""

from __future__ import annotations

import csv
import json
import os
import re
import resource
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import cli_env, read_column, run_cli, run_dirs, run_train

pytestmark = pytest.mark.slow


def test_default_run_writes_every_artifact_with_1_based_steps(tmp_path):
    proc = run_train(tmp_path, "trainer.max_steps=15", "trainer.val_every_n_steps=10",
                     "callbacks.checkpoint.every_n_steps=5", "trainer.log_every_n_steps=1")
    (run,) = run_dirs(tmp_path)
    for rel in ["config.yaml", "metrics.csv", "summary.json", "tokenizer", ".hydra/overrides.yaml",
                "checkpoints/last.safetensors", "checkpoints/last.json", "train.log"]:
        assert (run / rel).exists(), f"missing {rel}"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 15
    # Steps are 1-based everywhere: the first training row is step 1, checkpoints and validation agree with it.
    assert sorted(read_column(run)) == list(range(1, 16))
    assert sorted(read_column(run, "val/loss")) == [10, 15]  # validated after the last step too: never stale
    assert summary["final"]["val/loss"] == read_column(run, "val/loss")[15]
    ckpt = run / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("step_*.safetensors")) == [
        "step_0000005.safetensors", "step_0000010.safetensors", "step_0000015.safetensors"]
    sidecar = json.loads((ckpt / "last.json").read_text())
    assert sidecar["step"] == 15
    assert (ckpt / "last.safetensors").stat().st_ino == (ckpt / "step_0000015.safetensors").stat().st_ino
    for key in ["step", "metrics", "data_position", "run_id", "wandb_run_id", "config", "provenance"]:
        assert key in sidecar, key
    assert sidecar["metrics"]["val/loss"] == pytest.approx(read_column(run, "val/loss")[15])
    assert sidecar["config"]["model"]["d_model"] == 64
    assert list((run / "wandb").glob("offline-run-*")), "W&B offline run folder missing"
    # One throughput figure: summary, closing line and the comparison report agree.
    shown = re.search(r"throughput (\d+) tokens/s", proc.stdout)
    assert shown and int(shown.group(1)) == round(summary["tokens_per_s"])
    from groundthink.reporting.compare import main as compare

    assert compare([str(run), "--out", str(tmp_path / "report")]) == 0
    with open(tmp_path / "report" / "runs.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["tokens_per_s"]) == pytest.approx(summary["tokens_per_s"])
    # The log file holds the run's messages; Lightning's own deprecation noise is gone.
    log_text = (run / "train.log").read_text()
    assert "GroundThink run" in log_text and "completed at step 15" in log_text
    assert "LeafSpec" not in proc.stderr + proc.stdout
    assert "bits/byte" in proc.stdout and "resume" in proc.stdout


# The interrupted runs below are compared, row by row, with one uninterrupted run of the same settings.
STEPS = ["trainer.max_steps=16", "trainer.log_every_n_steps=1", "trainer.val_every_n_steps=5",
         "callbacks.checkpoint.every_n_steps=5"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    run_train(root, *STEPS)
    (full,) = run_dirs(root)
    return full


def test_resume_after_sigterm_is_bit_exact(tmp_path, uninterrupted):
    """SIGTERM between checkpoints (step 7; they are every 5 steps): the run saves step 7 and exits 143; the resume
    continues from step 7 in the same folder and its every row equals the uninterrupted run's."""
    steps, full = STEPS, uninterrupted
    killed = run_train(tmp_path / "b", *steps, "faults.sigterm_at_step=7", expect_rc=143)
    (part,) = run_dirs(tmp_path / "b")
    assert json.loads((part / "summary.json").read_text())["status"] == "interrupted"
    sidecar = json.loads((part / "checkpoints/last.json").read_text())
    assert sidecar["step"] == 7, killed.stdout[-2000:]

    run_train(tmp_path / "b", *steps, f"resume={part}")
    assert run_dirs(tmp_path / "b") == [part], "resume must continue in the same folder"
    reference, resumed = read_column(full), read_column(part)
    assert sorted(resumed) == sorted(reference) == list(range(1, 17))
    for step, loss in reference.items():
        assert abs(resumed[step] - loss) <= 1e-6, (step, resumed[step], loss)
    assert read_column(full, "val/loss") == pytest.approx(read_column(part, "val/loss"), abs=1e-6)
    summary = json.loads((part / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["wandb_run_id"] == sidecar["wandb_run_id"]
    assert {p.name.split("-")[-1] for p in (part / "wandb").glob("offline-run-*")} == {sidecar["wandb_run_id"]}


def test_sigkill_right_after_a_checkpoint_loses_no_row_and_leaves_no_temp_file(tmp_path, uninterrupted):
    """Issue 11 item 2: a kill -9 just after `last.json` appears used to lose the step's validation row (and once
    the train row before it) for good, and a half-written `.last.safetensors.tmp-*` stayed behind."""
    steps, full = STEPS, uninterrupted
    run_train(tmp_path / "b", *steps, "faults.sigkill_after_checkpoint_at_step=10", expect_rc=-9)
    (part,) = run_dirs(tmp_path / "b")
    assert read_column(part, "val/loss").keys() == {5, 10}  # the row of the checkpointed step is on disk
    stale = part / "checkpoints" / ".last.safetensors.tmp-deadbeef"  # as a kill in the middle of a save leaves
    stale.write_bytes(b"\0" * 1024)
    run_train(tmp_path / "b", *steps, f"resume={part}")
    assert not stale.exists()
    for column in ("train/loss", "val/loss", "val/bpb"):
        reference, resumed = read_column(full, column), read_column(part, column)
        assert sorted(resumed) == sorted(reference), column
        assert resumed == pytest.approx(reference, abs=1e-6), column


def test_nan_messages_state_only_what_is_true(tmp_path):
    """Issue 11 item 4: the NaN message promised a checkpoint that did not exist and suggested the precision the
    run already had."""
    proc = run_train(tmp_path / "a", "faults.nan_at_step=13", "callbacks.checkpoint.every_n_steps=10",
                     expect_rc=1)
    out = proc.stderr + proc.stdout
    assert "step 13" in out and "non-finite" in out and re.search(r"\((rwkv|mamba)\)", out), out[-2000:]
    assert "the last good checkpoint is kept: groundthink-train resume=" in out
    assert "trainer.precision" not in out  # the run was fp32 already
    (run,) = run_dirs(tmp_path / "a")
    assert json.loads((run / "summary.json").read_text())["status"] == "failed"
    assert json.loads((run / "checkpoints/last.json").read_text())["step"] == 10
    from groundthink.training.checkpoint import load_checkpoint

    tensors, _ = load_checkpoint(run / "checkpoints/last.safetensors")
    assert all(bool(t.isfinite().all()) for t in tensors.values() if t.is_floating_point())

    proc = run_train(tmp_path / "b", "optim.lr=1e6", "optim.warmup_steps=0", "logger=csv", expect_rc=1)
    out = proc.stderr + proc.stdout
    assert "step 2:" in out and "blocks.0." in out  # step 1's update with lr 1e6 makes step 2's loss NaN
    assert "resume   not possible: no checkpoint was written" in out
    assert "checkpoint is kept" not in out and "resume=" not in out and "trainer.precision" not in out


def test_bad_input_fails_before_training_naming_it_and_leaves_no_run_folder(tmp_path):
    """Issue 11 items 5, 7, 9: a wrong type gave a traceback and an orphan folder; a corpus too small to fill a
    batch trained on nothing; a mistyped resume= path created that folder."""
    cases = {
        "type": (["trainer.max_steps=abc"], ["trainer.max_steps", "abc", "Integer"]),
        "value": (["model.alpha=1.5"], ["ModelConfig.alpha=1.5", "[0, 1]"]),
        "key": (["model.alpah=0.5"], ["model.alpah", "Did you mean: model.alpha"]),
        "missing": (["data=file", f"data.path={tmp_path / 'nope.txt'}"], ["nope.txt"]),
        "tiny corpus": (["data=file", f"data.path={tmp_path / 't.txt'}"], ["tokens, fewer than one batch needs"]),
        "resume": ([f"resume={tmp_path / 'no' / 'such' / 'run'}"], ["does not exist", "nothing was created"]),
        "early stop": (["callbacks.early_stop.metric=acc"], ["early_stop.metric='acc' is not a validation metric"]),
        "persona": (["data=persona", "data.role=narrator"], ["data.role=narrator: persona or system"]),
        "compile ops": (["trainer.compile_ops=true"], ["trainer.compile_ops=true", "set trainer.compile=true"]),
    }
    (tmp_path / "t.txt").write_text("hello world\n")
    for name, (overrides, words) in cases.items():
        root = tmp_path / name.replace(" ", "_")
        proc = run_train(root, *overrides, expect_rc=1)
        for word in words:
            assert word in proc.stderr, (name, word, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, (name, proc.stderr[-3000:])
        if name != "key":  # a required key (data.path of data=file) is not an unknown one
            assert "Unknown config key" not in proc.stderr, (name, proc.stderr[-2000:])
        assert not (root / "outputs" / "default").exists() or not run_dirs(root), name
    assert not (tmp_path / "no").exists()


def test_unwritable_output_folders_are_clear_errors(tmp_path):
    env = cli_env(tmp_path, GROUNDTHINK_OUTPUT_ROOT="/proc/groundthink-cannot-write-here")
    proc = run_cli(tmp_path, "groundthink.train", "debug=fast", env=env, expect_rc=1)
    assert "groundthink-cannot-write-here" in proc.stderr and "paths.output_root" in proc.stderr
    proc = run_cli(tmp_path, "groundthink.train", "debug=fast", "hydra.run.dir=/proc/nope/run", expect_rc=1)
    assert "/proc/nope/run" in proc.stderr and "hydra.run.dir" in proc.stderr and "Traceback" not in proc.stderr


def test_tampered_checkpoint_is_detected_on_resume(tmp_path):
    run_train(tmp_path, "trainer.max_steps=20")
    (run,) = run_dirs(tmp_path)
    last = run / "checkpoints" / "last.safetensors"  # a hard link to step_0000020: both are damaged
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with open(last, "r+b") as f:
        f.write(data)
    proc = run_train(tmp_path, "trainer.max_steps=30", f"resume={run}")
    assert "last.safetensors" in proc.stdout + proc.stderr  # says which file was skipped
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 30


def test_a_full_disk_stops_cleanly_and_keeps_the_logged_rows(tmp_path):
    """Issue 11 'Also': with files capped at 1 MB (a disk that fills) the first checkpoint cannot be written; the run
    stops with a clear message and metrics.csv keeps every row logged up to that step."""
    def cap_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    root = tmp_path
    root.mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "groundthink.train", "debug=fast", "trainer.num_threads=1",
                           "logger=csv", "trainer.log_every_n_steps=1"], cwd=root, env=cli_env(root),
                          capture_output=True, text=True, timeout=600, preexec_fn=cap_file_size)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "could not write checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    (run,) = run_dirs(root)
    assert sorted(read_column(run)) == list(range(1, 11)) and 10 in read_column(run, "val/loss")
    assert json.loads((run / "summary.json").read_text())["status"] == "failed"


def test_a_smoke_run_of_g3_says_its_verdict_is_not_meaningful(tmp_path):
    """Issue 11 item 8: the README's `gate=g3 debug=fast` smoke path used to FAIL by design."""
    proc = run_train(tmp_path, "gate=g3", "logger=csv", "callbacks.progress_bar=false")
    assert "G3: SMOKE" in proc.stdout and "20 of the 1000 steps" in proc.stdout
    (run,) = run_dirs(tmp_path)
    assert json.loads((run / "gates.json").read_text())["verdict"] == "SMOKE"


def test_printed_resume_command_works_pasted_into_a_shell(tmp_path):
    """Issue 11 item 1: a sweep job's folder name (`0_model.gamma_init=0.01,...`) broke Hydra's parser."""
    proc = run_train(tmp_path, "-m", "model.gamma_init=0.01,1.0", "trainer.max_steps=6", "logger=csv",
                     "callbacks.progress_bar=false")
    commands = re.findall(r"^resume +(groundthink-train \S+ \S+)", proc.stdout, flags=re.M)
    assert len(commands) == 2, proc.stdout[-3000:]
    assert "=" in commands[0].split("resume=", 1)[1].split()[0]  # the folder name holds '=' and ','
    assert commands[0].endswith("trainer.max_steps=12")
    pasted = commands[0].replace("groundthink-train", f"{shlex.quote(sys.executable)} -m groundthink.train", 1)
    done = subprocess.run(["bash", "-c", pasted], cwd=tmp_path, env=cli_env(tmp_path), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    job = Path(shlex.split(commands[0])[1].split("=", 1)[1])
    job = job if job.is_absolute() else tmp_path / job
    assert json.loads((job / "summary.json").read_text())["step"] == 12
    assert os.path.isdir(job)



def test_resuming_a_finished_run_changes_nothing_and_says_how_to_train_it_longer(tmp_path):
    """`resume=` of a run already at trainer.max_steps used to start W&B and Lightning, train nothing and rewrite
    summary.json (tokens/s and start-up None, the wall time of the empty fit): now it exits 0 with one message."""
    run_train(tmp_path, "trainer.max_steps=4", "callbacks.progress_bar=false")
    (run,) = run_dirs(tmp_path)
    files = [run / "summary.json", run / "metrics.csv", run / "checkpoints" / "last.json", run / "config.yaml"]
    before = {path: path.read_bytes() for path in files}
    wandb_before = sorted((run / "wandb").iterdir())
    proc = run_train(tmp_path, f"resume={run}")
    said = proc.stdout + proc.stderr
    assert "already at step 4 and trainer.max_steps=4: nothing to train" in said, said[-2000:]
    assert "trainer.max_steps=8" in said and "Traceback" not in said
    assert {path: path.read_bytes() for path in files} == before
    assert sorted((run / "wandb").iterdir()) == wandb_before


def test_resume_takes_field_overrides_of_the_runs_own_groups(tmp_path):
    """Field overrides on a resume used to be checked against the default config's groups, so a field that only the
    run's group has (data.num_kv_pairs of data=mqar) was an unknown key; the resume now composes the run's groups."""
    run_train(tmp_path, "data=mqar", "model=tiny", "trainer.max_steps=2", "logger=csv", "callbacks.progress_bar=false")
    (run,) = run_dirs(tmp_path, "default")
    run_train(tmp_path, f"resume={run}", "trainer.max_steps=3", "data.num_kv_pairs=4")
    assert json.loads((run / "summary.json").read_text())["step"] == 3
    refused = run_train(tmp_path, f"resume={run}", "data=embedded", expect_rc=1)
    assert "changes a config group" in refused.stdout + refused.stderr
