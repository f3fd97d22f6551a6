"""What several test files share: the tiny model config, the environment and runner of real-CLI subprocesses, and
an in-process training run built from the same assembly functions as `groundthink-train`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parent.parent
# Overrides that make a real-CLI training run a few seconds long (the tiny model, 20 steps, one thread).
FAST = ["debug=fast", "trainer.num_threads=1"]
# Diagnostics every 5 steps, for in-process runs.
EVERY_5 = {"enabled": True, "grad_norms": {"every_n_steps": 5}, "state": {"every_n_steps": 5},
           "entropy": {"every_n_steps": 5}}


def tiny_config(**changes):
    """A 3-layer, 32-wide model with small chunks and windows, so odd lengths and chunk boundaries are exercised.
    Flat mixer fields in `changes` (n_heads, d_state, attn_window, ...) are accepted as ModelConfig.from_dict does."""
    from groundthink.models import ModelConfig

    fields = dict(
        vocab_size=40,
        d_model=32,
        n_layers=3,
        ffn_mult=2.0,
        impl="chunked",
        state_norm_interval=5,
        mixers={
            "rwkv6": {"n_heads": 2, "chunk_size": 8},
            "mamba2": {"d_state": 8, "head_dim": 16, "chunk_size": 8},
            "attention": {"n_heads": 2, "window": 6},
        },
    )
    return ModelConfig.from_dict(fields).replace(**changes)


def cli_env(root: Path, **extra: str) -> dict[str, str]:
    """The environment of a real-CLI test run: W&B offline, no hub access, outputs under `root`."""
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               GROUNDTHINK_OUTPUT_ROOT=str(root / "outputs"))
    # A W&B run started in this pytest process leaves its service's address here; a child that inherits it shares
    # that service, which then refuses a resumed run's id while the killed run's stream is still open in it.
    env.pop("WANDB_SERVICE", None)
    env.update(extra)
    return env


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """`make test` runs the suite on 2 pytest-xdist workers (--dist loadgroup). A test that uses a module- or
    session-scoped fixture (a trained run, a server, a sweep) joins its module's group, so that fixture is built once
    in one worker; every other test is scheduled on its own."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        defs = info.name2fixturedefs.values() if info else ()
        if any(d[-1].scope in ("module", "package", "session") for d in defs if d):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


@pytest.fixture(autouse=True)
def _ieee_fp32_dots_on_gpu(request, monkeypatch):
    """GPU tests (marker gpu) compile Triton kernels with IEEE fp32 dots. Triton's fp32 tl.dot defaults to TF32 on
    NVIDIA GPUs (10-bit mantissa, ~5e-4 relative rounding per operand), of the order of the parity tolerances by
    itself; parity is about the algorithm (Triton reads TRITON_F32_DEFAULT at compile time). The torch side is IEEE
    already (torch.backends.cuda.matmul.allow_tf32 is off by default)."""
    if request.node.get_closest_marker("gpu") is not None:
        monkeypatch.setenv("TRITON_F32_DEFAULT", "ieee")


@pytest.fixture(autouse=True)
def _no_shared_wandb_service():
    """Subprocesses that tests start with os.environ must not attach to a W&B service of this process (cli_env)."""
    yield
    os.environ.pop("WANDB_SERVICE", None)


def run_cli(root: Path, module: str, *args: str, expect_rc: int | None = 0, timeout: int = 900,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` in `root`; asserts the exit code unless expect_rc is None."""
    root.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=root, env=env or cli_env(root),
                          capture_output=True, text=True, timeout=timeout)
    if expect_rc is not None and proc.returncode != expect_rc:
        raise AssertionError(f"{module} exit {proc.returncode} (expected {expect_rc})\n"
                             f"STDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}")
    return proc


def run_train(root: Path, *args: str, expect_rc: int | None = 0, fast: bool = True) -> subprocess.CompletedProcess:
    """groundthink-train with FAST (unless fast=False) and `args`; Hydra's flags (-m, -cn NAME) go first."""
    flags, overrides, args = [], [], list(args)
    while args:
        arg = args.pop(0)
        if arg in ("-cn", "--config-name", "-cd", "--config-dir"):
            flags += [arg, args.pop(0)]
        elif arg.startswith("-"):
            flags.append(arg)
        else:
            overrides.append(arg)
    return run_cli(root, "groundthink.train", *flags, *(FAST if fast else []), *overrides, expect_rc=expect_rc)


def read_column(run_dir: Path, column: str = "train/loss") -> dict[int, float]:
    """{step: value} of one column of a run's metrics.csv (rows where it is empty left out)."""
    import csv

    with open(run_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r[column]) for r in csv.DictReader(f) if r.get(column)}


def eval_metrics(run_dir: Path, task: str, *, short: bool = False) -> dict[str, float]:
    """The metrics groundthink-eval wrote for `task` of a run (eval/<task>/result.json); short=True drops the
    "eval/<task>/" prefix of each name."""
    metrics = json.loads((run_dir / "eval" / task / "result.json").read_text())["metrics"]
    return {k.rsplit("/", 1)[1]: v for k, v in metrics.items()} if short else metrics


def run_dirs(root: Path, name: str = "default") -> list[Path]:
    folder = root / "outputs" / name
    return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def sample_texts() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)][:60]


def train_in_process(run_dir: Path, *, steps: int = 40, lr: float = 3e-3, pattern: str = "H", init: str = "official",
                     seed: int = 0, diagnostics: dict | None = EVERY_5, nan_at_step: int | None = None,
                     batch_size: int = 4, seq_len: int = 32, callbacks: list | None = None,
                     model=None) -> SimpleNamespace:
    """Train the tiny preset on 50 language-reference topics with the real callbacks and Trainer assembly, and
    write a run folder as groundthink-train does (config.yaml with the keys the gates read, metrics.csv,
    summary.json, checkpoints/last)."""
    import lightning as L
    import torch
    import yaml

    from groundthink.data.sources import PreparedData
    from groundthink.data.stream import TBPTTStream, encode_documents
    from groundthink.data.tokenizer import build_tokenizer
    from groundthink.models import HybridLM
    from groundthink.models.presets import preset
    from groundthink.training import assembly
    from groundthink.training.callbacks import count_flops_params
    from groundthink.training.datamodule import TBPTTDataModule
    from groundthink.training.diagnostics import build_diagnostics
    from groundthink.training.metrics_logger import CSVMetricsLogger
    from groundthink.training.module import LMTrainingModule, NonFiniteLossError
    from groundthink.training.schedules import Curriculum
    from groundthink.training.settings import (
        CallbackSettings,
        CheckpointSettings,
        FaultSettings,
        OptimSettings,
        TrainerSettings,
    )

    torch.set_num_threads(1)
    L.seed_everything(seed, verbose=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer("char")
    texts = sample_texts()
    train_ids, val_texts = encode_documents(tokenizer, texts[:50]), texts[50:]
    val_stream = TBPTTStream(encode_documents(tokenizer, val_texts), batch_size=batch_size, pad_id=tokenizer.pad_id)
    token_bytes = torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.float32)
    data = PreparedData(
        tokenizer=tokenizer, vocab_size=tokenizer.vocab_size,
        make_train_stream=lambda rank, world: TBPTTStream(train_ids, batch_size=batch_size,
                                                          pad_id=tokenizer.pad_id, seed=seed),
        val_batches=val_stream.validation_batches(seq_len, 2), token_bytes=token_bytes, val_texts=val_texts,
        pad_id=tokenizer.pad_id,
    )
    model = model or HybridLM(preset("tiny", vocab_size=tokenizer.vocab_size, pattern=pattern, init=init))
    trainer_s = TrainerSettings(max_steps=steps, val_every_n_steps=10, log_every_n_steps=5)
    optim = OptimSettings(lr=lr, warmup_steps=5)
    module = LMTrainingModule(model, optim=optim, max_steps=steps, token_bytes=token_bytes,
                              faults=FaultSettings(nan_at_step=nan_at_step))
    config = {
        "seed": seed,
        "trainer": {"max_steps": steps},
        "data": {"source": "embedded", "max_documents": 60, "val_fraction": 0.05, "batch_size": batch_size,
                 "seq_len": seq_len},
        "tokenizer": {"kind": "char", "vocab_size": None},
        "model": {"pattern": pattern, "init": init},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    logger = CSVMetricsLogger(run_dir)
    built = assembly.build_callbacks(
        CallbackSettings(checkpoint=CheckpointSettings(every_n_steps=0), progress_bar=False), trainer_s,
        FaultSettings(), checkpoint_dir=run_dir / "checkpoints", val_batches=data.val_batches,
        diagnostics=build_diagnostics(diagnostics, model) if diagnostics else [],
        flops_params=count_flops_params(model))
    trainer = assembly.build_trainer(trainer_s, optim, loggers=[logger], callbacks=built["all"] + list(callbacks or []),
                                     run_dir=run_dir, progress_bar=False)
    status, error = "completed", None
    try:
        trainer.fit(module, datamodule=TBPTTDataModule(data, curriculum=Curriculum([], seq_len)))
    except NonFiniteLossError as exc:
        status, error = "failed", str(exc)
    logger.finalize(status)
    summary = {"status": status, "error": error, "step": trainer.global_step}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return SimpleNamespace(run_dir=run_dir, model=model, tokenizer=tokenizer, val_texts=val_texts, summary=summary,
                           module=module, trainer=trainer)
