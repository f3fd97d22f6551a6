"""Reading the runs of one W&B group through the public API, as `Run` records the local report understands.

Mapping: W&B state finished -> completed, failed/crashed -> failed, killed -> interrupted, running -> running;
overrides = the run's tags of the form key=value (the train entry point tags each run with its Hydra
overrides); config = run.config;
series = run.scan_history for val/loss, val/bpb, perf/tokens_per_s, with the step from `trainer/global_step`
when logged, else W&B's `_step`. Needs network and credentials; it checks both first and fails fast otherwise
(it never prompts). Not covered by the offline tests.
"""

from __future__ import annotations

import math
import os

from groundthink.reporting.cells import LOSS_METRICS, THROUGHPUT_METRIC
from groundthink.reporting.runs import CompareError, Run, flatten, parse_override_list

_STATES = {"finished": "completed", "failed": "failed", "crashed": "failed", "killed": "interrupted",
           "running": "running"}


def load_wandb_runs(project_path: str, group: str | None) -> list[Run]:
    if project_path.count("/") != 1 or not all(project_path.split("/")):
        raise CompareError(f"--wandb {project_path!r}: expected ENTITY/PROJECT, e.g. my-team/groundthink")
    if not group:
        raise CompareError("--wandb needs --group G (the W&B group of the sweep, "
                           "printed by groundthink-train)")
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun", "disabled"):
        raise CompareError(f"WANDB_MODE={mode}: reading runs from W&B needs online mode; compare the local "
                           "run folders instead (groundthink-compare outputs/<name>-multirun/<sweep folder>)")
    from groundthink.training.wandb_setup import has_credentials, host_reachable

    if not has_credentials():
        raise CompareError("no W&B credentials (WANDB_API_KEY or `wandb login`); compare the local run "
                           "folders instead")
    if not host_reachable(timeout_s=3.0):
        raise CompareError("the W&B host is not reachable (offline?); compare the local run folders instead")
    try:
        import wandb
    except ImportError:
        raise CompareError("wandb is not installed (pip install wandb)") from None
    try:
        api = wandb.Api(timeout=30)
        remote = list(api.runs(project_path, filters={"group": group}))
    except Exception as exc:  # noqa: BLE001 - any API failure becomes one clear message
        raise CompareError(f"W&B query for {project_path} group {group!r} failed: {exc}") from None
    if not remote:
        raise CompareError(f"no W&B runs in {project_path} with group {group!r}")
    runs = []
    for r in remote:
        series: dict[str, list[tuple[int, float]]] = {}
        for metric in (*LOSS_METRICS, THROUGHPUT_METRIC):
            rows = [row for row in r.scan_history(keys=[metric]) if row.get(metric) is not None]
            series[metric] = [(int(row.get("trainer/global_step", row.get("_step", i))),
                               float(row[metric]) if row[metric] != "NaN" else math.nan)
                              for i, row in enumerate(rows)]
        summary = dict(r.summary)
        runs.append(Run(
            path=r.url, name=r.name, status=_STATES.get(r.state, r.state),
            error=None if r.state == "finished" else f"W&B state: {r.state}",
            overrides=parse_override_list([t for t in r.tags if "=" in t]) or None,
            config=flatten(dict(r.config)),
            series={k: v for k, v in series.items() if v},
            summary={"num_params": summary.get("num_params"), "tokens_per_s": summary.get("tokens_per_s")},
        ))
    return runs
