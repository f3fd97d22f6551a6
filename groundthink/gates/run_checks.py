"""Gates G3, G3.5, G3.6, G4, G5: checks of a finished training run, read from its folder.

Every value comes from the run folder (metrics.csv, summary.json, config.yaml) except G4's evaluation, which
runs the trained model. "Window" means the logged values at steps >= `from` x the last logged step of that metric.

- G3 (1k steps): `run_completed`; `loss_decreasing`: mean train/loss over the last `loss_window` share of its
  logged values divided by the mean over the first share, at most `max_loss_ratio`; `val_loss_decreasing`: the
  last val/loss below the first; `grad_norm_mean`: the mean of diag/grad_norm/total (before clipping) over the
  window `grad_norm_from`, inside `grad_norm_band`.
- G3.5 (state health): over the window `window_from`, the mean of each recurrent layer's diag/state/L<i>/<branch>
  cos, svd_top5 and saturation; the worst layer decides: cos < `max_cos`, svd_top5 > `min_svd_top5`,
  saturation < `max_saturation`.
- G3.6 (baseline): the candidate run against `baseline_run` (a run folder): same data and tokenizer config;
  val/loss at the last step both logged at most `max_val_loss_ratio` x the baseline's; not diverging (final
  val/loss at most (1 + `divergence_tolerance`) x its best, and finite); every logged RWKV/Mamba gradient ratio
  inside `grad_ratio_band` (the hybrid branches' diag/grad_ratio_<a>_<b>, e.g. rwkv/mamba); each component's mean
  gradient norm over the second half within `grad_ratio_band` of the baseline's.
- G4 (evaluation smoke): the suite `gate.eval.suite` (default suite_smoke, conf/eval/) runs through the
  groundthink-eval task registry on the trained model (results in <run>/eval/<task>/); its lm task reads the
  held-out texts with the gate's batch shape: `evaluation_runs` (lm ran), its perplexities and bits per byte
  finite, written to eval.json and metrics.csv (read back to check); `task/<name>`: every other task ran;
  `carried_state_helps` (reset / carried perplexity >= 1) is a warning.
- G5: `run_completed` and the final val/loss below `max_val_loss`; `threshold_informative` (warning): ln(vocab)
  exceeds the threshold, i.e. a uniform predictor would not already pass.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from groundthink.gates.registry import GateContext, register_gate
from groundthink.gates.report import Criterion, measured

Series = list[tuple[int, float]]


class RunData:
    """What a gate reads from a run folder (summary.json, config.yaml, metrics.csv), as `groundthink-compare` reads
    it (groundthink.reporting.runs.load_run); `summary` given in process replaces summary.json."""

    def __init__(self, run_dir: str | Path, summary: dict[str, Any] | None = None) -> None:
        from groundthink.reporting.runs import load_run

        self.run_dir = Path(run_dir)
        run = load_run(self.run_dir, self.run_dir)
        self.summary = summary or run.summary
        self.config = run.config or {}  # flattened: {"data.source": ..., ...}
        self.metrics: dict[str, Series] = run.series

    def series(self, name: str) -> Series:
        return self.metrics.get(name, [])

    def setting(self, dotted: str, default: Any = None) -> Any:
        """A config value by dotted key; a whole block comes back as its flattened {sub.key: value}."""
        if dotted in self.config:
            return self.config[dotted]
        prefix = dotted + "."
        block = {k[len(prefix):]: v for k, v in self.config.items() if k.startswith(prefix)}
        return block or default


def window(series: Series, start_fraction: float) -> Series:
    if not series:
        return []
    last = series[-1][0]
    return [(s, v) for s, v in series if s >= start_fraction * last]


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan


def _steps(series: Series) -> str:
    return f"step {series[0][0]}" if len(series) == 1 else f"steps {series[0][0]}-{series[-1][0]}"


def _not_measured(name: str, metric: str, threshold: Any, rule: str, how: str) -> Criterion:
    return Criterion(name, None, threshold, rule, False, f"{metric} was never logged in metrics.csv; {how}")


# ----- shared ----------------------------------------------------------------------------------------------------
def run_completed(run: RunData) -> Criterion:
    status = run.summary.get("status")
    step = run.summary.get("step")
    target = run.setting("trainer.max_steps")
    ok = status == "completed" and (target is None or step == target)
    evidence = f"status {status} at step {step} of trainer.max_steps={target}"
    if run.summary.get("error"):
        evidence += f"; error: {str(run.summary['error'])[:300]}"
    return Criterion("run_completed", status, "completed", "==", ok, evidence)


# ----- G3 --------------------------------------------------------------------------------------------------------
def training_criteria(run: RunData, th: dict[str, Any]) -> list[Criterion]:
    criteria = [run_completed(run)]
    losses = [(s, v) for s, v in run.series("train/loss")]
    if len(losses) < 2:
        criteria.append(Criterion("loss_decreasing", None, th["max_loss_ratio"], "<=", False,
                                  f"{len(losses)} train/loss values logged; need at least 2"))
    else:
        k = max(1, round(float(th["loss_window"]) * len(losses)))
        head, tail = losses[:k], losses[-k:]
        first, last = _mean([v for _, v in head]), _mean([v for _, v in tail])
        criteria.append(measured(
            "loss_decreasing", last / first if first else math.nan, "<=", float(th["max_loss_ratio"]),
            f"mean train/loss {first:.4f} over {_steps(head)} -> {last:.4f} over {_steps(tail)}",
        ))
    val = run.series("val/loss")
    if len(val) < 2:
        criteria.append(Criterion("val_loss_decreasing", val[-1][1] if val else None, "first val/loss", "<", False,
                                  f"{len(val)} val/loss values logged; need at least 2 (trainer.val_every_n_steps)"))
    else:
        criteria.append(measured("val_loss_decreasing", val[-1][1], "<", val[0][1],
                                 f"val/loss {val[0][1]:.4f} at step {val[0][0]} -> {val[-1][1]:.4f} at step "
                                 f"{val[-1][0]} (best {min(v for _, v in val):.4f})"))
    band = [float(b) for b in th["grad_norm_band"]]
    norms = run.series("diag/grad_norm/total")
    if not norms:
        criteria.append(_not_measured("grad_norm_mean", "diag/grad_norm/total", band, "in",
                                      "turn on diagnostics.grad_norms (diagnostics.enabled=true)"))
    else:
        part = window(norms, float(th["grad_norm_from"]))
        criteria.append(measured(
            "grad_norm_mean", _mean([v for _, v in part]), "in", band,
            f"mean of {len(part)} total gradient norms (before clipping) over {_steps(part)}; first measured "
            f"{norms[0][1]:.3g} at step {norms[0][0]}, last {norms[-1][1]:.3g} at step {norms[-1][0]}",
        ))
    return criteria


# ----- G3.5 ------------------------------------------------------------------------------------------------------
_STATE_COLUMN = re.compile(r"^diag/state/L(\d+)/(.+)/(\w+)$")


def state_health_criteria(run: RunData, th: dict[str, Any]) -> list[Criterion]:
    criteria = [run_completed(run)]
    start = float(th["window_from"])
    checks = [  # (metric column, criterion name, rule, threshold, worst = max or min)
        ("cos", "state_cosine", "<", float(th["max_cos"]), max),
        ("svd_top5", "state_svd_top5_energy", ">", float(th["min_svd_top5"]), min),
        ("saturation", "gate_saturation", "<", float(th["max_saturation"]), max),
    ]
    for metric, name, rule, threshold, worst in checks:
        per_layer: dict[str, tuple[float, Series]] = {}
        for column, series in run.metrics.items():
            match = _STATE_COLUMN.match(column)
            if match and match.group(3) == metric and series:
                part = window(series, start)
                per_layer[f"L{match.group(1)}/{match.group(2)}"] = (_mean([v for _, v in part]), part)
        if not per_layer:
            criteria.append(_not_measured(name, f"diag/state/L*/*/{metric}", threshold, rule,
                                          "turn on diagnostics.state (with state.top_k=5 for svd_top5)"))
            continue
        # A nan mean (a non-finite state) is the worst value of all.
        bad = [k for k, (m, _) in per_layer.items() if not math.isfinite(m)]
        layer = bad[0] if bad else worst(per_layer, key=lambda k: per_layer[k][0])
        value, part = per_layer[layer]
        other = worst((k for k in per_layer if k != layer), key=lambda k: per_layer[k][0], default=None)
        criteria.append(measured(
            name, value, rule, threshold,
            f"worst layer {layer}: mean {value:.4g} over {len(part)} measurements at {_steps(part)} "
            f"({len(per_layer)} recurrent layer states measured"
            + (f"; next worst {other} {per_layer[other][0]:.4g})" if other else ")"),
        ))
    return criteria


# ----- G3.6 ------------------------------------------------------------------------------------------------------
# Settings that shape the batches, not which data: they may differ between a candidate and its baseline.
BATCH_SHAPE_KEYS = ("data.batch_size", "data.seq_len", "data.curriculum", "data.val_batches")


def _data_keys(*runs: RunData) -> list[str]:
    keys = {k for run in runs for k in run.config if k.startswith(("data.", "tokenizer."))}
    return sorted(k for k in keys if not k.startswith(BATCH_SHAPE_KEYS))


def baseline_criteria(run: RunData, baseline_dir: str | Path | None, th: dict[str, Any]) -> list[Criterion]:
    criteria = [run_completed(run)]
    band = [float(b) for b in th["grad_ratio_band"]]
    path = Path(baseline_dir) if baseline_dir else None
    if path is None or not (path / "metrics.csv").is_file():
        criteria.append(Criterion("baseline_readable", str(path), "a run folder with metrics.csv", "==", False,
                                  "set gate.baseline_run=<the baseline's run folder>"))
        return criteria
    base = RunData(path)
    criteria.append(Criterion("baseline_readable", str(path), "a run folder with metrics.csv", "==", True,
                              f"baseline status {base.summary.get('status')} at step {base.summary.get('step')}"))
    keys = _data_keys(run, base)
    differ = [f"{k}: {run.setting(k)!r} vs {base.setting(k)!r}" for k in keys if run.setting(k) != base.setting(k)]
    criteria.append(Criterion("same_data", len(differ), 0, "==", not differ,
                              "; ".join(differ) or f"{', '.join(keys)} equal"))
    criteria.append(Criterion("same_split_seed", run.setting("seed"), base.setting("seed"), "==",
                              run.setting("seed") == base.setting("seed"),
                              "the held-out split is drawn with the run's seed; different seeds validate on "
                              "different documents", severity="warning"))

    cand_val, base_val = dict(run.series("val/loss")), dict(base.series("val/loss"))
    common = sorted(set(cand_val) & set(base_val))
    limit = float(th["max_val_loss_ratio"])
    if not common:
        criteria.append(Criterion("val_loss_within_baseline", None, limit, "<=", False,
                                  f"no step with val/loss in both runs (candidate {sorted(cand_val)[-3:]}, "
                                  f"baseline {sorted(base_val)[-3:]}); use the same trainer.val_every_n_steps"))
    else:
        step = common[-1]
        ratio = cand_val[step] / base_val[step] if base_val[step] else math.nan
        criteria.append(measured("val_loss_within_baseline", ratio, "<=", limit,
                                 f"val/loss at step {step}: candidate {cand_val[step]:.4f}, baseline "
                                 f"{base_val[step]:.4f}"))

    val = run.series("val/loss")
    tol = float(th["divergence_tolerance"])
    if not val:
        criteria.append(_not_measured("val_loss_not_diverging", "val/loss", 1 + tol, "<=",
                                      "validation runs every trainer.val_every_n_steps"))
    else:
        best_step, best = min(val, key=lambda sv: (sv[1] if math.isfinite(sv[1]) else math.inf))
        final = val[-1][1]
        criteria.append(measured("val_loss_not_diverging", final / best if best else math.nan, "<=", 1 + tol,
                                 f"final val/loss {final:.4f} at step {val[-1][0]}, best {best:.4f} at step "
                                 f"{best_step}"))

    ratio_columns = sorted(k for k in run.metrics if k.startswith("diag/grad_ratio_"))
    for column in ratio_columns:
        ratios = run.series(column)
        name = column.removeprefix("diag/")
        step, worst = max(ratios, key=lambda sv: abs(math.log10(sv[1])) if sv[1] > 0 else math.inf)
        pair = name.removeprefix("grad_ratio_").replace("_", "/", 1)
        criteria.append(measured(name, worst, "in", band,
                                 f"worst of {len(ratios)} {pair} gradient-norm ratios, at step {step}"))
    if not ratio_columns and not run.series("diag/grad_norm/total"):
        criteria.append(_not_measured("grad_ratio", "diag/grad_ratio_<branch>_<branch>", band, "in",
                                      "turn on diagnostics.grad_norms"))

    components = sorted(k.rsplit("/", 1)[1] for k in run.metrics if k.startswith("diag/grad_norm/")
                        and k not in ("diag/grad_norm/total", "diag/grad_norm/in_band"))
    shared = [c for c in components if base.series(f"diag/grad_norm/{c}")]
    if not shared:
        criteria.append(_not_measured("component_grads_vs_baseline", "diag/grad_norm/<component> (in both runs)",
                                      band, "in", "run both with diagnostics.grad_norms on"))
    else:
        ratios_by_comp = {}
        for comp in shared:
            cand = _mean([v for _, v in window(run.series(f"diag/grad_norm/{comp}"), 0.5)])
            ref = _mean([v for _, v in window(base.series(f"diag/grad_norm/{comp}"), 0.5)])
            ratios_by_comp[comp] = cand / ref if ref > 0 else math.inf
        comp = max(ratios_by_comp, key=lambda c: abs(math.log10(ratios_by_comp[c]))
                   if 0 < ratios_by_comp[c] < math.inf else math.inf)
        criteria.append(measured(
            "component_grads_vs_baseline", ratios_by_comp[comp], "in", band,
            f"worst component {comp}: candidate / baseline mean gradient norm over each run's second half; all: "
            + ", ".join(f"{c} {r:.3g}" for c, r in ratios_by_comp.items()),
        ))
    return criteria


# ----- G4 --------------------------------------------------------------------------------------------------------
EVAL_FINITE = ("eval/ppl_carried", "eval/ppl_reset", "eval/bpb_carried", "eval/bpb_reset")


def evaluation_criteria(run_dir: Path, model, tokenizer, texts, settings: dict[str, Any],
                        step: int | None) -> list[Criterion]:
    """G4: the evaluation suite (`settings["suite"]`, default suite_smoke: conf/eval/) through the task registry
    of groundthink.evaluation, on the model in memory; its lm task reads `texts` with the gate's batch shape."""
    from groundthink.evaluation.suite import check_tasks, load_suite, run_tasks, task_settings
    from groundthink.evaluation.tasks import EvalError

    suite = str(settings.get("suite") or "suite_smoke")
    where = (f"{len(texts or [])} held-out documents, batch {settings['batch_size']} x {settings['seq_len']} "
             f"tokens, at most {settings['max_batches']} batches")
    loaded = _loaded_in_memory(run_dir, model, tokenizer, texts, settings, step)
    try:
        tasks = task_settings(load_suite(suite))
        lm = tasks.setdefault("lm", task_settings({"lm": {}})["lm"])
        lm.batch_size, lm.seq_len, lm.max_batches = (int(settings[k]) for k in ("batch_size", "seq_len",
                                                                                 "max_batches"))
    except EvalError as exc:
        return [Criterion("evaluation_runs", f"EvalError: {exc}", "no exception", "==", False, f"eval={suite}")]
    outcomes: dict[str, Any] = {}
    for name, task_s in tasks.items():  # one task's crash is its criterion; the others still run
        try:
            check_tasks(loaded, {name: task_s})
            outcomes[name] = run_tasks(loaded, {name: task_s}, progress=False, log=lambda _: None)[name]
        except Exception as exc:  # noqa: BLE001 - a crash is what G4 reports
            if name == "lm" and "held-out" in str(exc):
                exc = ValueError(f"no held-out texts to evaluate on: {exc}")
            outcomes[name] = exc
    lm_out = outcomes.pop("lm")
    if isinstance(lm_out, Exception):
        criteria = [Criterion("evaluation_runs", f"{type(lm_out).__name__}: {lm_out}", "no exception", "==", False,
                              where)]
    else:
        criteria = [Criterion("evaluation_runs", "ok", "no exception", "==", True, where)]
    for name, out in outcomes.items():
        ok = not isinstance(out, Exception)
        criteria.append(Criterion(f"task/{name}", "ok" if ok else f"{type(out).__name__}: {out}", "no exception",
                                  "==", ok, f"{suite}: task {name} -> {run_dir / 'eval' / name}"))
    if isinstance(lm_out, Exception):
        return criteria
    metrics = {f"eval/{k.removeprefix('eval/lm/')}": v for k, v in lm_out.items()
               if k.removeprefix("eval/lm/") in _LM_KEYS}
    for key in EVAL_FINITE:
        value = metrics[key]
        criteria.append(Criterion(f"finite/{key}", value, "finite", "is", math.isfinite(value),
                                  f"{key} = {value:.4g} over {int(metrics['eval/tokens'])} predicted tokens"))
    suite_scalars = {k: v for out in outcomes.values() if not isinstance(out, Exception) for k, v in out.items()}
    criteria.append(_log_evaluation(run_dir, metrics, step, extra=suite_scalars))
    ratio = metrics["eval/ppl_reset_over_carried"]
    criteria.append(Criterion("carried_state_helps", ratio, 1.0, ">=", math.isfinite(ratio) and ratio >= 1.0,
                              f"perplexity with the state reset every segment {metrics['eval/ppl_reset']:.4g} vs "
                              f"carried {metrics['eval/ppl_carried']:.4g}", severity="warning"))
    return criteria


_LM_KEYS = ("loss_carried", "ppl_carried", "bpb_carried", "loss_reset", "ppl_reset", "bpb_reset",
            "ppl_reset_over_carried", "tokens", "batches")


def _loaded_in_memory(run_dir: Path, model, tokenizer, texts, settings: dict[str, Any], step: int | None):
    """What groundthink.load would return for this run, from the model and texts in memory."""
    from types import SimpleNamespace

    import yaml

    config_file = Path(run_dir) / "config.yaml"
    config = (yaml.safe_load(config_file.read_text()) or {}) if config_file.is_file() else {}
    loaded = SimpleNamespace(model=model, tokenizer=tokenizer, config=config, model_config=model.cfg,
                             checkpoint=Path(run_dir) / "checkpoints" / "last.safetensors", run_dir=Path(run_dir),
                             step=step, checkpoint_sha256="", run_id=None, wandb_run_id=None)
    loaded._heldout = {"texts": list(texts or []), "batch_size": int(settings["batch_size"]),
                       "seq_len": int(settings["seq_len"]), "val_batches": int(settings["max_batches"]),
                       "seed": int(config.get("seed", 0) or 0)}
    return loaded


def _log_evaluation(run_dir: Path, metrics: dict[str, float], step: int | None,
                    extra: dict[str, float] | None = None) -> Criterion:
    """Write eval.json (the lm metrics under `metrics`, the other tasks' scalars under `suite`) and merge the lm
    metrics into metrics.csv at the run's last logged step; read both back."""
    from groundthink.training.metrics_file import read_metrics_csv
    from groundthink.training.metrics_logger import CSVMetricsLogger

    (run_dir / "eval.json").write_text(json.dumps({"step": step, "metrics": metrics, "suite": extra or {}},
                                                  indent=2) + "\n")
    csv_file = run_dir / "metrics.csv"
    last = 0
    if csv_file.is_file():
        series = read_metrics_csv(csv_file)
        last = max((s[-1][0] for s in series.values() if s), default=0)
    logger = CSVMetricsLogger(run_dir, resume_step=last)
    logger.log_metrics(metrics, step=last)
    logger.finalize("success")
    logged = read_metrics_csv(csv_file)
    found = [k for k in metrics if logged.get(k)]
    return Criterion("metrics_logged", len(found), len(metrics), "==", len(found) == len(metrics),
                     f"eval.json written; {len(found)} of {len(metrics)} eval/* columns read back from metrics.csv "
                     f"at step {last}")


# ----- G5 --------------------------------------------------------------------------------------------------------
def target_loss_criteria(run: RunData, th: dict[str, Any], vocab_size: int | None) -> list[Criterion]:
    limit = float(th["max_val_loss"])
    criteria = [run_completed(run)]
    val = run.series("val/loss")
    if not val:
        criteria.append(_not_measured("val_loss_below", "val/loss", limit, "<", "validation must run at least once"))
    else:
        criteria.append(measured("val_loss_below", val[-1][1], "<", limit,
                                 f"final val/loss at step {val[-1][0]} (best {min(v for _, v in val):.4f})"))
    if vocab_size:
        uniform = math.log(vocab_size)
        criteria.append(Criterion("threshold_informative", uniform, limit, ">", uniform > limit,
                                  f"ln(vocab {vocab_size}) = {uniform:.3f}: the loss of a uniform prediction",
                                  severity="warning"))
    return criteria


# ----- registration ----------------------------------------------------------------------------------------------
def _check_baseline(gate: dict[str, Any]) -> None:
    baseline = gate.get("baseline_run")
    if not baseline:
        raise ValueError("gate G3.6 compares with a baseline run: set gate.baseline_run=<its run folder>")
    if not (Path(str(baseline)) / "metrics.csv").is_file():
        raise ValueError(f"gate.baseline_run={baseline}: no metrics.csv there, so it is not a finished run folder")


@register_gate("G3", "training: loss decreasing, mean gradient norm in the band",
               thresholds=("loss_window", "max_loss_ratio", "grad_norm_band", "grad_norm_from"), reads=("run",),
               diagnostics=("grad_norms",))
def g3(ctx: GateContext, gate: dict[str, Any]) -> list[Criterion]:
    return training_criteria(ctx.run, gate["thresholds"])


@register_gate("G3.5", "state health: not frozen, structured, gates not saturated",
               thresholds=("max_cos", "min_svd_top5", "max_saturation", "window_from"), reads=("run",),
               diagnostics=("state",))
def g3_5(ctx: GateContext, gate: dict[str, Any]) -> list[Criterion]:
    return state_health_criteria(ctx.run, gate["thresholds"])


@register_gate("G3.6", "candidate vs baseline run: val loss within the ratio, not diverging, gradients balanced",
               thresholds=("max_val_loss_ratio", "divergence_tolerance", "grad_ratio_band"),
               extras={"baseline_run": ()}, reads=("run",), diagnostics=("grad_norms",), check=_check_baseline)
def g3_6(ctx: GateContext, gate: dict[str, Any]) -> list[Criterion]:
    return baseline_criteria(ctx.run, gate.get("baseline_run"), gate["thresholds"])


@register_gate("G4", "the evaluation suite runs without crashes and logs its metrics",
               extras={"eval": ("batch_size", "seq_len", "max_batches")}, reads=("run", "model", "tokenizer"))
def g4(ctx: GateContext, gate: dict[str, Any]) -> list[Criterion]:
    return evaluation_criteria(Path(ctx.run_dir), ctx.model, ctx.tokenizer, ctx.texts, gate["eval"], ctx.step)


@register_gate("G5", "the model reaches the target validation loss", thresholds=("max_val_loss",), reads=("run",))
def g5(ctx: GateContext, gate: dict[str, Any]) -> list[Criterion]:
    vocab = ctx.tokenizer.vocab_size if ctx.tokenizer is not None else _saved_vocab(ctx.run_dir)
    return target_loss_criteria(ctx.run, gate["thresholds"], vocab)


def _saved_vocab(run_dir: Path | None) -> int | None:
    meta = Path(run_dir) / "tokenizer" / "tokenizer_meta.json" if run_dir is not None else None
    if meta is None or not meta.is_file():
        return None
    return int(json.loads(meta.read_text()).get("vocab_size") or 0) or None
