"""Sweep launchers on submitit: a sweep's jobs as separate processes on this machine, or as a SLURM job array.

`hydra/launcher=local` and `hydra/launcher=slurm` (conf/hydra/launcher/) select the classes of
`hydra_plugins/groundthink_launchers` (Hydra only instantiates launchers from the `hydra_plugins` package), which
are the classes below. They follow hydra-submitit-launcher (facebookresearch/hydra, plugins/hydra_submitit_launcher:
one pickled launcher per job, `load_sweep_config` + `run_job` in the job process) and submitit's checkpointing
protocol (facebookincubator/submitit, docs/checkpointing.md: on the preemption/timeout signal submitit calls the
callable's `checkpoint(*args)`, pickles the DelayedSubmission it returns and requeues the job). What differs:

- The sweep folder is resolved once, in the launching process, and handed to every job. GroundThink's folder
  names carry a per-process time stamp and run id (`gt_run_dir`); Hydra ships the OmegaConf resolvers to the job in
  its Singleton state, and when the command is the `groundthink-train` script they travel by reference, so the job
  process imports groundthink.train afresh, draws a new time and id, and (with the stock `submitit_local`) writes
  each job into a sweep folder of its own. Job folders are `<sweep>/<num>_<overrides>/` exactly as with the basic
  launcher, so `groundthink-compare` and `groundthink-gate matrix` read them unchanged (`.submitit/` is hidden).
- `local`: at most `max_parallel` jobs run at once (a sliding window: the next job starts when one ends;
  submitit's local executor alone starts them all). `slurm`: `array_parallelism` is the `%N` of `--array`.
- Every job is waited for; a job that dies without a result (killed, out of memory) becomes a failed JobReturn,
  so one failure never stops the others, and the sweep raises the first failure at the end as the basic
  launcher does.
- Restart = resume: a job that starts in a folder holding a checkpoint that verifies continues from it through
  the training entry point's `resume=<job folder>` (its original `.hydra/` stays; this start's Hydra record goes
  to `.hydra/resume-<time>/`). That covers any restart: submitit's requeue after the timeout/preemption signal,
  SLURM's own requeue after a preemption or node failure. `checkpoint()`, submitit's hook, returns that
  resubmission explicitly. Work since the last periodic checkpoint (`callbacks.checkpoint.every_n_steps`) is redone.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, run_job, setup_globals
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)

RESUME_KEY = "resume"
RESUME_SUBDIR_PREFIX = ".hydra/resume-"
_POLL_S = 0.5
# Launcher settings that GroundThink reads itself; everything else goes to the submitit executor.
_OWN_KEYS = ("max_parallel",)


class LauncherConfigError(ValueError):
    """A launcher setting that cannot work; the message names the key and what to set instead."""


def quote_override_value(value: str) -> str:
    """`value` as a quoted Hydra override value (paths of job folders contain '=' and ',')."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def resumable_checkpoint(job_dir: Path) -> Path | None:
    """The checkpoint that the entry point's `resume=<job_dir>` would load (the newest that verifies), or None."""
    if not (job_dir / "checkpoints").is_dir():
        return None
    from groundthink.training.checkpoint import find_last_good_checkpoint

    return find_last_good_checkpoint(job_dir)


def resume_overrides(job_dir: Path, overrides: Sequence[str], now: datetime | None = None) -> list[str]:
    """The overrides a restarted job runs with: unchanged without a checkpoint to resume, else `resume=<job_dir>`
    plus `hydra.output_subdir=.hydra/resume-<time>` (the job's original `.hydra/` record stays as it was).

    An earlier resume override is replaced, never repeated; `resume` is among the keys left out of job folder
    names (hydra.job.config.override_dirname.exclude_keys), so the job keeps its folder.
    """
    kept = [o for o in overrides if not _is_key(o, RESUME_KEY) and not _is_key(o, "hydra.output_subdir")]
    if resumable_checkpoint(job_dir) is None:
        return kept
    stamp = (now or datetime.now()).strftime("%Y-%m-%d_%H-%M-%S")
    return kept + [
        f"{RESUME_KEY}={quote_override_value(str(job_dir))}",
        f"hydra.output_subdir={RESUME_SUBDIR_PREFIX}{stamp}",
    ]


def _job_dir(sweep_config: DictConfig) -> Path:
    return Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)


def _checkpoint_step(checkpoint: Path | None) -> int | None:
    try:
        return int(json.loads(checkpoint.with_suffix(".json").read_text())["step"])
    except (AttributeError, OSError, ValueError, KeyError, TypeError):
        return None


def _is_key(override: str, key: str) -> bool:
    return override.lstrip("+~").split("=", 1)[0] == key


class SubmititSweepLauncher:
    """The GroundThink behaviour on top of hydra-submitit-launcher's BaseSubmititLauncher (a mixin: the plugin
    classes in hydra_plugins/groundthink_launchers combine it with LocalLauncher / SlurmLauncher)."""

    _EXECUTOR = "abstract"
    params: dict[str, Any]
    config: DictConfig | None
    hydra_context: Any
    task_function: Any

    # ----- in the launching process ---------------------------------------------------------------------------
    def make_executor(self) -> Any:
        """The submitit executor with this launcher's settings (what `launch` submits to)."""
        import submitit
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

        params = {k: v for k, v in self.params.items() if k not in _OWN_KEYS}
        folder = params.pop("submitit_folder")
        init = {}
        if "max_num_timeout" in params:
            init[f"{self._EXECUTOR}_max_num_timeout"] = params.pop("max_num_timeout")
        executor = submitit.AutoExecutor(folder=folder, cluster=self._EXECUTOR, **init)
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in shared else f"{self._EXECUTOR}_{k}": v for k, v in params.items()})
        return executor

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.task_function is not None
        if not job_overrides:
            raise LauncherConfigError("the sweep has no jobs")
        self.sweep_dir = str(self.config.hydra.sweep.dir)
        executor = self.make_executor()
        Path(self.sweep_dir).mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(self.sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {self.sweep_dir}")
        job_args = []
        for num, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))}")
            job_args.append((list(overrides), "hydra.sweep.dir", num, f"job_id_for_{num}", Singleton.get_state()))
        progress = SweepProgress([args[2] for args in job_args])
        results = self._run_jobs(executor, job_args, progress)
        progress.close()
        return results

    def _run_jobs(self, executor: Any, job_args: list[tuple], progress: SweepProgress) -> list[JobReturn]:
        jobs = executor.map_array(self, *zip(*job_args))
        for k, job in enumerate(jobs):
            progress.started(k, job)
        results: list[JobReturn | None] = [None] * len(jobs)
        while True:
            for k, job in enumerate(jobs):
                if results[k] is None and job.done():
                    results[k] = progress.finished(k, job, job_args[k][0])
            if all(r is not None for r in results):
                return results  # type: ignore[return-value]
            time.sleep(_POLL_S)

    # ----- in the job process ----------------------------------------------------------------------------------
    def _sweep_config(self, sweep_overrides: list[str], job_num: int) -> DictConfig:
        assert self.hydra_context is not None and self.config is not None
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, sweep_overrides)
        with read_write(sweep_config.hydra), open_dict(sweep_config.hydra):
            sweep_config.hydra.sweep.dir = self.sweep_dir
            sweep_config.hydra.job.num = job_num
        return sweep_config

    def job_dir(self, sweep_overrides: list[str], job_num: int) -> Path:
        """The folder of job `job_num` (what run_job creates: hydra.sweep.dir / hydra.sweep.subdir)."""
        return _job_dir(self._sweep_config(sweep_overrides, job_num))

    def __call__(
        self,
        sweep_overrides: list[str],
        job_dir_key: str,
        job_num: int,
        job_id: str,
        singleton_state: dict[Any, Any],
    ) -> JobReturn:
        import submitit

        assert self.task_function is not None
        # "command to first step" in the summary counts from this job's start, not from the sweep command.
        os.environ["GROUNDTHINK_T0"] = str(time.time())
        Singleton.set_state(singleton_state)
        setup_globals()
        sweep_config = self._sweep_config(sweep_overrides, job_num)
        job_dir = _job_dir(sweep_config)
        overrides = resume_overrides(job_dir, sweep_overrides)
        if overrides != list(sweep_overrides):
            checkpoint = resumable_checkpoint(job_dir)
            log.warning(f"job {job_num} restarts from its last checkpoint {checkpoint.name if checkpoint else None} "
                        f"(step {_checkpoint_step(checkpoint)}): {' '.join(overrides[-2:])}")
            sweep_config = self._sweep_config(overrides, job_num)
        with open_dict(sweep_config.hydra.job):
            sweep_config.hydra.job.id = submitit.JobEnvironment().job_id
        return run_job(
            hydra_context=self.hydra_context,
            task_function=self.task_function,
            config=sweep_config,
            job_dir_key=job_dir_key,
            job_subdir_key="hydra.sweep.subdir",
        )

    def checkpoint(
        self,
        sweep_overrides: list[str],
        job_dir_key: str,
        job_num: int,
        job_id: str,
        singleton_state: dict[Any, Any],
    ) -> Any:
        """submitit's hook on the timeout/preemption signal: the same job again, resuming its last checkpoint."""
        import submitit

        overrides = resume_overrides(self.job_dir(sweep_overrides, job_num), sweep_overrides)
        log.warning(f"job {job_num} is being requeued with: {' '.join(filter_overrides(overrides))}")
        return submitit.helpers.DelayedSubmission(self, overrides, job_dir_key, job_num, job_id, singleton_state)


class SweepProgress:
    """Logs each job's start (with its log file) and end, and the sweep's done/total, failures, elapsed and ETA."""

    def __init__(self, job_nums: list[int]) -> None:
        self.job_nums = job_nums
        self.t0 = time.time()
        self.done = 0
        self.failed = 0

    def started(self, k: int, job: Any) -> None:
        log.info(f"job #{self.job_nums[k]} started: submitit job {job.job_id}, log {job.paths.stdout}")

    def finished(self, k: int, job: Any, overrides: list[str]) -> JobReturn:
        ret = job_return(job, overrides)
        self.done += 1
        self.failed += ret.status == JobStatus.FAILED
        elapsed = time.time() - self.t0
        left = len(self.job_nums) - self.done
        eta = f", ETA {_hms(elapsed / self.done * left)}" if left else ""
        log.info(f"job #{self.job_nums[k]} {'FAILED' if ret.status == JobStatus.FAILED else 'completed'}; "
                 f"sweep {self.done}/{len(self.job_nums)} jobs done ({self.failed} failed), "
                 f"elapsed {_hms(elapsed)}{eta}")
        return ret

    def close(self) -> None:
        log.info(f"sweep finished: {self.done - self.failed} completed, {self.failed} failed, "
                 f"in {_hms(time.time() - self.t0)}")


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def job_return(job: Any, overrides: list[str]) -> JobReturn:
    """The job's JobReturn; a job that ended without one (killed, out of memory) as a failed JobReturn."""
    try:
        return job.results()[0]
    except Exception as exc:  # noqa: BLE001 - the sweep goes on; BasicSweeper raises it after the batch
        ret = JobReturn(overrides=overrides, status=JobStatus.FAILED)
        ret._return_value = RuntimeError(
            f"submitit job {job.job_id} ({' '.join(overrides)}) ended without a result: {exc}; "
            f"its log: {job.paths.stdout}"
        )
        return ret


class LocalSweepLauncher(SubmititSweepLauncher):
    """Jobs as processes on this machine, at most `max_parallel` at a time; job slot k gets its own GPUs."""

    _EXECUTOR = "local"

    def max_parallel(self) -> int:
        return _positive_int(self.params.get("max_parallel", 1), "max_parallel", minimum=1,
                             hint="the number of jobs to run at once, e.g. 2 on a 2-core machine with "
                                  "trainer.num_threads=1")

    def gpu_slots(self) -> list[list[int]]:
        """The GPU ids of each job slot: `gpus_per_job` consecutive ids of `visible_gpus` per slot."""
        per_job = _positive_int(self.params.get("gpus_per_job") or 0, "gpus_per_job", minimum=0,
                                hint="GPUs per job, 0 for CPU jobs")
        slots = self.max_parallel()
        visible = self.params.get("visible_gpus")
        if visible is None:
            visible = list(range(slots * per_job))
        visible = [int(g) for g in visible]
        if len(visible) < slots * per_job:
            raise LauncherConfigError(
                f"hydra.launcher.visible_gpus={visible} has fewer than max_parallel x gpus_per_job = "
                f"{slots} x {per_job} GPUs; lower max_parallel or gpus_per_job, or list more GPUs"
            )
        return [visible[k * per_job:(k + 1) * per_job] for k in range(slots)]

    def make_executor(self) -> Any:
        import submitit

        slots = self.gpu_slots()  # checks max_parallel too: a bad value fails before any job starts
        executor = submitit.LocalExecutor(
            folder=self.params["submitit_folder"], max_num_timeout=int(self.params.get("max_num_timeout", 3))
        )
        settings = {"timeout_min": self.params.get("timeout_min"), "setup": self.params.get("setup"),
                    "stderr_to_stdout": self.params.get("stderr_to_stdout"), "gpus_per_node": len(slots[0])}
        executor.update_parameters(**{k: v for k, v in settings.items() if v is not None})
        return executor

    def _run_jobs(self, executor: Any, job_args: list[tuple], progress: SweepProgress) -> list[JobReturn]:
        slots = self.gpu_slots()
        jobs: list[Any] = [None] * len(job_args)
        results: list[JobReturn | None] = [None] * len(job_args)
        waiting = list(range(len(job_args)))
        running: dict[int, int] = {}  # slot -> job index
        while waiting or running:
            for slot, k in list(running.items()):
                if jobs[k].done():
                    results[k] = progress.finished(k, jobs[k], job_args[k][0])
                    del running[slot]
            for slot in range(len(slots)):
                if waiting and slot not in running:
                    k = waiting.pop(0)
                    executor.update_parameters(visible_gpus=slots[slot])
                    jobs[k] = executor.submit(self, *job_args[k])
                    progress.started(k, jobs[k])
                    running[slot] = k
            if running:
                time.sleep(_POLL_S)
        return results  # type: ignore[return-value]


def _positive_int(value: Any, key: str, *, minimum: int, hint: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise LauncherConfigError(f"hydra.launcher.{key}={value!r}: give {hint} (an integer >= {minimum})")
    return value


class SlurmSweepLauncher(SubmititSweepLauncher):
    """One SLURM job array per sweep; `array_parallelism` jobs run at once."""

    _EXECUTOR = "slurm"

    def make_executor(self) -> Any:
        if shutil.which("srun") is None or shutil.which("sbatch") is None:
            raise LauncherConfigError(
                "hydra/launcher=slurm submits with SLURM's sbatch/srun, which are not on PATH here: run the sweep "
                "on a cluster login node, or use hydra/launcher=local on this machine"
            )
        return super().make_executor()
