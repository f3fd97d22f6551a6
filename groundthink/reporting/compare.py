"""`groundthink-compare`: a table and plots with seed statistics from run folders or a multirun sweep.

    groundthink-compare outputs/ablation_matrix-multirun/<sweep folder> [more folders...]
        [--out DIR] [--baseline LABEL_OR_KEY=VALUE,...] [--within 20] [--seed-key seed] [--no-plots]
    groundthink-compare --wandb ENTITY/PROJECT --group GROUP --out DIR

Each input is a run folder (config.yaml / summary.json / metrics.csv) or a folder searched recursively for
them (Hydra multirun job folders `<sweep>/<job_num>_<overrides>/`). Runs are grouped into cells by their
overrides without the seed keys (see groundthink/reporting/cells.py). Per cell: seeds, failures, mean ± std
over seeds of the final (last logged) and best (smallest) val/loss and val/bpb from metrics.csv, mean
tokens/s, parameters, gate verdicts, and the G3.6 baseline rule: PASS when the cell's mean final val/loss
is at most (1 + within/100) times the baseline cell's. Writes report.md, cells.csv, runs.csv, val_loss.png
and one axis_<key>.png per swept axis to --out (default <first input>/report).
"""

from __future__ import annotations

import argparse
import csv
import math
import shlex
import sys
from pathlib import Path
from typing import Any

from groundthink.reporting.cells import (
    LOSS_METRICS,
    Cell,
    apply_baseline,
    eval_keys,
    find_baseline,
    group_cells,
    select_best_of,
    varying_axes,
)
from groundthink.reporting.runs import CompareError, Run, load_runs

PROG = "groundthink-compare"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Compare GroundThink runs: a Markdown/CSV table per configuration cell with mean ± std "
                    "over seeds, a baseline check, and plots.")
    p.add_argument("paths", nargs="*", help="run folders or sweep folders (searched recursively)")
    p.add_argument("--out", help="output folder (default: <first input>/report)")
    p.add_argument("--baseline", help="baseline cell: its label as printed in the table, or key=value items "
                                      "that select one cell (default: the cell without overrides, else the "
                                      "first cell)")
    p.add_argument("--within", type=float, default=20.0,
                   help="G3.6 rule: a cell PASSes when its mean final val/loss <= baseline * "
                        "(1 + WITHIN/100) (default 20)")
    p.add_argument("--seed-key", action="append", default=None, metavar="KEY",
                   help="override key(s) that only change the seed; runs differing only in these share a "
                        "cell (repeat or comma-separate; default: seed)")
    p.add_argument("--metric", help="the metric the axis plots, the state-size plot and --best-of use (default: "
                                    "val/acc when the runs log it, e.g. data=mqar, else val/loss)")
    p.add_argument("--best-of", metavar="KEY", help="collapse the cells that differ only in KEY (e.g. optim.lr) "
                                                   "into the one with the best mean final --metric")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read the runs from W&B instead of folders")
    p.add_argument("--group", help="with --wandb: the W&B group to compare")
    return p


def _num(x: float) -> str:
    """Full precision for CSV; empty for nan."""
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else repr(float(x))


def _pm(mean: float, std: float, fmt: str = ".4f") -> str:
    if not math.isfinite(mean):
        return str(mean)
    if not math.isfinite(std):
        return format(mean, fmt)
    return f"{format(mean, fmt)} ± {format(std, fmt)}"


def _params(n: float, varies: bool) -> str:
    if not math.isfinite(n):
        return "—"
    text = f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:.0f}"
    return text + " (varies)" if varies else text


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _metric_col(key: str) -> str:
    return key.replace("/", "_")


def _seed_of(run: Run, seed_keys: tuple[str, ...]) -> str:
    for k in seed_keys:
        if run.overrides and k in run.overrides:
            return run.overrides[k]
        if run.config and k in run.config:
            return str(run.config[k])
    return ""


def _first_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0] if lines else ""


def _cell_row(cell: Cell, axes: list[str]) -> dict[str, str]:
    row = {"cell": cell.label}
    row.update({a: cell.params.get(a, "") for a in axes})
    row.update({"n_runs": str(len(cell.runs)), "n_completed": str(len(cell.completed)),
                "n_failed": str(cell.n_failed), "n_interrupted": str(cell.n_interrupted)})
    for key, value in cell.stats.items():
        if key == "num_params_varies":
            continue
        integral = key in ("gates_pass", "gates_fail") or (key == "num_params" and float(value).is_integer())
        row[_metric_col(key)] = str(int(value)) if integral else _num(value)
    if cell.best_of:
        row[f"best_{cell.best_of['key']}"] = str(cell.best_of["value"])
    row.update({"ratio_to_baseline": _num(cell.ratio), "baseline_verdict": cell.verdict,
                "status": cell.status, "errors": " | ".join(cell.errors)})
    return row


def write_cells_csv(cells: list[Cell], axes: list[str], path: Path) -> None:
    rows = [_cell_row(c, axes) for c in cells]
    fields = list(rows[0])
    fields += sorted({k for r in rows for k in r} - set(fields))  # eval columns some cells lack
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


def _parent_of(run: Run) -> str:
    """The lineage of a fine-tuned run (init_from=): its parent's run id and step, e.g. `1f62ee27@20`."""
    parent = run.summary.get("parent")
    if not isinstance(parent, dict):
        return ""
    step = parent.get("step")
    return f"{parent.get('run_id') or parent.get('checkpoint', '')}" + (f"@{step}" if step is not None else "")


def write_runs_csv(cells: list[Cell], axes: list[str], seed_keys: tuple[str, ...], path: Path) -> None:
    fields = ["run", "cell", *axes, "seed", "status", "error", "step"]
    for metric in LOSS_METRICS:
        fields += [f"final_{_metric_col(metric)}", f"best_{_metric_col(metric)}"]
    fields += ["tokens_per_s", "num_params", "wall_s", "run_id", "parent", "gate", "gate_verdict", "path"]
    evals = eval_keys([r for cell in cells for r in cell.runs])
    fields += [_metric_col(k) for k in evals]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for cell in cells:
            for r in cell.runs:
                row = {"run": r.name, "cell": cell.label, "seed": _seed_of(r, seed_keys), "status": r.status,
                       "error": _first_line(r.error) if r.failed else "", "step": r.summary.get("step", ""),
                       "tokens_per_s": _num(r.tokens_per_s()),
                       "num_params": _num(r.num_params()), "wall_s": r.summary.get("wall_s", ""),
                       "run_id": r.summary.get("run_id", ""), "parent": _parent_of(r), "gate": r.gate or "",
                       "gate_verdict": r.gate_verdict or "", "path": r.path}
                row.update({a: cell.params.get(a, "") for a in axes})
                for metric in LOSS_METRICS:
                    row[f"final_{_metric_col(metric)}"] = _num(r.final(metric))
                    row[f"best_{_metric_col(metric)}"] = _num(r.best(metric))
                row.update({_metric_col(k): _num(r.evals.get(k, math.nan)) for k in evals})
                writer.writerow(row)


def _has(cells: list[Cell], stat: str) -> bool:
    return any(math.isfinite(c.stats.get(stat, math.nan)) for c in cells)


def render_markdown(cells: list[Cell], common: dict[str, str], baseline: Cell, within: float, command: str,
                    sources: list[str], plots: list[Path], best_of: str | None = None,
                    metric: str = "val/loss") -> str:
    n_runs = sum(len(c.runs) for c in cells)
    n_failed = sum(c.n_failed for c in cells)
    limit = 1.0 + within / 100.0
    lines = [
        "# GroundThink comparison", "",
        f"Command: `{command}`", "",
        "Inputs: " + ", ".join(f"`{s}`" for s in sources), "",
        f"{n_runs} runs in {len(cells)} cells; {n_failed} failed.",
    ]
    if common:
        lines += ["", "Common to every run: " + ", ".join(f"`{k}={v}`" for k, v in sorted(common.items()))]
    if best_of:
        lines += ["", f"Best of `{best_of}`: each row is the value of `{best_of}` with the best mean final {metric} "
                      f"among the runs that differ only in it (the `best {best_of}` column; every value tried is "
                      "in runs.csv)."]
    lines += [
        "", f"Baseline: **{_md(baseline.label)}**. Rule (G3.6): a cell PASSes when its mean final val/loss "
        f"is at most {limit:g} × the baseline's (within {within:g}%); lower is always better, so the rule is "
        "one-sided. Only completed runs enter the means; failed runs are counted in their own column.",
        "",
    ]
    acc, state = _has(cells, "final_val/acc_mean"), _has(cells, "state_size")
    extra_heads = ([f"best {best_of}"] if best_of else []) + (["final val/acc", "best val/acc"] if acc else []) \
        + (["state size"] if state else [])
    heads = ["cell", "seeds ok/all", "failed", "final val/loss", "best val/loss", "final val/bpb", "best val/bpb",
             *extra_heads, "tokens/s", "params", "gates", "vs baseline", f"G3.6 (≤ {limit:g}×)", "status"]
    lines += ["| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"]
    for c in cells:
        s = c.stats
        gates = (f"{s['gates_pass']:.0f} PASS / {s['gates_fail']:.0f} FAIL"
                 if s["gates_pass"] + s["gates_fail"] else "—")
        status = c.status if not c.errors else f"{c.status}: {'; '.join(c.errors)}"

        def stat(name: str, fmt: str = ".4f", c: Cell = c) -> str:
            mean = c.stats[f"{name}_mean"]
            metric = name.split("_", 1)[1] if name.startswith(("final_", "best_")) else None
            logged = metric is None or any(metric in r.series or metric in r.summary.get("final", {})
                                           for r in c.completed)  # e.g. no val/bpb without a tokenizer
            if not c.completed or not logged or (name == "tokens_per_s" and math.isnan(mean)):  # not a NaN run
                return "—"
            return _pm(mean, c.stats[f"{name}_std"], fmt)

        extra = ([(c.best_of or {}).get("value") or "—"] if best_of else []) \
            + ([stat("final_val/acc"), stat("best_val/acc")] if acc else []) \
            + ([f"{s['state_size']:,.0f}" if math.isfinite(s["state_size"]) else "—"] if state else [])
        lines.append("| " + " | ".join(_md(x) for x in (
            c.label, f"{len(c.completed)}/{len(c.runs)}", c.n_failed,
            stat("final_val/loss"), stat("best_val/loss"), stat("final_val/bpb"), stat("best_val/bpb"), *extra,
            stat("tokens_per_s", ",.0f"),
            _params(s["num_params"], bool(s["num_params_varies"])), gates,
            f"{c.ratio:.3f}" if math.isfinite(c.ratio) else "—", c.verdict, status)) + " |")
    lines += _eval_table(cells)
    failed = [(c, r) for c in cells for r in c.runs if r.failed]
    if failed:
        lines += ["", "## Failed runs", "", "| run | cell | status | error (first line) |",
                  "|---|---|---|---|"]
        for c, r in failed:
            lines.append(f"| {_md(r.name)} | {_md(c.label)} | {_md(r.status)} | "
                         f"{_md(_first_line(r.error) or 'no error message recorded')} |")
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{p.stem}]({p.name})" for p in plots]
    lines += [
        "", "## Definitions", "",
        "- final = the last logged value in metrics.csv (nan if the run ended on nan); best = the smallest "
        "finite logged value; both fall back to summary.json when metrics.csv has no such column.",
        "- mean ± std over the completed seeds of a cell; std is the sample standard deviation (ddof=1), "
        "shown without ± for a single seed.",
        "- tokens/s = each run's summary tokens_per_s (training tokens over training-step time: validation, "
        "checkpoints, logging, data loading and each process's first step excluded; the number its closing line "
        "printed), then mean ± std over seeds.",
        "- vs baseline = cell mean final val/loss / baseline mean final val/loss.",
        "- val/acc (recall tasks, data=mqar / data=passkey) = argmax accuracy at the labelled positions; its best "
        "is the highest logged value. state size = the model's recurrent state in elements per sequence, as its "
        "mixers report it (summary.json `state_size`; attention: its KV cache at the run's sequence length).",
        "- cells.csv and runs.csv hold the same numbers at full precision.",
        "",
    ]
    return "\n".join(lines)


# The groundthink-eval results shown in report.md (all of them are in cells.csv and runs.csv).
EVAL_HEADLINE = ("eval/lm/ppl_carried", "eval/lm/ppl_reset_over_carried", "eval/lm/beyond_over_first",
                 "eval/passkey/acc_mean", "eval/mqar/acc_mean", "eval/persona/acc_mean",
                 "eval/generation/tokens_per_s", "eval/generation/rss_growth", "eval/dynamics/n_changes")


def _eval_table(cells: list[Cell]) -> list[str]:
    keys = [k for k in EVAL_HEADLINE if any(f"{k}_mean" in c.stats for c in cells)]
    if not keys:
        return []
    lines = ["", "## Evaluation (groundthink-eval)", "",
             "Mean ± std over the completed runs of each cell that have the result (`<run>/eval/<task>/"
             "result.json`); every eval scalar is a column of cells.csv and runs.csv.", "",
             "| cell | " + " | ".join(f"`{k}`" for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for c in cells:
        values = [_pm(c.stats.get(f"{k}_mean", math.nan), c.stats.get(f"{k}_std", math.nan), ".4g") for k in keys]
        lines.append("| " + " | ".join(_md(x) for x in [c.label, *values]) + " |")
    return lines


def write_report(runs: list[Run], out: Path, *, baseline_spec: str | None, within: float,
                 seed_keys: tuple[str, ...], command: str, sources: list[str], plots: bool = True,
                 metric: str | None = None, best_of: str | None = None) -> Path:
    cells, common = group_cells(runs, seed_keys)
    if metric is None:
        metric = "val/acc" if _has(cells, "final_val/acc_mean") else "val/loss"
    if f"final_{metric}_mean" not in cells[0].stats:
        raise CompareError(f"--metric {metric}: not a compared metric; choose one of {', '.join(LOSS_METRICS)}")
    if best_of:
        cells = select_best_of(cells, best_of, metric)
    baseline = find_baseline(cells, baseline_spec)
    apply_baseline(cells, baseline, within)
    axes = varying_axes(cells)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CompareError(f"--out {out}: cannot create the report folder ({exc})") from None
    for stale in [*out.glob("axis_*.png"), *out.glob("*_vs_state_size.png"), out / "val_loss.png",
                  out / "val_acc.png"]:
        stale.unlink(missing_ok=True)
    written: list[Path] = []
    if plots:
        from groundthink.reporting.plots import axis_filename, plot_axis, plot_val_loss, plot_vs_state_size

        p = plot_val_loss(cells, out / "val_loss.png")
        if p is None:
            print("note: no val_loss.png: no run logged val/loss", file=sys.stderr)
        written += [p] if p else []
        if metric != "val/loss":
            p = plot_val_loss(cells, out / f"{_metric_col(metric)}.png", metric=metric)
            written += [p] if p else []
        for key in axes:
            p = plot_axis(cells, key, axes, out / axis_filename(key), metric=metric)
            written += [p] if p else []
        p = plot_vs_state_size(cells, axes, out / f"{_metric_col(metric)}_vs_state_size.png", metric=metric)
        written += [p] if p else []
    write_cells_csv(cells, axes, out / "cells.csv")
    write_runs_csv(cells, axes, seed_keys, out / "runs.csv")
    report = out / "report.md"
    report.write_text(render_markdown(cells, common, baseline, within, command, sources, written,
                                      best_of=best_of, metric=metric), encoding="utf-8")
    return report


def main(argv: list[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(args_list)
    seed_keys = tuple(k.strip() for item in (args.seed_key or ["seed"]) for k in item.split(",") if k.strip())
    command = " ".join([PROG, *(shlex.quote(a) for a in args_list)])
    try:
        if args.wandb:
            from groundthink.reporting.wandb_runs import load_wandb_runs

            runs = load_wandb_runs(args.wandb, args.group)
            sources = [f"wandb:{args.wandb} group={args.group}"]
            out = Path(args.out or f"report-{args.group}")
        else:
            if not args.paths:
                raise CompareError("give at least one run folder or sweep folder (or --wandb ENTITY/PROJECT "
                                   "--group G)")
            runs = load_runs(args.paths)
            sources = list(args.paths)
            out = Path(args.out) if args.out else Path(args.paths[0]) / "report"
        report = write_report(runs, out, baseline_spec=args.baseline, within=args.within, seed_keys=seed_keys,
                              command=command, sources=sources, plots=not args.no_plots, metric=args.metric,
                              best_of=args.best_of)
    except CompareError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(report.read_text(encoding="utf-8").split("\n## Failed runs")[0].split("\n## Plots")[0].rstrip())
    print(f"\nreport: {report}  (cells.csv, runs.csv and plots in {report.parent})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
