"""Ablation sweeps through the real command lines: `groundthink-train -m` (Hydra multirun + Lightning + W&B offline)
and `groundthink-compare` on what it wrote.

- a tiny 2x2 grid (model.gamma_init x model.state_norm) x 2 seeds; the report's numbers equal the runs' metrics.csv;
- a sweep with a job that raises: the other job still runs, the sweep exits non-zero, the report shows it failed;
- 2-process DDP (`trainer=ddp`, ddp_spawn) inside `-m`: each job trained exactly the config it was given, one sweep
  folder only, and each W&B run is grouped by sweep with its overrides as tags and finished (read from the run's own
  files: summary.json's `wandb` record and W&B's log in the run's offline folder);
- a sweep's printed per-job start-up time is the job's own, not the time since the sweep began;
- the parameter-matched mix cells stay within ±5% of their base preset.
"""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUICK = ["model=tiny", "debug=fast", "trainer.num_threads=1", "trainer.max_steps=8", "trainer.val_every_n_steps=4",
         "trainer.log_every_n_steps=2", "callbacks.checkpoint.every_n_steps=100"]
GAMMAS, NORMS, SEEDS = ("0.01", "1.0"), ("false", "true"), ("1", "2")


def sweep_dir(root: Path, name: str = "default") -> Path:
    (sweep,) = sorted((root / "outputs" / f"{name}-multirun").iterdir())
    return sweep


def job_dirs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if (p / ".hydra").is_dir()), key=lambda p: int(p.name.split("_")[0]))


def job_overrides(job: Path) -> dict[str, str]:
    return dict(item.split("=", 1) for item in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))


def metrics(job: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    with open(job / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key != "step" and value not in ("", None):
                    series.setdefault(key, []).append((int(row["step"]), float(value)))
    return series


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("grid")
    run_cli(root, "groundthink.train", "-m", *QUICK, "logger=csv", f"model.gamma_init={','.join(GAMMAS)}",
            f"model.state_norm={','.join(NORMS)}", f"seed={','.join(SEEDS)}")
    return sweep_dir(root)


@pytest.fixture(scope="module")
def grid_report(grid: Path) -> Path:
    out = grid / "report"
    run_cli(grid, "groundthink.reporting.compare", str(grid), "--out", str(out),
            "--baseline", "model.gamma_init=0.01,model.state_norm=false")
    return out


def test_grid_runs_every_job_with_its_own_config(grid: Path) -> None:
    jobs = job_dirs(grid)
    assert len(jobs) == len(GAMMAS) * len(NORMS) * len(SEEDS)
    seen = set()
    for job in jobs:
        o = job_overrides(job)
        cfg = yaml.safe_load((job / "config.yaml").read_text())
        assert str(cfg["model"]["gamma_init"]) == o["model.gamma_init"]
        assert str(cfg["model"]["state_norm"]).lower() == o["model.state_norm"].lower()
        assert str(cfg["seed"]) == o["seed"]
        summary = json.loads((job / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["step"] == 8
        seen.add((o["model.gamma_init"], o["model.state_norm"], o["seed"]))
    assert len(seen) == len(jobs)
    summaries = [json.loads((j / "summary.json").read_text()) for j in jobs]
    assert len({s["run_id"] for s in summaries}) == len(jobs)
    # Issue 11 item 6: each job's start-up is measured from its own start, so it does not grow job by job (it
    # used to count from the sweep's start: 5.3 -> 12.5 -> 19.5 -> 26.8 s).
    last = summaries[-1]
    assert last["startup_s"] < summaries[0]["startup_s"] + sum(s["wall_s"] for s in summaries[:-1]), summaries


def test_compare_table_equals_metrics_csv(grid: Path, grid_report: Path) -> None:
    by_cell: dict[tuple[str, str], dict[str, list[float]]] = {}
    for job in job_dirs(grid):
        o, m = job_overrides(job), metrics(job)
        cell = by_cell.setdefault((o["model.gamma_init"], o["model.state_norm"]), {})
        cell.setdefault("final_val_loss", []).append(m["val/loss"][-1][1])
        cell.setdefault("best_val_loss", []).append(min(v for _, v in m["val/loss"]))
        cell.setdefault("final_val_bpb", []).append(m["val/bpb"][-1][1])
    rows = {(r["model.gamma_init"], r["model.state_norm"]): r for r in read_csv(grid_report / "cells.csv")}
    assert set(rows) == set(by_cell)
    for key, expected in by_cell.items():
        assert rows[key]["n_completed"] == str(len(SEEDS)) and rows[key]["n_failed"] == "0"
        for column, values in expected.items():
            assert float(rows[key][f"{column}_mean"]) == pytest.approx(statistics.mean(values), rel=1e-9)
            assert float(rows[key][f"{column}_std"]) == pytest.approx(statistics.stdev(values), rel=1e-9)
    md = (grid_report / "report.md").read_text()
    for expected in by_cell.values():
        values = expected["final_val_loss"]
        assert f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}" in md
    assert rows[("0.01", "False")]["baseline_verdict"] == "baseline"  # Hydra writes swept bools as False/True


def test_compare_writes_the_plots(grid_report: Path) -> None:
    for name in ("val_loss.png", "axis_model.gamma_init.png", "axis_model.state_norm.png"):
        assert (grid_report / name).read_bytes()[:8] == PNG_MAGIC, name


def test_a_failing_job_does_not_stop_the_sweep(tmp_path: Path) -> None:
    # job 0 raises at step 3; job 1 must still run to the end; the sweep then exits non-zero.
    proc = run_cli(tmp_path, "groundthink.train", "-m", *QUICK, "faults.raise_at_step=3,null", expect_rc=None)
    assert proc.returncode != 0, "a sweep with a failed job must not exit 0"
    sweep = sweep_dir(tmp_path)
    failed, ok = (json.loads((job / "summary.json").read_text()) for job in job_dirs(sweep))
    assert failed["status"] == "failed" and ok["status"] == "completed" and ok["step"] == 8
    # Each job's W&B run is its own and is finished with the job's exit code.
    assert failed["wandb"]["exit_code"] == 1 and ok["wandb"]["exit_code"] == 0
    assert failed["wandb_run_id"] != ok["wandb_run_id"]

    out = tmp_path / "report"
    run_cli(tmp_path, "groundthink.reporting.compare", str(sweep), "--out", str(out), "--no-plots")
    cells = {r["faults.raise_at_step"]: r for r in read_csv(out / "cells.csv")}
    assert cells["3"]["n_failed"] == "1" and cells["3"]["n_completed"] == "0"
    assert "raise_at_step" in cells["3"]["errors"] or "step 3" in cells["3"]["errors"], cells["3"]["errors"]
    assert cells["null"]["n_completed"] == "1"
    assert "## Failed runs" in (out / "report.md").read_text()


def test_ddp_inside_multirun_trains_each_jobs_own_config(tmp_path: Path) -> None:
    """`trainer=ddp` (2 CPU processes, ddp_spawn) inside -m: rank 1 must not start a sweep of its own."""
    from safetensors.torch import load_file

    run_cli(tmp_path, "groundthink.train", "-m", *QUICK, "trainer=ddp", "model.gamma_init=0.01,1.0")
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["default-multirun"]
    sweep = sweep_dir(tmp_path)
    jobs = job_dirs(sweep)
    assert len(jobs) == 2
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "outputs" / "default").exists()
    for job in jobs:
        gamma = float(job_overrides(job)["model.gamma_init"])
        cfg = yaml.safe_load((job / "config.yaml").read_text())
        assert cfg["trainer"]["devices"] == 2 and cfg["trainer"]["strategy"] == "ddp_spawn"
        assert cfg["model"]["gamma_init"] == gamma
        sidecar = json.loads((job / "checkpoints" / "last.json").read_text())
        assert sidecar["config"]["model"]["gamma_init"] == gamma and sidecar["step"] == 8
        # What was trained: every block's γ is still close to this job's init after 8 small steps.
        weights = load_file(job / "checkpoints" / "last.safetensors")
        gammas = [t.float().mean().item() for k, t in weights.items() if k.endswith(".gamma")]
        assert gammas and all(abs(g - gamma) < 0.05 for g in gammas), (gamma, gammas)
        assert json.loads((job / "summary.json").read_text())["step"] == 8

        summary = json.loads((job / "summary.json").read_text())
        record = summary["wandb"]
        assert record["group"] == f"default-{sweep.name}" and record["job_type"] == "train"
        assert f"model.gamma_init={job_overrides(job)['model.gamma_init']}" in record["tags"]
        (run_folder,) = (job / "wandb").glob(f"offline-run-*-{summary['wandb_run_id']}")
        assert (run_folder / f"run-{summary['wandb_run_id']}.wandb").stat().st_size > 0
        # The W&B run lived in the spawned rank-0 process; W&B's own log there records that it was finished.
        assert f"finishing run groundthink/{summary['wandb_run_id']}" in (run_folder / "logs" / "debug.log").read_text()


def test_optuna_sweep_objective_is_each_trials_val_loss(tmp_path: Path) -> None:
    """sweeps/optuna_lr_gamma.yaml through hydra-optuna-sweeper: every trial is a normal run, and the study's best
    value is the smallest final val/loss among the trials' metrics.csv."""
    run_cli(tmp_path, "groundthink.train", "-m", "-cn", "optuna_lr_gamma", *QUICK, "logger=csv",
            "hydra.sweeper.n_trials=3")
    sweep = sweep_dir(tmp_path, "optuna_lr_gamma")
    jobs = job_dirs(sweep)
    assert len(jobs) == 3
    finals = []
    for job in jobs:
        o = job_overrides(job)
        lr, gamma = float(o["optim.lr"]), float(o["model.gamma_init"])
        assert 1e-4 <= lr <= 1e-2 and 0.003 <= gamma <= 1.0
        cfg = yaml.safe_load((job / "config.yaml").read_text())
        assert cfg["optim"]["lr"] == pytest.approx(lr) and cfg["model"]["gamma_init"] == pytest.approx(gamma)
        finals.append(metrics(job)["val/loss"][-1][1])
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(min(finals), rel=1e-6)


@pytest.mark.slow
def test_param_matched_files_are_up_to_date() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "sweeps" / "param_matched.py"), "--check"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
