"""`groundthink-train`: the Hydra entry point that trains one configured hybrid LM (or a sweep of them with -m).

This is the only training code that sees a DictConfig: it turns the config into explicit objects (tokenizer,
documents, ModelConfig, the LightningModule and Trainer) and owns the run folder (config, metrics.csv, checkpoints,
tokenizer, summary.json). Examples:

    groundthink-train                                   # the default run: a small hybrid on the embedded corpus
    groundthink-train model=8m model.alpha=0.5 trainer.max_steps=2000
    groundthink-train resume=outputs/default/2026-11-24_07-00-00_1a2b3c4d
    groundthink-train -m model.gamma_init=0.01,1.0 seed=1,2
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from groundthink.training.rundir import new_run_id

log = logging.getLogger("groundthink.train")

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
# Sweep grids live in sweeps/ (`groundthink-train -m -cn ablation_matrix`); main() puts it on Hydra's search path.
SWEEPS_DIR = str(Path(__file__).resolve().parent.parent / "sweeps")
_PROCESS_RUN_ID = new_run_id()
_PROCESS_TIME = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def _run_dir_resolver(root: str, name: str, resume: Any) -> str:
    """hydra.run.dir: a fresh unique folder, or the folder of the run being resumed."""
    if resume not in (None, "null", "None", ""):
        return str(resume)
    return f"{root}/{name}/{_PROCESS_TIME}_{_PROCESS_RUN_ID}"


def _override_slug(override_dirname: str) -> str:
    """A job folder name from its overrides (the job number in front keeps it unique); long ones are cut at a
    whole override and end in '...' (the full list is in the job's .hydra/overrides.yaml)."""
    slug = re.sub(r"[^A-Za-z0-9_.=,+-]+", "-", override_dirname).strip("-") or "base"
    if len(slug) > 80:
        head = slug[:77]
        slug = (head.rsplit(",", 1)[0] if "," in head else head) + "..."
    return slug


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("gt_run_dir"):
        OmegaConf.register_new_resolver("gt_run_dir", _run_dir_resolver)
    if not OmegaConf.has_resolver("gt_override_slug"):
        OmegaConf.register_new_resolver("gt_override_slug", _override_slug)


register_resolvers()


# ----------------------------------------------------------------------------------------------------------------
def _resume_config(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """The saved config of the run being resumed, with this command's other overrides applied on top."""
    from hydra.core.hydra_config import HydraConfig

    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise UserError(
            f"resume={cfg.resume}: no config.yaml in that folder, so it is not a GroundThink run folder. "
            "Pass the folder printed at the end of a run (outputs/<name>/<date>_<time>_<id>)."
        )
    saved = OmegaConf.load(saved_path)
    original = set()
    if (run_dir / ".hydra" / "overrides.yaml").is_file():
        original = set(OmegaConf.load(run_dir / ".hydra" / "overrides.yaml"))
    extra = [o for o in HydraConfig.get().overrides.task if not o.startswith("resume=") and o not in original]
    for override in extra:
        key, _, value = override.partition("=")
        if key.startswith("hydra.") or key in ("paths.output_root",):
            continue
        if "." not in key.lstrip("+~"):
            raise UserError(
                f"resume: the override '{override}' changes a config group; a resumed run keeps the groups it was "
                "started with. Start a new run instead, or override individual fields (e.g. trainer.max_steps=...)."
            )
        OmegaConf.update(saved, key.lstrip("+"), OmegaConf.create({"v": _yaml_value(value)}).v, force_add=True)
    saved.resume = str(run_dir)
    return saved


def _yaml_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text) if text != "" else None


class UserError(Exception):
    """A problem with the user's input: printed as a one-paragraph message, without a traceback."""


class GateFailed(RuntimeError):
    """A gate run whose verdict is FAIL (in a multirun the job is recorded as failed; the sweep goes on)."""


class ConfigValueError(UserError):
    """A config value the model or data layer refused (e.g. model.alpha=1.5)."""


# ----------------------------------------------------------------------------------------------------------------
def _load_training_documents(data_cfg: DictConfig) -> list[str]:
    from groundthink.data.corpus import load_documents, load_mixture

    if data_cfg.source == "mixture":
        specs = [(OmegaConf.to_container(m, resolve=True), float(m.weight)) for m in data_cfg.mixture]
        return load_mixture(specs, total_docs=data_cfg.max_documents, seed=0)
    docs = load_documents(
        data_cfg.source,
        path=data_cfg.path,
        text_field=data_cfg.text_field,
        hub_name=data_cfg.hub_name,
        max_documents=data_cfg.max_documents,
    )
    return docs


def _token_bytes(tokenizer) -> Any:
    """UTF-8 bytes each id stands for (0 for control ids): the denominator of bits per byte."""
    import torch

    return torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.float32)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train one run; returns its summary (also written to summary.json)."""
    t_command = float(os.environ.get("GROUNDTHINK_T0", time.time()))
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if cfg.resume:
        cfg = _resume_config(cfg, run_dir)
    if cfg.get("gate") is not None:
        from groundthink.gates.runner import check_gate_config

        diagnostics_cfg = cfg.get("diagnostics")
        try:  # a bad gate block fails now, not after the training it would judge
            check_gate_config(
                OmegaConf.to_container(cfg.gate, resolve=True),
                None if diagnostics_cfg is None else OmegaConf.to_container(diagnostics_cfg, resolve=True),
            )
        except ValueError as exc:
            raise UserError(str(exc)) from None

    import lightning as L
    import torch

    _quiet_lightning_logging()

    from groundthink.data.corpus import split_documents
    from groundthink.data.stream import encode_documents
    from groundthink.data.tokenizer import Tokenizer, build_tokenizer
    from groundthink.models import HybridLM, ModelConfig
    from groundthink.training.callbacks import CheckpointCallback, ThroughputCallback, count_flops_params
    from groundthink.training.checkpoint import CheckpointError, find_last_good_checkpoint
    from groundthink.training.datamodule import TBPTTDataModule
    from groundthink.training.lightning_io import SafetensorsCheckpointIO
    from groundthink.training.metrics_logger import CSVMetricsLogger
    from groundthink.training.module import FaultSettings, LMTrainingModule, NonFiniteLossError, OptimSettings
    from groundthink.training.provenance import collect_provenance
    from groundthink.training.rundir import ensure_writable
    from groundthink.training.schedules import Curriculum
    from groundthink.training.wandb_setup import finish_wandb, make_wandb_logger, wandb_mode

    ensure_writable(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    resume_ckpt = None
    previous: dict[str, Any] = {}
    if cfg.resume:
        resume_ckpt = find_last_good_checkpoint(run_dir)
        if resume_ckpt is None:
            raise UserError(f"resume={cfg.resume}: no checkpoint that verifies in {ckpt_dir}; nothing to resume.")
        previous = json.loads(resume_ckpt.with_suffix(".json").read_text())

    dir_id = re.search(r"_([0-9a-f]{8})$", run_dir.name)
    run_id = previous.get("run_id") or (dir_id.group(1) if dir_id else new_run_id())
    wandb_run_id = previous.get("wandb_run_id") or run_id
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if cfg.trainer.num_threads:
        torch.set_num_threads(int(cfg.trainer.num_threads))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    # --- data and tokenizer (all errors here happen before any training) ---
    docs = _load_training_documents(cfg.data)
    train_texts, val_texts = split_documents(docs, val_fraction=float(cfg.data.val_fraction), seed=int(cfg.seed))
    tok_dir = run_dir / "tokenizer"
    if cfg.resume and tok_dir.exists():
        tokenizer = Tokenizer.load(tok_dir)
    else:
        tokenizer = build_tokenizer(cfg.tokenizer.kind, train_texts, int(cfg.tokenizer.vocab_size))
        tokenizer.save(tok_dir)
    train_ids = encode_documents(tokenizer, train_texts)
    val_ids = encode_documents(tokenizer, val_texts)

    curriculum = Curriculum(cfg.data.curriculum, int(cfg.data.seq_len))
    datamodule = TBPTTDataModule(
        train_ids,
        val_ids,
        batch_size=int(cfg.data.batch_size),
        curriculum=curriculum,
        val_seq_len=int(cfg.data.seq_len),
        val_batches=int(cfg.data.val_batches),
        pad_id=tokenizer.pad_id,
        seed=int(cfg.seed),
        accumulate_grad_batches=int(cfg.trainer.accumulate_grad_batches),
    )

    # --- model ---
    model_fields = OmegaConf.to_container(cfg.model, resolve=True)
    model_fields["vocab_size"] = tokenizer.vocab_size
    model_fields["max_seq_len"] = max(int(model_fields.get("max_seq_len") or 0), curriculum.max_seq_len)
    try:
        model_cfg = ModelConfig(**model_fields)
    except (TypeError, ValueError) as exc:
        raise ConfigValueError(f"{exc} (set in the model config group: conf/model/, or model.<field>=...)") from exc
    model = HybridLM(model_cfg)
    num_params = model.num_params()

    provenance = collect_provenance(Path(__file__).resolve().parent.parent)
    run_meta = {
        "run_id": run_id,
        "wandb_run_id": wandb_run_id,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "provenance": provenance,
        "num_params": num_params,
        "impl": model.impls() if hasattr(model, "impls") else str(model_cfg.impl),
    }
    module = LMTrainingModule(
        model,
        optim=OptimSettings(
            lr=float(cfg.optim.lr),
            weight_decay=float(cfg.optim.weight_decay),
            betas=tuple(float(b) for b in cfg.optim.betas),
            eps=float(cfg.optim.eps),
            warmup_steps=int(cfg.optim.warmup_steps),
            min_lr_ratio=float(cfg.optim.min_lr_ratio),
            entropy_coef=float(cfg.optim.entropy_coef),
        ),
        max_steps=int(cfg.trainer.max_steps),
        token_bytes=_token_bytes(tokenizer),
        faults=FaultSettings(**OmegaConf.to_container(cfg.faults, resolve=True)),
        run_meta=run_meta,
    )

    # --- loggers and callbacks ---
    resume_step = int(previous.get("step", 0)) if cfg.resume else None
    loggers: list[Any] = [CSVMetricsLogger(run_dir, resume_step=resume_step)]
    mode = wandb_mode(cfg.logger.wandb.mode) if cfg.logger.wandb.enabled else "disabled"
    if mode != "disabled":
        loggers.append(
            make_wandb_logger(
                run_dir,
                project=cfg.logger.wandb.project,
                entity=cfg.logger.wandb.entity,
                name=f"{cfg.name}-{run_id}",
                group=_wandb_group(cfg, hydra_cfg, multirun),
                tags=list(cfg.tags) + list(hydra_cfg.overrides.task),
                job_type=cfg.logger.wandb.job_type,
                config=run_meta["config"],
                run_id=wandb_run_id,
                mode=mode,
            )
        )
    ckpt_cfg = cfg.callbacks.checkpoint
    checkpointer = CheckpointCallback(ckpt_dir, int(ckpt_cfg.every_n_steps), int(ckpt_cfg.keep))
    throughput = ThroughputCallback(
        int(cfg.callbacks.throughput.every_n_steps),
        count_flops_params(model),
        cfg.callbacks.throughput.peak_flops,
        str(cfg.trainer.precision),
    )
    callbacks: list[Any] = [checkpointer, throughput]
    diagnostics = cfg.get("diagnostics")
    if diagnostics is not None and diagnostics.get("enabled", False):
        from groundthink.training.diagnostics import build_diagnostics

        callbacks += build_diagnostics(OmegaConf.to_container(diagnostics, resolve=True), model)
    if cfg.callbacks.progress_bar:
        from lightning.pytorch.callbacks import TQDMProgressBar

        callbacks.append(TQDMProgressBar(refresh_rate=max(1, int(cfg.trainer.log_every_n_steps))))

    trainer = L.Trainer(
        max_steps=int(cfg.trainer.max_steps),
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        strategy=cfg.trainer.strategy,
        precision=cfg.trainer.precision,
        deterministic=bool(cfg.trainer.deterministic),
        gradient_clip_val=float(cfg.optim.grad_clip) if cfg.optim.grad_clip else None,
        accumulate_grad_batches=int(cfg.trainer.accumulate_grad_batches),
        val_check_interval=int(cfg.trainer.val_every_n_steps),
        check_val_every_n_epoch=None,
        limit_val_batches=int(cfg.data.val_batches),
        num_sanity_val_steps=0,
        log_every_n_steps=int(cfg.trainer.log_every_n_steps),
        logger=loggers,
        callbacks=callbacks,
        plugins=[SafetensorsCheckpointIO()],
        enable_checkpointing=False,
        enable_progress_bar=bool(cfg.callbacks.progress_bar),
        enable_model_summary=False,
        default_root_dir=str(run_dir),
    )

    print(
        f"GroundThink run {run_id}: {num_params / 1e6:.2f}M parameters, pattern {model_cfg.pattern!r} x "
        f"{model_cfg.n_layers} layers, tokenizer {tokenizer.kind} ({tokenizer.vocab_size} ids), "
        f"{sum(len(d) for d in train_ids) / 1e6:.2f}M training tokens -> {run_dir}",
        flush=True,
    )
    status, error, exit_exc = "completed", None, None
    t_fit = time.time()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_ckpt) if resume_ckpt else None)
        if checkpointer.interrupted_by:
            status = "interrupted"
    except NonFiniteLossError as exc:
        status, error, exit_exc = "failed", str(exc), exc
    except CheckpointError as exc:
        status, error, exit_exc = "failed", str(exc), exc
    except BaseException as exc:  # noqa: BLE001 - recorded in summary.json, then re-raised below
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exc, SIGTERMException):
            status = "interrupted"
        else:
            status, error, exit_exc = "failed", f"{type(exc).__name__}: {exc}", exc
    finally:
        for lg in loggers:
            if hasattr(lg, "finalize"):
                lg.finalize("success" if status == "completed" else status)
        if mode != "disabled":
            finish_wandb(status_ok=status == "completed")

    wall = time.time() - t_fit
    step, tokens_per_s = trainer.global_step, throughput.tokens_per_s
    if _ran_in_spawned_workers(trainer):
        step, tokens_per_s = _rank_zero_results(run_dir, ckpt_dir)
    summary = _write_summary(
        run_dir,
        status=status,
        error=error,
        step=step,
        metrics_csv=run_dir / "metrics.csv",
        num_params=num_params,
        tokens_per_s=tokens_per_s,
        wall_s=wall,
        run_id=run_id,
        wandb_run_id=wandb_run_id if mode != "disabled" else None,
        startup_s=(throughput.first_step_time - t_command) if throughput.first_step_time else None,
    )
    _print_closing(summary, run_dir, cfg, mode)
    gate_exit = 0
    if cfg.get("gate") is not None and status != "interrupted":
        from groundthink.gates.runner import finish_gate_run

        gate_exit = finish_gate_run(
            OmegaConf.to_container(cfg.gate, resolve=True),
            run_dir,
            summary=summary,
            model=model,
            tokenizer=tokenizer,
            val_texts=val_texts,
        )
    if exit_exc is not None:
        if multirun:
            raise exit_exc
        raise UserError(error)
    if status == "interrupted":
        raise SystemExit(130 if checkpointer.interrupted_by == "SIGINT" else 143)
    if gate_exit:
        if multirun:
            raise GateFailed(f"gate {cfg.gate.get('name')} FAILED; see {run_dir / 'gates.json'}")
        raise SystemExit(gate_exit)
    return summary


class _DropLightningAds(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage() and "LitLogger" not in record.getMessage()


def _quiet_lightning_logging() -> None:
    """One copy of each Lightning message (through Hydra's console + train.log handlers), without the ads."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
        if not any(isinstance(f, _DropLightningAds) for f in logger.filters):
            logger.addFilter(_DropLightningAds())
    # Device banners ("GPU available: False ...") and "fit stopped": the closing summary says what matters.
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def _wandb_group(cfg: DictConfig, hydra_cfg: Any, multirun: bool) -> str:
    if multirun:
        sweep_dir = Path(str(hydra_cfg.sweep.dir))
        return f"{cfg.name}-{sweep_dir.name}"
    return str(cfg.name)


def _ran_in_spawned_workers(trainer: Any) -> bool:
    """True for `ddp_spawn`: the loop ran in child processes, and this process got back only the weights."""
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    return isinstance(launcher, _MultiProcessingLauncher) and trainer.world_size > 1


def _rank_zero_results(run_dir: Path, ckpt_dir: Path) -> tuple[int, float | None]:
    """The step and mean tokens/s that rank 0 recorded (its last checkpoint's sidecar and metrics.csv)."""
    from groundthink.training.metrics_logger import read_metrics_csv

    sidecar = ckpt_dir / "last.json"
    step = int(json.loads(sidecar.read_text()).get("step", 0)) if sidecar.exists() else 0
    series = read_metrics_csv(run_dir / "metrics.csv").get("perf/tokens_per_s", []) if (
        run_dir / "metrics.csv").exists() else []
    values = [v for _, v in series if v is not None and not math.isnan(v)]
    return step, (sum(values) / len(values) if values else None)


def _write_summary(run_dir: Path, *, metrics_csv: Path, **fields: Any) -> dict[str, Any]:
    from groundthink.training.metrics_logger import read_metrics_csv

    final: dict[str, float] = {}
    best: dict[str, float] = {}
    if metrics_csv.exists():
        for name, series in read_metrics_csv(metrics_csv).items():
            values = [v for _, v in series if v is not None and not math.isnan(v)]
            if values:
                final[name] = values[-1]
                if name.endswith("loss") or name.endswith("bpb") or name.endswith("ppl"):
                    best[name] = min(values)
    summary = {**fields, "final": final, "best": best}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _print_closing(summary: dict[str, Any], run_dir: Path, cfg: DictConfig, mode: str) -> None:
    final = summary["final"]
    lines = [f"\n=== GroundThink run {summary['run_id']}: {summary['status']} at step {summary['step']} ==="]
    if summary.get("error"):
        lines.append(f"error: {summary['error']}")
    if "val/loss" in final:
        bpb = final.get("val/bpb")
        lines.append(f"val loss {final['val/loss']:.4f}" + (f"   bits/byte {bpb:.4f}" if bpb is not None else ""))
    if summary.get("tokens_per_s"):
        lines.append(f"throughput {summary['tokens_per_s']:.0f} tokens/s   wall {summary['wall_s']:.1f} s")
    if summary.get("startup_s") is not None:
        lines.append(f"command to first step {summary['startup_s']:.1f} s")
    lines.append(f"outputs  {run_dir}  (config.yaml, metrics.csv, checkpoints/, tokenizer/, summary.json)")
    lines.append(f"resume   groundthink-train resume={run_dir} trainer.max_steps=<more steps>")
    if mode == "offline":
        lines.append(f"W&B      offline; upload with: wandb sync {run_dir}/wandb/offline-run-*")
    print("\n".join(lines), flush=True)


# ----------------------------------------------------------------------------------------------------------------
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_entry(cfg: DictConfig) -> Any:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from groundthink.data.errors import DataError
    from groundthink.training.checkpoint import CheckpointError
    from groundthink.training.rundir import RunDirError

    try:
        summary = train(cfg)
    except (UserError, DataError, RunDirError, CheckpointError, ConfigValueError) as exc:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        print(f"\nError: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    return summary.get("final", {}).get("val/loss")


def main() -> None:
    """Console entry point; adds 'did you mean' hints to Hydra's unknown-key errors."""
    os.environ.setdefault("GROUNDTHINK_T0", str(time.time()))
    from groundthink.cli_checks import explain_override_errors
    from groundthink.training.rundir import ensure_writable

    # Hydra creates the run folder before any of our code runs: check the output root first.
    root = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("paths.output_root=")), None)
    try:
        ensure_writable(Path(root or os.environ.get("GROUNDTHINK_OUTPUT_ROOT", "outputs")))
    except Exception as exc:  # noqa: BLE001 - printed as a user-facing error
        print(f"Error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None

    if any(a.startswith("resume=") and a != "resume=null" for a in sys.argv[1:]):
        # The original run's .hydra/ (its overrides) stays as it was; this invocation's goes beside it.
        sys.argv.append(f"hydra.output_subdir=.hydra/resume-{_PROCESS_TIME}")
    if not any(a in ("-cd", "--config-dir") or a.startswith("--config-dir=") for a in sys.argv[1:]):
        sys.argv[1:1] = ["--config-dir", SWEEPS_DIR]
    try:
        _hydra_entry()
    except SystemExit as exc:
        if exc.code not in (0, None):
            explain_override_errors(sys.argv[1:], CONF_DIR)
        raise


if __name__ == "__main__":
    main()
