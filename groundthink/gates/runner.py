"""Gate runs: the registry of gates, config validation before training, and the verdict after it.

`groundthink-train gate=g3 ...` composes conf/gate/g3.yaml, which sets `gate: {name, fail_exit, thresholds, ...}`
and the training settings the gate needs. train.py calls `check_gate_config` before training (a bad threshold
key or a missing baseline folder fails in seconds, not after 1k steps) and `finish_gate_run` after it, which
writes `<run_dir>/gates.json` (groundthink/gates/report.py) and returns the exit code: 1 on FAIL unless
`fail_exit: false`. `evaluate_run_gate` re-checks a finished run folder for a metrics-only gate
(`groundthink-gate check`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from groundthink.gates.report import GATES_FILE, GateReport

COMMON_KEYS = ("name", "fail_exit", "thresholds", "warning_criteria")


@dataclass(frozen=True)
class GateSpec:
    name: str
    description: str
    thresholds: tuple[str, ...]
    extras: dict[str, tuple[str, ...]] = field(default_factory=dict)  # other gate keys -> their sub-keys
    needs_model: bool = False
    diagnostics: tuple[str, ...] = ()  # diagnostics sections whose metrics the gate reads


SPECS: dict[str, GateSpec] = {
    "G0": GateSpec("G0", "every control token encodes as a single token", ()),
    "G1": GateSpec("G1", "forward pass works, no NaN/Inf, shapes correct", ("rel_tol",),
                   {"sample": ("batch_size", "seq_len")}, needs_model=True),
    "G2": GateSpec("G2", "state entropy at step 0 in the band (a warning band)", ("state_entropy_band",),
                   {"sample": ("batch_size", "seq_len")}, needs_model=True),
    "G3": GateSpec("G3", "training: loss decreasing, mean gradient norm in the band",
                   ("loss_window", "max_loss_ratio", "grad_norm_band", "grad_norm_from"),
                   diagnostics=("grad_norms",)),
    "G3.5": GateSpec("G3.5", "state health: not frozen, structured, gates not saturated",
                     ("max_cos", "min_svd_top5", "max_saturation", "window_from"), diagnostics=("state",)),
    "G3.6": GateSpec("G3.6", "candidate vs baseline run: val loss within the ratio, not diverging, gradients "
                     "balanced", ("max_val_loss_ratio", "divergence_tolerance", "grad_ratio_band"),
                     {"baseline_run": ()}, diagnostics=("grad_norms",)),
    "G4": GateSpec("G4", "the evaluation suite runs without crashes and logs its metrics", (),
                   {"eval": ("batch_size", "seq_len", "max_batches")}, needs_model=True),
    "G5": GateSpec("G5", "the model reaches the target validation loss", ("max_val_loss",)),
}


def gate_name(name: Any) -> str:
    """'g3_5', 'G3.5', 'g3.5' -> 'G3.5'."""
    return str(name).strip().upper().replace("_", ".")


def check_gate_config(gate: dict[str, Any], diagnostics: dict[str, Any] | None = None) -> GateSpec:
    """The gate's spec, or ValueError saying what is wrong with the gate block (and the diagnostics it needs)."""
    if not isinstance(gate, dict) or "name" not in gate:
        raise ValueError("gate: expected a block with at least `name` (use gate=g0 ... gate=g5, see conf/gate/)")
    name = gate_name(gate["name"])
    if name not in SPECS:
        raise ValueError(f"gate.name={gate['name']!r} is not a gate; known: {', '.join(SPECS)}")
    spec = SPECS[name]
    unknown = sorted(set(gate) - set(COMMON_KEYS) - set(spec.extras))
    if unknown:
        raise ValueError(f"gate {name}: unknown key(s) {unknown}; known: {', '.join(COMMON_KEYS + tuple(spec.extras))}")
    thresholds = gate.get("thresholds") or {}
    missing = [k for k in spec.thresholds if k not in thresholds]
    extra = sorted(set(thresholds) - set(spec.thresholds))
    if missing or extra:
        raise ValueError(f"gate {name}: thresholds must be exactly {list(spec.thresholds)}"
                         + (f"; missing {missing}" if missing else "") + (f"; unknown {extra}" if extra else ""))
    for key, sub in spec.extras.items():
        if sub:
            block = gate.get(key) or {}
            lacking = [k for k in sub if k not in block]
            if lacking:
                raise ValueError(f"gate {name}: gate.{key} needs {list(sub)}; missing {lacking}")
    for key, value in thresholds.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise ValueError(f"gate {name}: thresholds.{key}={value!r} must be a number or a list of numbers")
    if name == "G3.6":
        baseline = gate.get("baseline_run")
        if not baseline:
            raise ValueError("gate G3.6 compares with a baseline run: set gate.baseline_run=<its run folder>")
        if not (Path(str(baseline)) / "metrics.csv").is_file():
            raise ValueError(f"gate.baseline_run={baseline}: no metrics.csv there, so it is not a finished run folder")
    if diagnostics is not None:
        for section in spec.diagnostics:
            every = ((diagnostics.get(section) or {}).get("every_n_steps")) if diagnostics.get("enabled") else 0
            if not every:
                raise ValueError(f"gate {name} reads the {section} diagnostics, which are off in this config: set "
                                 f"diagnostics.enabled=true and diagnostics.{section}.every_n_steps > 0")
    return spec


def _sample(gate: dict[str, Any]) -> tuple[int, int]:
    sample = gate.get("sample") or {}
    return int(sample["batch_size"]), int(sample["seq_len"])


def evaluate_gate(
    gate: dict[str, Any],
    run_dir: str | Path | None = None,
    *,
    summary: dict[str, Any] | None = None,
    model=None,
    tokenizer=None,
    val_texts: list[str] | None = None,
) -> GateReport:
    """Evaluate one gate. Run-folder gates read `run_dir`; model gates need `model` (G0 only `tokenizer`)."""
    spec = check_gate_config(gate)
    th = gate.get("thresholds") or {}
    report = GateReport(spec.name, spec.description, settings=dict(gate))
    run = None
    if run_dir is not None:
        from groundthink.gates.run_checks import RunData

        run = RunData(run_dir, summary)
    if spec.needs_model and model is None:
        raise ValueError(f"gate {spec.name} checks a model; run it with groundthink-train gate=... or "
                         f"groundthink-gate static")
    step = (summary or {}).get("step")

    if spec.name == "G0":
        if tokenizer is None:
            raise ValueError("gate G0 checks a tokenizer; none was given")
        from groundthink.gates.static_checks import control_token_criteria

        report.criteria = control_token_criteria(tokenizer)
    elif spec.name == "G1":
        from groundthink.gates.static_checks import forward_criteria

        batch_size, seq_len = _sample(gate)
        report.criteria = forward_criteria(model, batch_size=batch_size, seq_len=seq_len, rel_tol=float(th["rel_tol"]))
    elif spec.name == "G2":
        seed = int(run.setting("seed", 0)) if run is not None else 0
        report.criteria = _g2(model, tokenizer, val_texts, gate, step, seed)
    elif spec.name == "G3":
        from groundthink.gates.run_checks import training_criteria

        report.criteria = training_criteria(_need(run), th)
    elif spec.name == "G3.5":
        from groundthink.gates.run_checks import state_health_criteria

        report.criteria = state_health_criteria(_need(run), th)
    elif spec.name == "G3.6":
        from groundthink.gates.run_checks import baseline_criteria

        report.criteria = baseline_criteria(_need(run), gate.get("baseline_run"), th)
    elif spec.name == "G4":
        from groundthink.gates.run_checks import evaluation_criteria

        if run_dir is None or tokenizer is None:
            raise ValueError("gate G4 evaluates a trained run: it needs the run folder, model and tokenizer")
        report.criteria = evaluation_criteria(Path(run_dir), model, tokenizer, val_texts, gate["eval"], step)
    elif spec.name == "G5":
        from groundthink.gates.run_checks import target_loss_criteria

        vocab = tokenizer.vocab_size if tokenizer is not None else _saved_vocab(run_dir)
        report.criteria = target_loss_criteria(_need(run), th, vocab)
    report.apply_severities(list(gate.get("warning_criteria") or []))
    report.context = {"run_dir": str(run_dir) if run_dir is not None else None, "step": step,
                      "status": (summary or {}).get("status")}
    return report


def _need(run):
    if run is None:
        raise ValueError("this gate reads a run folder; pass run_dir")
    return run


def _saved_vocab(run_dir: str | Path | None) -> int | None:
    import json

    meta = Path(run_dir) / "tokenizer" / "tokenizer_meta.json" if run_dir is not None else None
    if meta is None or not meta.is_file():
        return None
    return int(json.loads(meta.read_text()).get("vocab_size") or 0) or None


def _g2(model, tokenizer, texts, gate: dict[str, Any], step: int | None, seed: int):
    import torch

    from groundthink.gates.static_checks import default_sample_texts, sample_tokens, state_entropy_criteria

    batch_size, seq_len = _sample(gate)
    source = "held-out text" if texts else "the language-reference text"
    tokens = sample_tokens(tokenizer, texts or default_sample_texts(), batch_size, seq_len)
    where = f"one forward of {batch_size} x {seq_len} tokens of {source}"
    if step:
        # G2 is defined at step 0: measure a fresh initialisation of the same config rather than the trained model.
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = type(model)(model.cfg, device=next(model.parameters()).device)
        where += f" (a fresh initialisation with seed {seed}: this run trained {step} steps)"
    return state_entropy_criteria(model, tokens, gate["thresholds"]["state_entropy_band"], where=where)


def finish_gate_run(
    gate: dict[str, Any],
    run_dir: str | Path,
    *,
    summary: dict[str, Any] | None = None,
    model=None,
    tokenizer=None,
    val_texts: list[str] | None = None,
) -> int:
    """Evaluate the gate of a finished training run, write gates.json, print the verdict; the exit code."""
    run_dir = Path(run_dir)
    try:
        report = evaluate_gate(gate, run_dir, summary=summary, model=model, tokenizer=tokenizer,
                               val_texts=val_texts)
    except Exception as exc:  # noqa: BLE001 - a gate that cannot be evaluated is a FAIL with the reason
        from groundthink.gates.report import Criterion

        report = GateReport(gate_name(gate.get("name")), "the gate could not be evaluated", settings=dict(gate))
        report.criteria = [Criterion("gate_evaluated", f"{type(exc).__name__}: {exc}", "no exception", "==", False,
                                     "see the message; the run folder may be incomplete")]
        report.context = {"run_dir": str(run_dir), "step": (summary or {}).get("step"),
                          "status": (summary or {}).get("status")}
    path = report.write(run_dir / GATES_FILE)
    print(report.render() + f"\nverdict written to {path}", flush=True)
    return 1 if report.verdict == "FAIL" and gate.get("fail_exit", True) else 0
