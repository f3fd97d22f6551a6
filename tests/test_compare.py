"""groundthink-compare on synthetic run folders laid out exactly as the train entry point writes them.

A Hydra multirun sweep: a 2x2 grid (model.alpha x model.n_layers) x 2 seeds, plus a job whose summary says
failed (with a multi-line error) and a job that died before writing summary.json. The table's numbers are
checked against statistics computed here, straight from the metrics.csv files.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from groundthink.reporting.compare import main
from groundthink.reporting.runs import CompareError, discover_runs, load_runs, read_metrics_csv

ALPHAS = (0.25, 0.5)
LAYERS = (6, 12)
SEEDS = (1, 2)
LEVEL = {(0.25, 6): 2.0, (0.25, 12): 1.8, (0.5, 6): 2.3, (0.5, 12): 2.6}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


def _write_metrics(path: Path, level: float, rng: np.random.Generator, last_step: int = 550,
                   nan_from: int | None = None) -> None:
    """train/loss and throughput every 50 steps, val/* every 100 (so the last rows have empty val cells).
    The val curve dips and rises again at the end, so best != final."""
    columns = ["train/loss", "val/loss", "val/bpb", "perf/tokens_per_s"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["step", *columns])
        for step in range(0, last_step + 1, 50):
            shape = 4.0 * math.exp(-step / 150) + (0.15 if step == 500 else 0.0)
            row = {"train/loss": level + shape + rng.normal(0, 0.05),
                   "perf/tokens_per_s": 1000 + rng.normal(0, 30)}
            if step % 100 == 0:
                val = level + shape + rng.normal(0, 0.05)
                if nan_from is not None and step >= nan_from:
                    val = float("nan")
                row["val/loss"] = val
                row["val/bpb"] = val / math.log(2) / 1.1
            writer.writerow([step, *("" if c not in row else repr(float(row[c])) for c in columns)])


def _make_job(sweep: Path, num: int, alpha: float, n_layers: int, seed: int, *, status: str | None,
              error: str | None = None, rng: np.random.Generator, nan_from: int | None = None,
              gate: str | None = None) -> Path:
    job = sweep / f"{num}_model.alpha={alpha},model.n_layers={n_layers}"
    (job / ".hydra").mkdir(parents=True)
    overrides = [f"model.alpha={alpha}", f"model.n_layers={n_layers}", f"seed={seed}"]
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "config.yaml").write_text("name: ablation\n")
    config = {"name": "ablation", "seed": seed, "resume": None,
              "model": {"alpha": alpha, "n_layers": n_layers, "d_model": 64},
              "paths": {"output_root": str(sweep.parent)}, "trainer": {"max_steps": 550}}
    (job / "config.yaml").write_text(yaml.safe_dump(config))
    _write_metrics(job / "metrics.csv", LEVEL[(alpha, n_layers)], rng, nan_from=nan_from)
    if status is not None:
        summary = {"status": status, "error": error, "step": 550, "final": {}, "best": {},
                   "num_params": 1000 * n_layers + 17, "tokens_per_s": 999.0, "wall_s": 12.5,
                   "run_id": f"{num:08x}", "wandb_run_id": None}
        (job / "summary.json").write_text(json.dumps(summary, indent=2))
    if gate is not None:
        (job / "gates.json").write_text(json.dumps({"gate": "G3", "verdict": gate, "criteria": []}))
    return job


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("outputs") / "ablation-multirun" / "2026-01-01_00-00-00_0a1b2c3d"
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    rng = np.random.default_rng(0)
    num = 0
    for alpha in ALPHAS:
        for n_layers in LAYERS:
            for seed in SEEDS:
                _make_job(root, num, alpha, n_layers, seed, status="completed", rng=rng,
                          gate="PASS" if alpha == 0.25 else "FAIL")
                num += 1
    _make_job(root, num, 0.5, 12, 3, status="failed", rng=rng, nan_from=300,
              error="NonFiniteLossError: loss is nan at step 300\n  Traceback line that must not show")
    _make_job(root, num + 1, 0.25, 6, 3, status=None, rng=rng)
    return root


@pytest.fixture(scope="module")
def report(sweep: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    assert main([str(sweep), "--out", str(out)]) == 0
    return out


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _expected(sweep: Path) -> dict[tuple[str, str], dict[str, list[float]]]:
    """Per cell: final/best val/loss and val/bpb from metrics.csv and tokens/s from summary.json, per completed
    seed."""
    out: dict[tuple[str, str], dict[str, list[float]]] = {}
    for job in sorted(sweep.iterdir()):
        if not job.is_dir() or not (job / "summary.json").exists():
            continue
        if json.loads((job / "summary.json").read_text())["status"] != "completed":
            continue
        ov = dict(o.split("=", 1) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))
        with open(job / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        cell = out.setdefault((ov["model.alpha"], ov["model.n_layers"]), {})
        for metric in ("val/loss", "val/bpb"):
            values = [float(r[metric]) for r in rows if r[metric] != ""]
            cell.setdefault(f"final_{metric}", []).append(values[-1])
            cell.setdefault(f"best_{metric}", []).append(min(values))
        # One throughput definition: the run's own summary figure (what its closing line printed).
        cell.setdefault("tokens_per_s", []).append(json.loads((job / "summary.json").read_text())["tokens_per_s"])
    return out


def test_discovers_every_job_and_skips_hidden_folders(sweep: Path) -> None:
    found = discover_runs(sweep)
    assert len(found) == len(ALPHAS) * len(LAYERS) * len(SEEDS) + 2
    assert all(".hydra" not in p.parts for p in found)


def test_cells_equal_statistics_from_metrics_csv(sweep: Path, report: Path) -> None:
    rows = {(r["model.alpha"], r["model.n_layers"]): r for r in _read_csv(report / "cells.csv")}
    expected = _expected(sweep)
    assert set(rows) == set(expected) and len(rows) == 4
    for key, exp in expected.items():
        row = rows[key]
        assert int(row["n_completed"]) == 2
        for name, values in exp.items():
            col = name.replace("/", "_")
            assert float(row[f"{col}_mean"]) == pytest.approx(statistics.mean(values), rel=1e-12, abs=0)
            assert float(row[f"{col}_std"]) == pytest.approx(statistics.stdev(values), rel=1e-12, abs=0)
        # final != best: the val curve rises at its last point
        assert float(row["final_val_loss_mean"]) > float(row["best_val_loss_mean"])
    assert float(rows[("0.25", "12")]["num_params"]) == 12017
    assert rows[("0.25", "6")]["gates_pass"] == "2" and rows[("0.5", "6")]["gates_fail"] == "2"


def test_markdown_table_shows_the_same_numbers(sweep: Path, report: Path) -> None:
    md = (report / "report.md").read_text()
    for (alpha, n_layers), exp in _expected(sweep).items():
        label = f"model.alpha={alpha},model.n_layers={n_layers}"
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {label} |"))
        v = exp["final_val/loss"]
        assert f"{statistics.mean(v):.4f} ± {statistics.stdev(v):.4f}" in line
    assert "Common to every run" not in md  # every override key varies; name is constant config
    assert "groundthink-compare " in md and "within 20%" in md


def test_failed_jobs_show_as_failed(report: Path) -> None:
    cells = {r["cell"]: r for r in _read_csv(report / "cells.csv")}
    failed_cell = cells["model.alpha=0.5,model.n_layers=12"]
    assert failed_cell["n_failed"] == "1" and failed_cell["n_completed"] == "2"
    assert failed_cell["errors"] == "NonFiniteLossError: loss is nan at step 300"
    assert failed_cell["status"] == "2 completed, 1 failed"
    dead_cell = cells["model.alpha=0.25,model.n_layers=6"]
    assert dead_cell["n_failed"] == "1" and "no summary.json" in dead_cell["errors"]
    runs = _read_csv(report / "runs.csv")
    failed = [r for r in runs if r["status"] == "failed"]
    assert {r["run"] for r in failed} == {"8_model.alpha=0.5,model.n_layers=12",
                                          "9_model.alpha=0.25,model.n_layers=6"}
    md = (report / "report.md").read_text()
    assert "## Failed runs" in md and "NonFiniteLossError: loss is nan at step 300" in md
    assert "Traceback line that must not show" not in md
    # the failed seed's nan does not leak into the cell's statistics
    assert math.isfinite(float(failed_cell["final_val_loss_mean"]))


def test_plots_are_valid_pngs(report: Path) -> None:
    import matplotlib.image

    for name in ("val_loss.png", "axis_model.alpha.png", "axis_model.n_layers.png"):
        path = report / name
        assert path.read_bytes()[:8] == PNG_MAGIC, name
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert f"]({name})" in (report / "report.md").read_text()


def test_baseline_rule(report: Path, sweep: Path, tmp_path: Path) -> None:
    rows = {r["cell"]: r for r in _read_csv(report / "cells.csv")}
    base = rows["model.alpha=0.25,model.n_layers=6"]
    assert base["baseline_verdict"] == "baseline" and float(base["ratio_to_baseline"]) == 1.0
    base_mean = float(base["final_val_loss_mean"])
    verdicts = {}
    for label, r in rows.items():
        ratio = float(r["final_val_loss_mean"]) / base_mean
        assert float(r["ratio_to_baseline"]) == pytest.approx(ratio, rel=1e-12)
        if label != "model.alpha=0.25,model.n_layers=6":
            assert r["baseline_verdict"] == ("PASS" if ratio <= 1.2 else "FAIL")
        verdicts[label] = r["baseline_verdict"]
    assert verdicts["model.alpha=0.5,model.n_layers=12"] == "FAIL"  # ~1.3x
    assert verdicts["model.alpha=0.5,model.n_layers=6"] == "PASS"  # ~1.15x
    assert verdicts["model.alpha=0.25,model.n_layers=12"] == "PASS"  # better than baseline

    out = tmp_path / "strict"
    assert main([str(sweep), "--out", str(out), "--within", "10", "--no-plots",
                 "--baseline", "model.n_layers=12 model.alpha=0.5"]) == 0
    rows = {r["cell"]: r for r in _read_csv(out / "cells.csv")}
    assert rows["model.alpha=0.5,model.n_layers=12"]["baseline_verdict"] == "baseline"
    others = [c for c in rows if c != "model.alpha=0.5,model.n_layers=12"]
    assert all(rows[c]["baseline_verdict"] == "PASS" for c in others)
    assert main([str(sweep), "--out", str(out), "--no-plots", "--within", "10",
                 "--baseline", "model.alpha=0.25,model.n_layers=12"]) == 0
    rows = {r["cell"]: r for r in _read_csv(out / "cells.csv")}
    assert rows["model.alpha=0.5,model.n_layers=6"]["baseline_verdict"] == "FAIL"  # ~1.28x of 1.8


def test_baseline_errors(sweep: Path, tmp_path: Path, capsys) -> None:
    assert main([str(sweep), "--out", str(tmp_path), "--no-plots", "--baseline", "model.alpha=0.5"]) == 2
    assert "matches 2 cells" in capsys.readouterr().err
    assert main([str(sweep), "--out", str(tmp_path), "--no-plots", "--baseline", "model.alpha=9"]) == 2
    assert "matches no cell" in capsys.readouterr().err


def test_no_runs_and_unreadable_metrics(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    assert main([str(empty)]) == 2
    err = capsys.readouterr().err
    assert f"no runs found under {empty}" in err and "config.yaml" in err
    assert main([str(tmp_path / "missing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err

    bad = tmp_path / "bad.csv"
    bad.write_text("step,val/loss\n0,1.5\n100,oops\n")
    with pytest.raises(CompareError, match=r"line 3, column 'val/loss': 'oops' is not a number"):
        read_metrics_csv(bad)
    bad.write_text("loss\n1.0\n")
    with pytest.raises(CompareError, match="first column must be 'step'"):
        read_metrics_csv(bad)

    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 1\n")
    (run / "summary.json").write_text(json.dumps({"status": "completed", "error": None}))
    (run / "metrics.csv").write_text("step,val/loss\n0,x\n")
    assert main([str(tmp_path / "runs"), "--no-plots"]) == 0
    captured = capsys.readouterr()
    assert "metrics.csv" in captured.err and "reported as failed" in captured.err
    row = _read_csv(tmp_path / "runs" / "report" / "runs.csv")[0]
    assert row["status"] == "failed" and "'x' is not a number" in row["error"]


def test_config_diff_groups_runs_without_overrides(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for i, (alpha, seed) in enumerate([(0.1, 1), (0.1, 2), (0.2, 1), (0.2, 2)]):
        run = tmp_path / f"2026-01-01_00-00-0{i}_{i:08x}"
        run.mkdir()
        config = {"seed": seed, "model": {"alpha": alpha}, "paths": {"output_root": f"/tmp/x{i}"}}
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        (run / "summary.json").write_text(json.dumps({"status": "completed", "error": None, "num_params": 5}))
        _write_metrics(run / "metrics.csv", 2.0 + alpha, rng)
    out = tmp_path / "rep"
    assert main([str(tmp_path), "--out", str(out), "--no-plots"]) == 0
    rows = _read_csv(out / "cells.csv")
    assert [r["cell"] for r in rows] == ["model.alpha=0.1", "model.alpha=0.2"]
    assert all(r["n_completed"] == "2" for r in rows)


def test_module_cli_subprocess(sweep: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "groundthink.reporting.compare", str(sweep),
                           "--out", str(out), "--no-plots"],
                          capture_output=True, text=True, env=env, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert f"report: {out / 'report.md'}" in proc.stdout
    assert (out / "report.md").exists() and (out / "runs.csv").exists()
    assert "matplotlib" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "groundthink.reporting.compare", str(tmp_path / "nothing")],
                          capture_output=True, text=True, env=env, timeout=60, cwd=REPO)
    assert proc.returncode == 2 and "no such file or folder" in proc.stderr


def test_curves_of_one_point_are_drawn_with_markers_and_an_empty_plot_is_not_written(tmp_path: Path) -> None:
    """Issue 11 item 3: one validation point per run was drawn as a line without markers: a blank plot."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from groundthink.reporting.cells import group_cells
    from groundthink.reporting.plots import plot_val_loss

    sweep = tmp_path / "short-multirun" / "2026-01-01_00-00-00_0a1b2c3d"
    rng = np.random.default_rng(0)
    for num, alpha in enumerate((0.25, 0.5)):
        job = _make_job(sweep, num, alpha, 6, 1, status="completed", rng=rng)
        (job / "metrics.csv").write_text("step,train/loss,val/loss\n5,3.0,\n10,2.5,2.75\n")
    cells, _ = group_cells(load_runs([sweep]))
    drawn = []
    real_savefig = Figure.savefig

    def capture(fig, *args, **kwargs):
        drawn.extend(fig.axes[0].lines)
        return real_savefig(fig, *args, **kwargs)

    Figure.savefig = capture
    try:
        assert plot_val_loss(cells, tmp_path / "val_loss.png") == tmp_path / "val_loss.png"
    finally:
        Figure.savefig = real_savefig
    assert len(drawn) == 2 and all(line.get_marker() == "o" for line in drawn)
    assert plot_val_loss(cells, tmp_path / "none.png", metric="val/nothing") is None
    assert not (tmp_path / "none.png").exists()
