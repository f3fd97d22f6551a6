"""Running evaluation tasks on a loaded run: typed settings, checks before compute, atomic result folders, W&B.

    tasks = task_settings({"lm": {"max_tokens": 1024}, "mqar": {}})   # {name: Settings instance}
    check_tasks(loaded, tasks)                                         # EvalError before any compute
    results = run_tasks(loaded, tasks, progress=True)                  # {task: {"eval/<task>/<key>": value}}

Each task writes into a fresh `<eval root>/.<task>.tmp-<random>/`, then `result.json` (the scalars as
`eval/<task>/<key>`, the settings, the checkpoint and step) is added and the folder replaces `<eval root>/<task>/`
by renames, so a re-run overwrites a task's results whole and a failed task leaves the previous results intact.
The eval root is `<run>/eval/` (for a lone checkpoint file: `<its folder>/eval/`).

`load_suite(name)` reads conf/eval/<name>.yaml without Hydra (gate G4 runs inside another Hydra app): a file's
`defaults` list names other eval files (merged in order) and `/schema/eval/<task>@tasks.<task>` entries (the
typed defaults, applied by `task_settings`); `_self_` comes last.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from groundthink.evaluation.tasks import TASKS, EvalError

CONF_EVAL = Path(__file__).resolve().parent.parent.parent / "conf" / "eval"


def available() -> list[str]:
    """Task and suite names that `eval=` accepts (conf/eval/*.yaml)."""
    from groundthink.evaluate import available as names

    return names()


def load_suite(name: str) -> dict[str, dict[str, Any]]:
    """{task: settings overrides} of conf/eval/<name>.yaml (a task or a suite), as Hydra would compose them."""
    import yaml

    file = CONF_EVAL / f"{name}.yaml"
    if not file.is_file():
        raise EvalError(f"eval={name}: no such task or suite; available: {', '.join(available())}")
    node = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    tasks: dict[str, dict[str, Any]] = {}
    for entry in node.get("defaults", []):
        if isinstance(entry, str) and entry != "_self_" and not entry.startswith("/"):
            for task, values in load_suite(entry).items():
                tasks.setdefault(task, {}).update(values)
        elif isinstance(entry, str) and entry.startswith("/schema/eval/"):
            tasks.setdefault(entry.split("@", 1)[0].rsplit("/", 1)[1], {})
    for task, values in (node.get("tasks") or {}).items():
        tasks.setdefault(task, {}).update(values or {})
    return tasks


def task_settings(tasks: dict[str, Any]) -> dict[str, Any]:
    """{task: its Settings dataclass instance} from {task: dict of overrides}; unknown tasks and keys, and wrong
    types, raise EvalError naming them."""
    from omegaconf import OmegaConf

    out = {}
    for name, values in tasks.items():
        if name not in TASKS:
            raise EvalError(f"eval task '{name}' does not exist; registered tasks: {', '.join(sorted(TASKS))}")
        values = OmegaConf.to_container(values, resolve=True) if OmegaConf.is_config(values) else dict(values or {})
        try:
            out[name] = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TASKS[name].Settings), values))
        except Exception as exc:  # OmegaConf names the key, the value and the type
            raise EvalError(f"eval.tasks.{name}: {str(exc).splitlines()[0]}") from None
    if not out:
        raise EvalError("no evaluation task selected (eval.tasks is empty)")
    return out


def check_tasks(loaded: Any, tasks: dict[str, Any]) -> None:
    for name, settings in tasks.items():
        TASKS[name]().check(loaded, settings)


def eval_root(loaded: Any) -> Path:
    return (loaded.run_dir if loaded.run_dir is not None else loaded.checkpoint.parent) / "eval"


def progress_factory(enabled: bool):
    def make(total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not enabled, unit="it", dynamic_ncols=True, leave=False,
                    mininterval=1.0)

    return make


def run_tasks(loaded: Any, tasks: dict[str, Any], *, progress: bool = True, root: Path | None = None,
              log=print) -> dict[str, dict[str, float]]:
    """Run every task (already checked) and replace its result folder; {task: {eval/<task>/<key>: value}}."""
    from dataclasses import asdict

    from groundthink.evaluation.tasks.base import write_json

    root = root or eval_root(loaded)
    root.mkdir(parents=True, exist_ok=True)
    make_bar = progress_factory(progress)
    results = {}
    for name, settings in tasks.items():
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        started = time.time()
        try:
            scalars = TASKS[name]().run(loaded, settings, tmp, make_bar)
            metrics = {f"eval/{name}/{k}": float(v) for k, v in scalars.items()}
            write_json(tmp / "result.json", {
                "task": name, "metrics": metrics, "settings": asdict(settings), "checkpoint": str(loaded.checkpoint),
                "checkpoint_sha256": loaded.checkpoint_sha256, "step": loaded.step, "run_id": loaded.run_id,
                "wall_s": time.time() - started, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            _replace(tmp, root / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        results[name] = metrics
        shown = ", ".join(f"{k.rsplit('/', 1)[1]}={_fmt(v)}" for k, v in list(metrics.items())[:8])
        log(f"eval {name}: {shown}{' ...' if len(metrics) > 8 else ''} -> {root / name}")
    return results


def _fmt(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) else str(v)


def _replace(new: Path, target: Path) -> None:
    """`new` becomes `target` by renames (the old folder is moved aside first, then deleted)."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def log_to_wandb(loaded: Any, results: dict[str, dict[str, float]], *, mode: str, suite: str,
                 root: Path | None = None) -> str | None:
    """One W&B run (job_type eval) in the training run's project and group, linked by its ids; scalars and PNGs."""
    if mode == "disabled" or not results:
        return None
    import wandb

    summary = _summary(loaded)
    record = summary.get("wandb") or {}
    logger = (loaded.config.get("logger") or {}).get("wandb") or {}
    project = record.get("project") or logger.get("project") or "groundthink"
    group = record.get("group") or loaded.config.get("name") or "default"
    root = root or eval_root(loaded)
    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(project=project, group=group, job_type="eval", mode=mode, dir=str(root),
                     entity=logger.get("entity"), name=f"eval-{suite}-{loaded.run_id or loaded.checkpoint.stem}",
                     config={"train_run_id": loaded.run_id, "train_wandb_run_id": loaded.wandb_run_id,
                             "checkpoint": str(loaded.checkpoint), "step": loaded.step, "suite": suite,
                             "tasks": sorted(results)}, reinit=True)
    try:
        payload: dict[str, Any] = {k: v for metrics in results.values() for k, v in metrics.items()}
        for task in results:
            for png in sorted((root / task).glob("*.png")):
                payload[f"eval/{task}/{png.stem}"] = wandb.Image(str(png))
        run.log(payload)
        return run.id
    finally:
        run.finish()


def _summary(loaded: Any) -> dict[str, Any]:
    import json

    file = loaded.run_dir / "summary.json" if loaded.run_dir is not None else None
    if file is None or not file.is_file():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
