"""Sweep launchers on submitit (`hydra/launcher=local|slurm`, groundthink/launchers.py).

Units: the resume overrides a restarted job gets (and that Hydra parses them back to the job folder), the launcher
configs as composed from conf/ (site defaults from a `local/default.yaml`, the command line over them) down to the
submitit executor's parameters, GPU slots, bad settings, a job that dies without a result.
Real command lines (slow):
- `groundthink-train -m hydra/launcher=local` runs a 4-job sweep 2 at a time with one failing cell; the others
  complete, the sweep exits non-zero, every job has its folder / W&B run / summary in one sweep folder laid out as
  with the basic launcher (same folder name, same losses as the basic launcher's job), and groundthink-compare
  reads it unchanged;
- the same sweep (a G1 gate run per job) read by `groundthink-gate matrix`;
- preemption: SIGUSR2 to a running job (submitit's timeout/preemption signal) -> the checkpoint hook requeues it
  with resume=<job folder> -> it continues from its last checkpoint to the same losses as an uninterrupted run;
- `hydra/launcher=slurm` with a stand-in `sbatch` that keeps the script it is given: the #SBATCH lines carry the
  partition / account / GPUs / nodes / time / memory / array parallelism from the command line and site defaults.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = str(REPO / "conf")
QUICK = ["model=tiny", "debug=fast", "trainer.num_threads=1", "trainer.max_steps=16", "trainer.val_every_n_steps=8",
         "trainer.log_every_n_steps=2", "callbacks.checkpoint.every_n_steps=4", "logger=wandb", "gate=g1"]


# ----- units -----------------------------------------------------------------------------------------------------
def _checkpoint(run_dir: Path, step: int) -> Path:
    import torch

    from groundthink.training.checkpoint import save_checkpoint

    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(folder, f"step_{step:07d}", {"w": torch.ones(3)}, {"step": step})


def test_resume_overrides_point_at_the_job_folder_only_when_a_checkpoint_verifies(tmp_path):
    from datetime import datetime

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from groundthink.launchers import RESUME_SUBDIR_PREFIX, resume_overrides

    job = tmp_path / "sweep" / "0_model.alpha=0.5,seed=1 it's"  # '=', ',' and a quote, as job folder names have
    job.mkdir(parents=True)
    base = ["model.alpha=0.5", "seed=1"]
    assert resume_overrides(job, base) == base  # a fresh job: nothing to resume
    ckpt = _checkpoint(job, 4)
    ckpt.write_bytes(ckpt.read_bytes()[:-5])  # truncated: `resume=` would refuse it, so no resume either
    assert resume_overrides(job, base) == base
    _checkpoint(job, 8)
    now = datetime(2026, 12, 1, 7, 0, 0)
    out = resume_overrides(job, base + ["resume=/somewhere/else", "hydra.output_subdir=.hydra/resume-old"], now)
    assert out[:2] == base and len(out) == 4  # an earlier resume is replaced, not repeated
    assert out[3] == f"hydra.output_subdir={RESUME_SUBDIR_PREFIX}2026-12-01_07-00-00"
    parsed = OverridesParser.create().parse_overrides([out[2]])[0]
    assert parsed.key_or_group == "resume" and parsed.value() == str(job)


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    import groundthink.train  # noqa: F401 - registers the resolvers conf/ uses

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def _launcher(overrides: list[str]):
    from hydra.utils import instantiate

    return instantiate(_compose(overrides).hydra.launcher)


@pytest.fixture()
def fake_srun(tmp_path, monkeypatch):
    """Stand-ins for SLURM's commands: the launcher checks for them before anything else."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("srun", "sbatch"):
        (bin_dir / name).write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_slurm_launcher_without_slurm_says_so(monkeypatch, tmp_path):
    from groundthink.launchers import LauncherConfigError

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LauncherConfigError, match="not on PATH here.*hydra/launcher=local"):
        _launcher(["hydra/launcher=slurm"]).make_executor()


def test_slurm_config_reaches_submitit_with_site_defaults_under_the_command_line(tmp_path, fake_srun):
    site = tmp_path / "site"
    (site / "local").mkdir(parents=True)
    (site / "local" / "default.yaml").write_text(yaml.safe_dump(
        {"slurm": {"partition": "site-gpu", "account": "site-lab", "mem_gb": 32, "qos": "high",
                   "setup": ["module load cuda"]}}))
    launcher = _launcher([f"hydra.searchpath=[file://{site}]", "hydra/launcher=slurm", "hydra.launcher.account=cli-lab",
                          "hydra.launcher.gpus_per_node=4", "hydra.launcher.nodes=2", "hydra.launcher.timeout_min=90",
                          "hydra.launcher.array_parallelism=3", "name=probe"])
    params = launcher.make_executor().parameters
    assert params["partition"] == "site-gpu" and params["qos"] == "high"  # from the site file
    assert params["account"] == "cli-lab"  # the command line wins over the site file
    assert params["gpus_per_node"] == 4 and params["nodes"] == 2 and params["time"] == 90
    assert params["mem"] == "32GB" and params["array_parallelism"] == 3
    assert params["setup"] == ["module load cuda"] and params["job_name"] == "gt-probe"
    assert params["signal_delay_s"] == 120  # submitit's USR2 warning before the time limit
    # Without a site file the defaults of conf/hydra/launcher/slurm.yaml apply and nothing is left unresolved.
    params = _launcher(["hydra/launcher=slurm"]).make_executor().parameters
    assert "partition" not in params and "account" not in params and params["gpus_per_node"] == 1
    assert params["time"] == 1440 and params["mem"] == "64GB"


def test_local_launcher_settings_and_gpu_slots():
    from groundthink.launchers import LauncherConfigError

    launcher = _launcher(["hydra/launcher=local"])
    assert launcher.max_parallel() == 2 and launcher.gpu_slots() == [[], []]
    assert launcher.params["timeout_min"] >= 7 * 24 * 60  # submitit's default of 60 would stop real runs

    def with_params(**changes):
        return type(launcher)(**{**launcher.params, **changes})

    assert with_params(max_parallel=3, gpus_per_job=2).gpu_slots() == [[0, 1], [2, 3], [4, 5]]
    assert with_params(gpus_per_job=1, visible_gpus=[5, 7]).gpu_slots() == [[5], [7]]
    for changes, words in (({"max_parallel": 0}, "max_parallel=0"),
                           ({"gpus_per_job": 1, "visible_gpus": [0]}, "fewer than")):
        with pytest.raises(LauncherConfigError, match=words):
            with_params(**changes).make_executor()


def test_a_job_that_dies_without_a_result_is_a_failed_return():
    from hydra.core.utils import JobStatus

    from groundthink.launchers import job_return

    class Dead:
        job_id = "123"

        class paths:  # noqa: N801 - mimics submitit's JobPaths attribute
            stdout = "/x/123_0_log.out"

        def results(self):
            raise RuntimeError("killed by signal 9")

    ret = job_return(Dead(), ["seed=1"])
    assert ret.status == JobStatus.FAILED
    with pytest.raises(RuntimeError, match="killed by signal 9.*123_0_log.out"):
        _ = ret.return_value


# ----- real command lines ------------------------------------------------------------------------------------------
def _env(root: Path, **extra: str) -> dict[str, str]:
    return dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", HF_DATASETS_OFFLINE="1",
                GROUNDTHINK_OUTPUT_ROOT=str(root / "outputs"), **extra)


def run(root: Path, args: list[str], expect_rc: int | None = 0, **env: str) -> subprocess.CompletedProcess:
    root.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(args, cwd=root, env=_env(root, **env), capture_output=True, text=True, timeout=600)
    if expect_rc is not None and proc.returncode != expect_rc:
        raise AssertionError(f"{args[:4]} exit {proc.returncode} (expected {expect_rc})\n"
                             f"STDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}")
    return proc


def sweep_dirs(root: Path, name: str = "default") -> list[Path]:
    return sorted((root / "outputs" / f"{name}-multirun").iterdir())


def job_dirs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if (p / ".hydra").is_dir()), key=lambda p: int(p.name.split("_")[0]))


def overrides_of(job: Path) -> dict[str, str]:
    return dict(o.split("=", 1) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))


def losses(job: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    with open(job / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for key in ("train/loss", "val/loss"):
                if row.get(key):
                    out.setdefault(key, []).append((int(row["step"]), float(row[key])))
    return out


def summary(job: Path) -> dict:
    return json.loads((job / "summary.json").read_text())


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, float]:
    root = tmp_path_factory.mktemp("local")
    t0 = time.time()
    proc = run(root, [sys.executable, "-m", "groundthink.train", "-m", "hydra/launcher=local",
                      "hydra.launcher.max_parallel=2", *QUICK, "faults.raise_at_step=null,3", "seed=1,2"],
               expect_rc=None)
    return root, proc, time.time() - t0


@pytest.fixture(scope="module")
def basic_reference(tmp_path_factory) -> Path:
    """Job 0 of the same sweep under Hydra's basic launcher."""
    root = tmp_path_factory.mktemp("basic")
    run(root, [sys.executable, "-m", "groundthink.train", "-m", *QUICK, "faults.raise_at_step=null", "seed=1"])
    (sweep,) = sweep_dirs(root)
    (job,) = job_dirs(sweep)
    return job


@pytest.mark.slow
def test_local_sweep_runs_two_at_a_time_and_isolates_the_failing_cell(local_sweep):
    root, proc, _ = local_sweep
    assert proc.returncode != 0, "a failed job must make the sweep exit non-zero"
    assert "deliberate failure at step 3" in proc.stderr
    (sweep,) = sweep_dirs(root)  # every job wrote into the one sweep folder
    jobs = job_dirs(sweep)
    assert [j.name.split("_")[0] for j in jobs] == ["0", "1", "2", "3"]
    spans = []
    run_ids, wandb_ids = set(), set()
    for job in jobs:
        o, s = overrides_of(job), summary(job)
        cfg = yaml.safe_load((job / "config.yaml").read_text())
        assert cfg["seed"] == yaml.safe_load(o["seed"])
        assert cfg["faults"]["raise_at_step"] == yaml.safe_load(o["faults.raise_at_step"])
        if o["faults.raise_at_step"] == "3":
            assert s["status"] == "failed" and "deliberate failure" in s["error"]
        else:
            assert s["status"] == "completed" and s["step"] == 16
            assert (job / "checkpoints" / "last.safetensors").is_file()
        assert list((job / "wandb").glob("offline-run-*")), f"{job.name} has no W&B run"
        run_ids.add(s["run_id"])
        wandb_ids.add(s["wandb_run_id"])
        spans.append(((job / ".hydra" / "config.yaml").stat().st_mtime, (job / "summary.json").stat().st_mtime))
    assert len(run_ids) == len(wandb_ids) == 4
    # Two at a time: at some moment two jobs ran together, never three.
    moments = sorted(t for span in spans for t in span)
    overlap = max(sum(start <= t < end for start, end in spans) for t in moments)
    assert overlap == 2, f"job spans {spans}"
    assert "sweep finished: 2 completed, 2 failed" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_local_sweep_layout_and_losses_match_the_basic_launcher(local_sweep, basic_reference):
    root, _, _ = local_sweep
    (sweep,) = sweep_dirs(root)
    job = job_dirs(sweep)[0]
    assert overrides_of(job) == overrides_of(basic_reference)
    assert job.name == basic_reference.name  # the same folder name for the same overrides
    assert losses(job) == losses(basic_reference)  # the same run, bit for bit on CPU
    assert set(summary(job)) == set(summary(basic_reference))
    listing = {p.name for p in job.iterdir()}
    assert listing == {p.name for p in basic_reference.iterdir()}


@pytest.mark.slow
def test_compare_reads_the_local_sweep_unchanged(local_sweep):
    root, _, _ = local_sweep
    (sweep,) = sweep_dirs(root)
    out = sweep / "report"
    run(sweep, [sys.executable, "-m", "groundthink.reporting.compare", str(sweep), "--out", str(out), "--no-plots"])
    with open(out / "cells.csv") as f:
        cells = {r["faults.raise_at_step"]: r for r in csv.DictReader(f)}
    assert set(cells) == {"null", "3"}
    assert cells["null"]["n_completed"] == "2" and cells["null"]["n_failed"] == "0"
    assert cells["3"]["n_failed"] == "2"
    finals = [losses(j)["val/loss"][-1][1] for j in job_dirs(sweep)
              if overrides_of(j)["faults.raise_at_step"] == "null"]
    assert float(cells["null"]["final_val_loss_mean"]) == pytest.approx(statistics.mean(finals), rel=1e-9)


@pytest.mark.slow
def test_gate_matrix_reads_the_local_sweep_unchanged(local_sweep):
    root, _, _ = local_sweep
    (sweep,) = sweep_dirs(root)
    out = sweep / "matrix"
    proc = run(sweep, [sys.executable, "-m", "groundthink.gates.cli", "matrix", str(sweep), "--out", str(out)],
               expect_rc=None)
    rows = {r["job"]: r for r in json.loads((out / "gate_matrix.json").read_text())}
    jobs = job_dirs(sweep)
    assert set(rows) == {j.name for j in jobs}
    for job in jobs:  # every job judged its own gate (G1) and the matrix shows that verdict
        verdict = json.loads((job / "gates.json").read_text())["verdict"]
        assert rows[job.name]["verdict"] == verdict and rows[job.name]["status"] == summary(job)["status"]
    assert proc.returncode == (0 if all(r["verdict"] == "PASS" for r in rows.values()) else 1)


def _task_pids(marker: str) -> list[int]:
    """Processes running a submitit job whose command line mentions `marker` (the test's own folder)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"submitit.core._submit" in argv and any(marker.encode() in a for a in argv):
                pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_preempted_job_requeues_and_resumes_from_its_last_checkpoint(tmp_path, local_sweep):
    # The console script, as users run it: resolvers then travel by reference, which is what needs the pinned
    # sweep folder (see groundthink/launchers.py).
    script = Path(sys.executable).with_name("groundthink-train")
    args = [str(script), "-m", "hydra/launcher=local", *QUICK, "faults.raise_at_step=null", "seed=1"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    signalled = []
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if not signalled and list(tmp_path.glob("outputs/*/*/*/checkpoints/step_0000004.safetensors")):
            signalled = _task_pids(str(tmp_path))
            for pid in signalled:
                # USR2 is what SLURM sends (--signal=USR2@...) before a timeout or preemption. Stopped first, so that
                # however busy the machine, the job is still mid-run when the signal lands.
                os.kill(pid, signal.SIGSTOP)
                os.kill(pid, signal.SIGUSR2)
                os.kill(pid, signal.SIGCONT)
        time.sleep(0.05)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-4000:]
    assert len(signalled) == 1
    (sweep,) = sweep_dirs(tmp_path)
    (job,) = job_dirs(sweep)
    log = "".join(p.read_text() for p in sorted(sweep.glob(".submitit/*/*_log.*")))
    assert "Calling checkpoint method" in log and "Requeued job" in log
    assert "restarts from its last checkpoint" in log
    assert [p.name for p in (job / ".hydra").glob("resume-*")], "the restart's Hydra record is missing"
    assert "resume" not in overrides_of(job)  # the job's own record is unchanged
    s = summary(job)
    assert s["status"] == "completed" and s["step"] == 16
    starts = [line.split()[2].rstrip(":") for line in log.splitlines() if line.startswith("GroundThink run ")]
    assert starts == [s["run_id"], s["run_id"]], starts  # started twice, as the same run (its id kept on resume)
    reference = losses(next(j for j in job_dirs(sweep_dirs(local_sweep[0])[0]) if overrides_of(j) == overrides_of(job)))
    got = losses(job)
    # Every logged value equals the uninterrupted run's at that step, and every step after the restart is there.
    # (A row logged just before the checkpoint the job resumed from can be missing: metrics.csv rows are written
    # after the checkpoint of their step, the order issue 11 fixes in the training entry point.)
    resumed_from = int(re.search(r"restarts from its last checkpoint \S+ \(step (\d+)\)", log).group(1))
    assert resumed_from >= 4
    for key, series in reference.items():
        assert set(got[key]) <= set(series)
        assert [x for x in series if x[0] > resumed_from] == [x for x in got[key] if x[0] > resumed_from]


@pytest.mark.slow
def test_slurm_launcher_writes_the_expected_sbatch_script(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "sbatch").write_text('#!/bin/sh\ncp "$1" "$GT_SBATCH_CAPTURE"\n'
                                    'echo "sbatch: error: test stand-in, nothing submitted" >&2\nexit 1\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    site = tmp_path / "site"
    (site / "local").mkdir(parents=True)
    (site / "local" / "default.yaml").write_text(yaml.safe_dump(
        {"slurm": {"partition": "site-gpu", "account": "site-lab", "mem_gb": 32,
                   "setup": ["source /opt/groundthink/.venv/bin/activate"]}}))
    captured = tmp_path / "captured.sh"
    proc = run(tmp_path, [sys.executable, "-m", "groundthink.train", "-m", f"hydra.searchpath=[file://{site}]",
                          "hydra/launcher=slurm", "hydra.launcher.account=cli-lab", "hydra.launcher.gpus_per_node=2",
                          "hydra.launcher.nodes=1", "hydra.launcher.timeout_min=90",
                          "hydra.launcher.array_parallelism=2", "model=tiny", "seed=1,2,3"],
               expect_rc=None, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", GT_SBATCH_CAPTURE=str(captured))
    assert proc.returncode != 0 and "test stand-in" in proc.stderr
    flags = {line.split("=", 1)[0][len("#SBATCH "):]: line.split("=", 1)[1]
             for line in captured.read_text().splitlines() if line.startswith("#SBATCH")}
    assert flags["--partition"] == "site-gpu" and flags["--account"] == "cli-lab" and flags["--mem"] == "32GB"
    assert flags["--gpus-per-node"] == "2" and flags["--nodes"] == "1" and flags["--time"] == "90"
    assert flags["--array"] == "0-2%2" and flags["--signal"] == "USR2@120" and flags["--job-name"] == "gt-default"
    assert "source /opt/groundthink/.venv/bin/activate" in captured.read_text()
    # The pickled jobs carry the launcher with the sweep folder resolved in the launching process.
    from submitit.core.utils import DelayedSubmission

    (sweep,) = sweep_dirs(tmp_path)
    jobs = [DelayedSubmission.load(p) for p in sorted(sweep.glob(".submitit/*.pkl"))]
    assert sorted(dict(o.split("=", 1) for o in d.args[0])["seed"] for d in jobs) == ["1", "2", "3"]
    assert {Path(d.function.sweep_dir).resolve() for d in jobs} == {sweep.resolve()}
    assert all(hasattr(d.function, "checkpoint") for d in jobs)
