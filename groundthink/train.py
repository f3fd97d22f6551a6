"""`groundthink-train`: the Hydra entry point that trains one configured hybrid LM (or a sweep of them with -m).

This is wiring: it turns the composed config into typed settings objects (the schema: groundthink/schema.py), hands
each package the settings it owns (data -> groundthink.data.sources, model -> groundthink.models, the rest ->
groundthink.training), and leaves the run folder's lifecycle to groundthink.training.run. Examples:

    groundthink-train                                   # the default run: a small hybrid on the embedded corpus
    groundthink-train model=8m model.alpha=0.5 trainer.max_steps=2000
    groundthink-train resume=outputs/default/2026-11-24_07-00-00_1a2b3c4d
    groundthink-train -m model.gamma_init=0.01,1.0 seed=1,2
"""

from __future__ import annotations

import gc
import logging
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from groundthink import schema
from groundthink.hydra_support import Job, current_job, register_resolvers, resume_config, run_entry
from groundthink.quant.stage import SteSettings
from groundthink.training.errors import NothingToTrain, UserError

log = logging.getLogger("groundthink")
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
register_resolvers()
schema.register()


def _structured(cls: type, node: Any, where: str) -> Any:
    """`node` (a group of the config) as an instance of its settings dataclass, type-checked by OmegaConf. A key the
    dataclass lacks whose value is null is dropped: configs saved by earlier versions listed unused keys as null."""
    plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    known = {f for f in cls.__dataclass_fields__}
    plain = {k: v for k, v in plain.items() if k in known or v is not None}
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), plain))
    except Exception as exc:  # OmegaConf's errors name the key and the expected type
        raise UserError(f"{where}: {exc}") from None


def settings_of(cfg: DictConfig) -> dict[str, Any]:
    """Every group of the config as its typed settings (also for a resumed run's saved, plain config.yaml)."""
    from groundthink.data.sources import DATA_SOURCES
    from groundthink.models import ModelConfig

    source = cfg.data.get("source")
    if source not in DATA_SOURCES:
        raise UserError(f"data.source={source!r} is not a data source; registered: {sorted(DATA_SOURCES)}")
    groups = {name: _structured(type(f.default_factory()), cfg[name], name)
              for name, f in schema.TrainConfig.__dataclass_fields__.items()
              if name in ("tokenizer", "optim", "trainer", "logger", "callbacks", "diagnostics", "faults")}
    groups["data"] = _structured(DATA_SOURCES[source].Settings, cfg.data, "data")
    try:
        groups["model"] = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    except (TypeError, ValueError) as exc:
        raise UserError(f"{exc} (set in the model config group: conf/model/, or model.<field>=...)") from None
    groups["gate"] = OmegaConf.to_container(cfg.gate, resolve=True) if cfg.get("gate") is not None else None
    groups["ste"] = _structured(SteSettings, cfg.get("ste") or {}, "ste")  # stage=ste (groundthink/quant)
    return groups


def train(cfg: DictConfig, job: Job) -> dict[str, Any]:
    """Train one run; returns its summary (also written to summary.json)."""
    from groundthink.training.run import discard_unstarted_run

    resume = bool(cfg.resume)
    try:  # everything up to the first step: a failure here leaves no run folder behind (single runs)
        run = _prepare(cfg, job)
    except BaseException:
        if not job.multirun and not resume:
            discard_unstarted_run(job.run_dir)
        raise
    _end_startup_gc()
    return _fit(job, run)


def _prepare(cfg: DictConfig, job: Job) -> SimpleNamespace:
    """Settings, run folder, data, model, module, loggers, callbacks, Trainer: everything before the first step."""
    if cfg.resume:
        cfg = resume_config(cfg, job)
    s = settings_of(cfg)
    if cfg.get("stage") == "rl":  # REINFORCE from a trained run: its own module and callbacks (groundthink/rl/)
        from groundthink.rl.stage import prepare

        return prepare(cfg, job, s)
    if s["gate"] is not None:
        from groundthink.gates import check_gate_config

        try:  # a bad gate block fails now, not after the training it would judge
            check_gate_config(s["gate"], s["diagnostics"])
        except ValueError as exc:
            raise UserError(str(exc)) from None

    from groundthink.training.callbacks import check_early_stop

    try:  # a mistyped early-stop rule fails now, not silently at the first validation
        check_early_stop(s["callbacks"].early_stop, s["trainer"].val_every_n_steps)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if cfg.get("stage") == "ste":  # a bad layer selection or scale fails now, before any data or model
        from groundthink.quant.stage import check_settings

        try:
            check_settings(s["ste"])
        except ValueError as exc:
            raise UserError(str(exc)) from None

    if s["logger"].wandb.enabled:  # W&B's service process starts while Lightning is imported (wandb_setup.py)
        from groundthink.training.wandb_setup import start_service_early

        start_service_early(s["logger"].wandb.mode)
    import lightning as L

    from groundthink.training.console import quiet_lightning

    quiet_lightning()
    from groundthink.data.sources import prepare_data
    from groundthink.models import HybridLM
    from groundthink.training import assembly, lineage
    from groundthink.training.callbacks import count_flops_params
    from groundthink.training.datamodule import TBPTTDataModule
    from groundthink.training.diagnostics import build_diagnostics
    from groundthink.training.module import LMTrainingModule
    from groundthink.training.provenance import collect_provenance
    from groundthink.training.run import RunFolder
    from groundthink.training.schedules import Curriculum

    trainer_s, optim_s, logger_s = s["trainer"], s["optim"], s["logger"]
    folder = RunFolder(job.run_dir, resume=bool(cfg.resume),
                       budget=("trainer.max_steps", trainer_s.max_steps, trainer_s.max_steps))
    folder.write_config(OmegaConf.to_yaml(cfg, resolve=True))
    assembly.apply_host_settings(trainer_s)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    init_from = lineage.required(cfg)  # the parent (stage=sft): strict shape/vocabulary checks before any step
    parent = init_from and lineage.load_parent(init_from, s["tokenizer"], folder.tokenizer_dir, resume=folder.resume)
    data = prepare_data(s["data"], s["tokenizer"], seed=int(cfg.seed), tokenizer_dir=folder.tokenizer_dir,
                        reuse_tokenizer=folder.resume or bool(parent))
    try:
        check_early_stop(s["callbacks"].early_stop, trainer_s.val_every_n_steps, has_val_batches=bool(data.val_batches))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    model = HybridLM(s["model"].replace(vocab_size=data.vocab_size))
    lineage_fields = {"parent": lineage.init_weights(model, parent, init_from)} if parent else {}
    ste = s["ste"] if cfg.get("stage") == "ste" else None
    if ste is not None:  # ternary layers over the parent's weights (the latent weights stay the checkpoint's)
        from groundthink.quant.stage import quantise_model

        try:
            quantise_model(model, ste)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    if trainer_s.compile:
        try:
            assembly.compile_blocks(model, trace_ops=trainer_s.compile_ops)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    config = OmegaConf.to_container(cfg, resolve=True)
    config["model"]["vocab_size"] = model.cfg.vocab_size  # the data's vocabulary (BPE, data=mqar), not the group's
    run_meta = {"run_id": folder.run_id, "wandb_run_id": folder.wandb_run_id, "config": config,
                "provenance": collect_provenance(), "num_params": model.num_params(), "impl": model.impls(),
                **lineage_fields}
    module = LMTrainingModule(model, optim=optim_s, max_steps=trainer_s.max_steps,
                              token_bytes=data.token_bytes, faults=s["faults"], run_meta=run_meta,
                              val_accuracy=data.accuracy)
    loggers, wandb_record = assembly.build_loggers(folder, logger_s, name=f"{cfg.name}-{folder.run_id}",
                                                   group=job.group, tags=list(cfg.tags) + job.overrides,
                                                   config=config)
    callbacks = assembly.build_callbacks(
        s["callbacks"], trainer_s, s["faults"], checkpoint_dir=folder.checkpoints, val_batches=data.val_batches,
        diagnostics=build_diagnostics(s["diagnostics"], model), flops_params=count_flops_params(model))
    if ste is not None and ste.eval_ptq:
        from groundthink.quant.stage import ptq_report

        callbacks["all"].append(ptq_report(data.val_batches))
    trainer = assembly.build_trainer(trainer_s, optim_s, loggers=loggers, callbacks=callbacks["all"],
                                     run_dir=folder.path, progress_bar=s["callbacks"].progress_bar)
    datamodule = TBPTTDataModule(data, curriculum=Curriculum(s["data"].curriculum, s["data"].seq_len),
                                 accumulate_grad_batches=trainer_s.accumulate_grad_batches)
    extra = {**lineage_fields, **({"data_stats": data.stats} if data.stats else {})}  # summary.json additions
    return SimpleNamespace(s=s, folder=folder, data=data, model=model, module=module, loggers=loggers, extra=extra,
                           callbacks=callbacks, trainer=trainer, datamodule=datamodule, wandb_record=wandb_record,
                           ste=ste)


def _fit(job: Job, run: SimpleNamespace) -> dict[str, Any]:
    """Train, then the summary, the closing lines, the gate verdict and the exit (groundthink.training.run)."""
    from groundthink.training.run import closing_lines, exit_for, fit_run

    s, folder, model, wandb_record = run.s, run.folder, run.model, run.wandb_record
    log.info(f"GroundThink run {folder.run_id}: {model.num_params() / 1e6:.2f}M parameters, pattern "
             f"{model.cfg.pattern!r} x {model.cfg.n_layers} layers, {run.data.description} -> {folder.path}")
    outcome = fit_run(run.trainer, run.module, run.datamodule, folder, loggers=run.loggers,
                      checkpointing=run.callbacks["checkpointing"], throughput=run.callbacks["throughput"],
                      wandb_on=wandb_record is not None, job_start=job.started,
                      summary_fields={"num_params": model.num_params(), "wandb": wandb_record,
                                      "state_size": model.state_sizes(seq_len=s["data"].seq_len), **run.extra})
    lines = closing_lines(outcome, folder, precision=s["trainer"].precision,
                          wandb_mode=wandb_record["mode"] if wandb_record else "disabled", multirun=job.multirun)
    if run.ste is not None and outcome.status == "completed" and run.trainer.is_global_zero:
        from groundthink.quant.stage import finish

        lines += finish(folder.path, outcome.summary, run.ste)  # the three losses, the packed export
    log.info("\n".join(lines))
    gate_exit = 0
    if s["gate"] is not None and outcome.status != "interrupted" and run.trainer.is_global_zero:
        from groundthink.gates import finish_gate_run

        gate_exit = finish_gate_run(s["gate"], folder.path, summary=outcome.summary, model=model,
                                    tokenizer=run.data.tokenizer, val_texts=run.data.val_texts)
    exit_for(outcome, multirun=job.multirun, gate_exit=gate_exit, gate_name=(s["gate"] or {}).get("name"),
             run_dir=folder.path)
    return outcome.summary


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_entry(cfg: DictConfig) -> Any:
    from groundthink.data.errors import DataError
    from groundthink.training.checkpoint import CheckpointError
    from groundthink.training.rundir import RunDirError

    logging.captureWarnings(True)
    job = current_job(str(cfg.name))
    if job.multirun:  # the jobs of a sweep may share this process: no job's objects are frozen (_end_startup_gc)
        import groundthink.training.run  # noqa: F401 - the training stack (Lightning), with the collector paused

        _end_startup_gc()
    try:
        summary = train(cfg, job)
    except NothingToTrain as exc:  # resume= of a finished run: say so, change nothing, exit 0
        log.info(f"\n{exc}")
        return None
    except (UserError, DataError, RunDirError, CheckpointError) as exc:
        if job.multirun:
            raise
        log.error(f"\nError: {exc}")
        raise SystemExit(1) from None
    return summary.get("final", {}).get("val/loss")


_startup_gc_paused = False


def _end_startup_gc() -> None:
    """Turn the cyclic garbage collector back on after main() paused it for the start-up.

    Start-up (Hydra's composition, importing torch and Lightning with their dependencies, preparing the data) makes
    millions of long-lived objects and little garbage, and the collector would traverse them again and again: ~1 s
    of a 2-core machine's start-up. What exists when it ends is frozen (gc.freeze: out of the collector's sight, so
    the first collections afterwards do not traverse it either; the little cyclic garbage among it stays until the
    process ends). A single run ends its start-up before the first step; a sweep, whose jobs may share this process,
    once the training stack is imported, before its first job builds anything. Refcounting frees everything else as
    always, and nothing a run computes depends on when the collector runs."""
    global _startup_gc_paused
    if _startup_gc_paused:
        _startup_gc_paused = False
        gc.freeze()
        gc.enable()


def main() -> None:
    """Console entry point (`groundthink-train`)."""
    global _startup_gc_paused
    if gc.isenabled():
        gc.disable()  # until the first step (_end_startup_gc)
        _startup_gc_paused = True
    try:
        run_entry(_hydra_entry, CONF_DIR)
    finally:  # the process ends now: spare the interpreter's shutdown a traversal of every object left (~1.5 s)
        _end_startup_gc()
        gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
