"""`groundthink-eval`: the Hydra entry point that evaluates trained runs with registered tasks or suites.

    groundthink-eval run=outputs/default/<run> eval=lm
    groundthink-eval run=outputs/default/<run> eval=suite_full eval.tasks.passkey.distances=[64,256]
    groundthink-eval -m run=outputs/default/<run a>,outputs/default/<run b> eval=suite_smoke

This is wiring: the run is loaded with `groundthink.load` (verified against its sidecar), every selected task's
settings are typed and checked against the model (groundthink.evaluation.suite) before any compute, then the
tasks run and their results replace `<run>/eval/<task>/` and go to W&B (job_type eval, the training run's project
and group, its run id in the config). A bad input (no such run, an unknown task, a tampered checkpoint, settings
that do not fit the model) prints one line and exits 1 with nothing written.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

log = logging.getLogger("groundthink")
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def available() -> list[str]:
    """Task and suite names that `eval=` accepts (conf/eval/*.yaml)."""
    return sorted(p.stem for p in (Path(CONF_DIR) / "eval").glob("*.yaml"))


def _register() -> None:
    """Hydra's resolvers and ConfigStore schemas (imports torch: after the cheap checks of the command line)."""
    from groundthink import schema
    from groundthink.hydra_support import register_resolvers

    register_resolvers()
    schema.register()


def evaluate(cfg: DictConfig) -> dict[str, dict[str, float]]:
    import torch

    import groundthink
    from groundthink.evaluation.suite import check_tasks, log_to_wandb, run_tasks, task_settings
    from groundthink.training.wandb_setup import wandb_mode

    tasks = task_settings(cfg.eval.tasks)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    dtype = getattr(torch, str(cfg.dtype), None) if cfg.dtype else None
    if cfg.dtype and not isinstance(dtype, torch.dtype):
        raise groundthink.LoadError(f"dtype={cfg.dtype} is not a torch dtype (e.g. float32, bfloat16)")
    loaded = groundthink.load(str(cfg.run), device=str(cfg.device), dtype=dtype)
    check_tasks(loaded, tasks)
    log.info(f"groundthink-eval {cfg.eval.name or '+'.join(tasks)}: {loaded.checkpoint} (step {loaded.step}), "
             f"tasks {', '.join(tasks)}")
    results = run_tasks(loaded, tasks, progress=bool(cfg.progress), log=log.info)
    mode = wandb_mode(cfg.wandb.mode)
    wandb_id = log_to_wandb(loaded, results, mode=mode, suite=str(cfg.eval.name or "+".join(tasks)))
    if wandb_id:
        log.info(f"W&B ({mode}): run {wandb_id}, job_type eval")
    return results


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def _hydra_entry(cfg: DictConfig) -> Any:
    from groundthink.evaluation.tasks import EvalError
    from groundthink.loading import LoadError

    logging.captureWarnings(True)
    try:
        evaluate(cfg)
    except (EvalError, LoadError) as exc:
        log.error(f"Error: {exc}")
        raise SystemExit(1) from None


def precheck(argv: list[str]) -> None:
    """What must be right before Hydra starts: every `run=` path exists and every `eval=` names a task or suite."""
    multirun = "-m" in argv or "--multirun" in argv
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in ("run", "eval"):
            continue
        for item in (value.split(",") if multirun else [value]):
            item = item.strip().strip("'\"")
            if key == "run" and not Path(item).exists():
                raise ValueError(f"run={item}: no such run folder or checkpoint file; pass a run folder "
                                 f"(outputs/<name>/<date>_<time>_<id>) or <run>/checkpoints/<file>.safetensors")
            if key == "eval" and item not in available():
                raise ValueError(f"eval={item}: no such task or suite; available: {', '.join(available())}")
    if not any(a.startswith("run=") for a in argv) and not any(a in ("--help", "-h", "--cfg", "-c") for a in argv):
        raise ValueError("give the run to evaluate: groundthink-eval run=<run folder or checkpoint> eval=<task or "
                         "suite>")


def main() -> None:
    """Console entry point (`groundthink-eval`)."""
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        precheck(sys.argv[1:])
    except ValueError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    _register()
    _hydra_entry()


if __name__ == "__main__":
    sys.exit(main())
