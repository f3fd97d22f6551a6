"""The lifecycle of one training run's folder: before training, the fit itself, and what is left afterwards.

`RunFolder` opens a run folder (a new one, or the one being resumed: its newest checkpoint that verifies, the
sidecar it continues from, its run and W&B ids), removes temporary files of saves that a kill interrupted, and
writes config.yaml. `fit_run` runs `trainer.fit`, sorts the outcome into completed / interrupted / failed,
finalizes every logger and finishes W&B with the right exit code whatever happened, writes summary.json (also
when the loop ran in `ddp_spawn` worker processes: rank 0's records are read back) and prints the closing lines,
which state only what is true of this run (a resume command only when a checkpoint exists, advice that fits the
settings it ran with). `exit_for` turns the outcome into the process's exit.

Exit codes: 0 completed; 1 failed (or a gate FAIL); 130 / 143 interrupted by SIGINT / SIGTERM after writing a
checkpoint. In a multirun a failed job raises instead, so Hydra records it and the sweep goes on.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from groundthink.training.checkpoint import CheckpointError, find_last_good_checkpoint, remove_stale_temp_files
from groundthink.training.errors import NothingToTrain, UserError  # defined there (light to import); imported from here
from groundthink.training.metrics_file import METRICS_FILE, higher_is_better, read_metrics_csv
from groundthink.training.module import NonFiniteLossError
from groundthink.training.rundir import ensure_writable, launched_rank, new_run_id

log = logging.getLogger("groundthink")
SUMMARY_FILE = "summary.json"
_LOWER_IS_BETTER = ("loss", "bpb", "ppl")


class GateFailed(RuntimeError):
    """A gate run whose verdict is FAIL (in a multirun the job is recorded as failed; the sweep goes on)."""


class RunFolder:
    """A run folder opened for training: a fresh one, or the folder of the run being resumed."""

    def __init__(self, run_dir: Path, *, resume: bool, budget: tuple[str, int, int] | None = None) -> None:
        """budget: (the override that sets the step budget, its value, the steps it makes), e.g.
        ("trainer.max_steps", 600, 600): resuming a run whose last checkpoint is at or past that many steps raises
        NothingToTrain before anything in the folder is touched."""
        self.path = Path(run_dir)
        self.resume = resume
        self.checkpoints = self.path / "checkpoints"
        ensure_writable(self.path)
        if launched_rank()[0] == 0:  # under torchrun/srun only rank 0 writes (and cleans) the run folder
            remove_stale_temp_files(self.checkpoints)
        self.resume_checkpoint: Path | None = None
        self.previous: dict[str, Any] = {}
        if resume:
            self.resume_checkpoint = find_last_good_checkpoint(self.path)
            if self.resume_checkpoint is None:
                raise UserError(f"resume={self.path}: no checkpoint in {self.checkpoints} verifies; nothing to "
                                "resume. Start a new run instead.")
            self.previous = json.loads(self.resume_checkpoint.with_suffix(".json").read_text())
        suffix = re.search(r"_([0-9a-f]{8})$", self.path.name)
        self.run_id = self.previous.get("run_id") or (suffix.group(1) if suffix else new_run_id())
        self.wandb_run_id = self.previous.get("wandb_run_id") or self.run_id
        self.resume_step = int(self.previous.get("step", 0)) if resume else None
        self.budget = budget or ("trainer.max_steps", 0, 0)
        if resume and budget is not None and self.resume_step >= budget[2]:
            key, value, steps = budget
            unit = "" if key == "trainer.max_steps" else f" ({steps} steps)"
            raise NothingToTrain(
                f"resume={self.path}: the run is already at step {self.resume_step} and {key}={value}{unit}: nothing "
                f"to train, and its files are left as they were. To train it longer: "
                f"{resume_command(self.path, self.train_longer(self.resume_step))}")

    def train_longer(self, step: int) -> str:
        """The override that gives a run at `step` twice those steps: trainer.max_steps, or the setting the budget
        is counted in (rl.num_episodes), scaled by its steps."""
        key, value, steps = self.budget
        twice = 2 * max(step, 1)
        return f"{key}={twice if key == 'trainer.max_steps' else math.ceil(value * twice / max(steps, 1))}"

    def write_config(self, yaml_text: str) -> None:
        if launched_rank()[0] == 0:  # under torchrun/srun rank 0 writes the run's files, the others read them
            tmp = self.path / ".config.yaml.tmp"
            tmp.write_text(yaml_text)
            tmp.replace(self.path / "config.yaml")  # atomic: another rank may be reading it to resume

    @property
    def tokenizer_dir(self) -> Path | None:
        """Where the run's tokenizer is saved (rank 0) and reloaded on resume (every rank)."""
        return self.path / "tokenizer" if launched_rank()[0] == 0 or self.resume else None

    def has_checkpoint(self) -> bool:
        return find_last_good_checkpoint(self.path) is not None



def discard_unstarted_run(run_dir: Path) -> None:
    """Remove a new run's folder that failed before its first training step (Hydra created it; nothing in it is
    worth keeping: the error was printed). A folder with a checkpoint is never removed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or find_last_good_checkpoint(run_dir) is not None or launched_rank()[0] > 0:
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    try:
        run_dir.parent.rmdir()  # outputs/<name>/ when this was its only run
    except OSError:
        pass


@dataclass
class Outcome:
    status: str  # completed | interrupted | failed
    error: str | None = None
    exception: BaseException | None = None
    interrupted_by: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)


def fit_run(trainer: Any, module: Any, datamodule: Any, folder: RunFolder, *, loggers: list[Any],
            checkpointing: Any, throughput: Any, wandb_on: bool, job_start: float,
            summary_fields: dict[str, Any]) -> Outcome:
    """trainer.fit, then the bookkeeping that must happen whatever the fit did (module docstring)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from groundthink.training.wandb_setup import finish_wandb

    outcome = Outcome("completed")
    wandb_exit: int | None = None
    t_fit = time.time()
    try:
        ckpt = str(folder.resume_checkpoint) if folder.resume_checkpoint else None
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
        if checkpointing.interrupted_by:
            outcome = Outcome("interrupted", interrupted_by=checkpointing.interrupted_by)
    except (NonFiniteLossError, CheckpointError) as exc:
        outcome = Outcome("failed", str(exc), exc)
    except SIGTERMException:
        outcome = Outcome("interrupted", interrupted_by="SIGTERM")
    except BaseException as exc:  # noqa: BLE001 - recorded in summary.json, then re-raised by exit_for
        outcome = Outcome("failed", f"{type(exc).__name__}: {exc}", exc)
    finally:
        for logger in loggers:
            if hasattr(logger, "finalize"):
                logger.finalize("success" if outcome.status == "completed" else outcome.status)
        if wandb_on:
            wandb_exit = finish_wandb(status_ok=outcome.status == "completed")
    step, tokens_per_s = trainer.global_step, throughput.tokens_per_s
    if _ran_in_spawned_workers(trainer):
        step, tokens_per_s = _rank_zero_results(folder)
    first = throughput.first_step_end
    if getattr(module, "stopped_early", None):
        summary_fields = {**summary_fields, "stopped_early": module.stopped_early}
    if wandb_on and isinstance(summary_fields.get("wandb"), dict):  # what the W&B run was told, and how it ended
        summary_fields = {**summary_fields, "wandb": {**summary_fields["wandb"], "exit_code": wandb_exit}}
    outcome.summary = write_summary(
        folder.path,
        status=outcome.status,
        error=outcome.error,
        step=step,
        tokens_per_s=tokens_per_s,
        wall_s=time.time() - t_fit,
        startup_s=(first - job_start) if first is not None else None,
        run_id=folder.run_id,
        wandb_run_id=folder.wandb_run_id if wandb_on else None,
        **summary_fields,
    )
    return outcome


def _ran_in_spawned_workers(trainer: Any) -> bool:
    """True for `ddp_spawn`: the loop ran in child processes, and this process got back only the weights."""
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    return isinstance(launcher, _MultiProcessingLauncher) and trainer.world_size > 1


def _rank_zero_results(folder: RunFolder) -> tuple[int, float | None]:
    """The step of rank 0's newest checkpoint and the mean of its logged perf/tokens_per_s windows."""
    sidecar = folder.checkpoints / "last.json"
    step = int(json.loads(sidecar.read_text()).get("step", 0)) if sidecar.exists() else 0
    metrics = folder.path / METRICS_FILE
    series = read_metrics_csv(metrics).get("perf/tokens_per_s", []) if metrics.exists() else []
    values = [v for _, v in series if not math.isnan(v)]
    return step, (sum(values) / len(values) if values else None)


def write_summary(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """summary.json: the given fields plus `final` (last logged value) and `best` (lowest for losses and bits per
    byte, highest for accuracies) of every metric in metrics.csv."""
    final: dict[str, float] = {}
    best: dict[str, float] = {}
    metrics = run_dir / METRICS_FILE
    if metrics.exists():
        for name, series in read_metrics_csv(metrics).items():
            values = [v for _, v in series if not math.isnan(v)]
            if values:
                final[name] = values[-1]
                if name.endswith(_LOWER_IS_BETTER):
                    best[name] = min(values)
                elif higher_is_better(name):
                    best[name] = max(values)
    summary = {**fields, "final": final, "best": best}
    if launched_rank()[0] > 0:  # torchrun/srun: rank 0's summary is the run's
        return summary
    tmp = run_dir / f".{SUMMARY_FILE}.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    tmp.replace(run_dir / SUMMARY_FILE)
    return summary


def resume_command(run_dir: Path, longer: str | None = None) -> str:
    """The command that resumes this run (with `longer`, e.g. "trainer.max_steps=600", to train it further),
    safe to paste into a shell as printed."""
    command = f"groundthink-train {shlex.quote(f'resume={run_dir}')}"
    return command + (f" {longer}" if longer else "")


def closing_lines(outcome: Outcome, folder: RunFolder, *, precision: str, wandb_mode: str,
                  multirun: bool = False) -> list[str]:
    """What the end of a run prints: status, the numbers, where things are, and only advice that applies. The
    start-up (summary.json `startup_s`) counts from the command for a single run, from the job's start in a
    multirun (groundthink.hydra_support.current_job)."""
    s = outcome.summary
    final = s.get("final", {})
    lines = [f"\n=== GroundThink run {s.get('run_id')}: {outcome.status} at step {s.get('step')} ==="]
    if outcome.error:
        lines.append(f"error: {outcome.error}")
        if isinstance(outcome.exception, NonFiniteLossError):
            advice = ["a lower optim.lr", "a smaller model.gamma_init"]
            if "32" not in precision:
                advice.insert(1, "trainer.precision=32-true")
            lines.append("try: " + ", ".join(advice))
    if "val/loss" in final:
        bpb = final.get("val/bpb")
        lines.append(f"val loss {final['val/loss']:.4f}" + (f"   bits/byte {bpb:.4f}" if bpb is not None else ""))
    if s.get("tokens_per_s"):
        lines.append(f"throughput {s['tokens_per_s']:.0f} tokens/s (training steps only)   wall {s['wall_s']:.1f} s")
    if s.get("startup_s") is not None:
        lines.append(f"{'job start' if multirun else 'command'} to first step {s['startup_s']:.1f} s")
    tokenizer = "tokenizer/, " if (folder.path / "tokenizer").is_dir() else ""  # none for data=mqar / passkey
    lines.append(f"outputs  {folder.path}  (config.yaml, metrics.csv, checkpoints/, {tokenizer}summary.json)")
    if folder.has_checkpoint():
        if outcome.status == "completed":  # continuing a finished run means training it for longer
            longer = folder.train_longer(int(s.get("step") or 0))
            lines.append(f"resume   {resume_command(folder.path, longer)}   (any longer "
                         f"{longer.split('=')[0]})")
        else:
            kept = "the last good checkpoint is kept: " if outcome.status == "failed" else ""
            lines.append(f"resume   {kept}{resume_command(folder.path)}")
    elif outcome.status != "completed":
        lines.append("resume   not possible: no checkpoint was written before the run stopped")
    if wandb_mode == "offline":
        lines.append(f"W&B      offline; upload with: wandb sync {shlex.quote(str(folder.path))}/wandb/offline-run-*")
    return lines


def exit_for(outcome: Outcome, *, multirun: bool, gate_exit: int = 0, gate_name: str | None = None,
             run_dir: Path | None = None) -> None:
    """Raise what ends this run's process (or job): see the exit codes in the module docstring."""
    if outcome.status == "failed":
        if multirun and outcome.exception is not None:
            raise outcome.exception
        raise UserError(outcome.error)
    if outcome.status == "interrupted":
        raise SystemExit(130 if outcome.interrupted_by == "SIGINT" else 143)
    if gate_exit:
        if multirun:
            raise GateFailed(f"gate {gate_name} FAILED; see {run_dir / 'gates.json' if run_dir else 'gates.json'}")
        raise SystemExit(gate_exit)
