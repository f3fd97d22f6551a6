"""Cost of the training diagnostics on training-step time: `python -m benchmarks.bench_diagnostics [--quick]`.

Trains the default run's shape (preset `small`, batch 16 x 128 tokens of the embedded corpus, fp32, AdamW, clip
1.0) in process with Lightning, three ways, interleaved over repeats so machine noise hits all alike:
- off: no diagnostic callback;
- every 5: conf/diagnostics/default.yaml's settings with every diagnostic every 5 steps, which gives many
  measured steps: extra cost of one measured step = median measured-step time - median other-step time;
- full: conf/diagnostics/full.yaml (everything every 10 steps, all lanes), timed directly against off.
Step time = the interval between successive `on_train_batch_start` calls (it includes the previous step's
callbacks). The overhead of the default schedule (every 50) is the extra cost of one measured step / (50 x the
median step time off). Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.starts: list[tuple[int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append((trainer.global_step, time.perf_counter()))

    def durations(self) -> dict[int, float]:
        """{step: seconds from its start to the next step's start} (the last step has no end; dropped)."""
        return {s: t1 - t0 for (s, t0), (_, t1) in zip(self.starts, self.starts[1:])}


def load_diagnostics(name: str) -> dict:
    cfg = yaml.safe_load((REPO / "conf" / "diagnostics" / f"{name}.yaml").read_text())
    if cfg.pop("defaults", None):
        base = load_diagnostics("default")
        for key, value in cfg.items():
            base[key] = {**base[key], **value} if isinstance(value, dict) else value
        cfg = base
    return cfg


def run(datamodule_args, model_name: str, steps: int, diagnostics: dict | None, tokenizer) -> dict[int, float]:
    from groundthink.models import HybridLM
    from groundthink.models.presets import preset
    from groundthink.training.datamodule import TBPTTDataModule
    from groundthink.training.diagnostics import build_diagnostics
    from groundthink.training.metrics_logger import CSVMetricsLogger
    from groundthink.training.module import LMTrainingModule, OptimSettings

    L.seed_everything(0, verbose=False)
    model = HybridLM(preset(model_name, vocab_size=tokenizer.vocab_size))
    module = LMTrainingModule(model, optim=OptimSettings(), max_steps=steps,
                              token_bytes=torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.float32))
    timer = StepTimer()
    callbacks = [timer] + (build_diagnostics(diagnostics, model) if diagnostics else [])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            max_steps=steps, accelerator="cpu", precision="32-true", logger=[CSVMetricsLogger(tmp)],
            callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=10,
            gradient_clip_val=1.0,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, datamodule=TBPTTDataModule(**datamodule_args))
    return timer.durations()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from groundthink.data.corpus import load_documents, split_documents
    from groundthink.data.stream import encode_documents
    from groundthink.data.tokenizer import build_tokenizer
    from groundthink.training.schedules import Curriculum

    model_name, batch, seq = ("tiny", 4, 32) if args.quick else ("small", 16, 128)
    steps = 20 if args.quick else args.steps
    tokenizer = build_tokenizer("char")
    train_texts, val_texts = split_documents(load_documents("embedded"), 0.05, seed=0)
    datamodule_args = dict(train_docs=encode_documents(tokenizer, train_texts),
                           val_docs=encode_documents(tokenizer, val_texts), batch_size=batch,
                           curriculum=Curriculum([], seq), val_seq_len=seq, val_batches=1, pad_id=tokenizer.pad_id,
                           seed=0)
    default = load_diagnostics("default")
    every5 = {**default, **{k: {**default[k], "every_n_steps": 5} for k in ("grad_norms", "state", "entropy")}}
    configs = {"off": None, "every 5": every5, "full": load_diagnostics("full")}
    times: dict[str, dict[int, list[float]]] = {name: {} for name in configs}
    for repeat in range(args.repeats):
        for name, diag in configs.items():
            for step, seconds in run(datamodule_args, model_name, steps, diag, tokenizer).items():
                if step >= 2:  # the first steps warm up allocators and caches
                    times[name].setdefault(step, []).append(seconds)
            print(f"repeat {repeat + 1}/{args.repeats}: {name} done", flush=True)

    def median(name: str, due_every: int | None = None, due: bool = True) -> float:
        values = [v for s, vs in times[name].items() for v in vs
                  if due_every is None or (((s + 1) % due_every == 0) == due)]
        return statistics.median(values)

    base = median("off")
    every = int(default["grad_norms"]["every_n_steps"])
    print(f"\ndiagnostics overhead: preset {model_name}, batch {batch} x {seq}, {args.threads} threads, "
          f"{steps} steps x {args.repeats} repeats per config")
    print(f"  median step, diagnostics off              {base * 1e3:8.1f} ms")
    for name, period in (("every 5", 5), ("full", 10)):
        measured, other = median(name, period, True), median(name, period, False)
        extra = measured - other
        print(f"  {name:<8} median measured step {measured * 1e3:8.1f} ms, other steps {other * 1e3:8.1f} ms: "
              f"+{extra * 1e3:.1f} ms per measured step")
        if name == "every 5":
            print(f"  -> default schedule (every {every}, default.yaml settings): overhead "
                  f"{extra / (every * base):.2%} of training-step time")
        else:
            print(f"  -> full.yaml (every 10, all lanes): overhead {extra / (10 * base):.2%} of training-step time")
    # Direct check, robust to machine noise: mean step time with steps over 5x the median dropped (load spikes
    # from other processes, far above any diagnostic cost).
    for name in ("every 5", "full"):
        ratio = _trimmed_mean(times[name]) / _trimmed_mean(times["off"]) - 1
        print(f"  direct: mean step {name} vs off {ratio:+.1%}")


def _trimmed_mean(by_step: dict[int, list[float]]) -> float:
    values = [v for vs in by_step.values() for v in vs]
    cut = 5 * statistics.median(values)
    return statistics.fmean(v for v in values if v <= cut)

if __name__ == "__main__":
    main()
