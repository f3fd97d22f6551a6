"""Gate runs: config validation before training, and the verdict after it, for any registered gate.

`groundthink-train gate=g3 ...` composes conf/gate/g3.yaml, which sets `gate: {name, fail_exit, thresholds, ...}`
and the training settings the gate needs. The training entry point calls `check_gate_config` before training (a
bad threshold key or a missing baseline folder fails in seconds, not after 1k steps) and `finish_gate_run` after
it, which writes `<run_dir>/gates.json` (groundthink/gates/report.py) and returns the exit code: 1 on FAIL unless
`fail_exit: false`. `groundthink-gate check` re-judges a finished run folder for a gate that reads only the run.

A gate block may set `min_steps`, the training length its criteria are meant for (G3: 1000). A shorter run (a
smoke test such as `gate=g3 debug=fast`) still computes every criterion, but the verdict is SMOKE: not judged,
exit code 0, and the report says why.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from groundthink.gates.registry import COMMON_KEYS, GATES, GateContext, GateSpec, gate_name
from groundthink.gates.report import GATES_FILE, Criterion, GateReport


def check_gate_config(gate: dict[str, Any], diagnostics: Any = None) -> GateSpec:
    """The gate's spec, or ValueError saying what is wrong with the gate block (and the diagnostics it needs).

    `diagnostics`: the run's DiagnosticsSettings (or its dict form), to check that the sections the gate reads
    are on."""
    if not isinstance(gate, dict) or "name" not in gate:
        raise ValueError("gate: expected a block with at least `name` (use gate=g0 ... gate=g5, see conf/gate/)")
    name = gate_name(gate["name"])
    if name not in GATES:
        raise ValueError(f"gate.name={gate['name']!r} is not a gate; known: {', '.join(sorted(GATES))}")
    spec = GATES[name]
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
    min_steps = gate.get("min_steps")
    if min_steps is not None and (not isinstance(min_steps, int) or min_steps < 0):
        raise ValueError(f"gate {name}: min_steps={min_steps!r} must be a non-negative integer or null")
    if spec.check is not None:
        spec.check(gate)
    if diagnostics is not None:
        for section in spec.diagnostics:
            enabled = _get(diagnostics, "enabled")
            every = _get(_get(diagnostics, section), "every_n_steps") if enabled else 0
            if not every:
                raise ValueError(f"gate {name} reads the {section} diagnostics, which are off in this config: set "
                                 f"diagnostics.enabled=true and diagnostics.{section}.every_n_steps > 0")
    return spec


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def evaluate_gate(
    gate: dict[str, Any],
    run_dir: str | Path | None = None,
    *,
    summary: dict[str, Any] | None = None,
    model=None,
    tokenizer=None,
    val_texts: list[str] | None = None,
) -> GateReport:
    """Evaluate one gate on what it reads (its spec's `reads`): a run folder, a model, a tokenizer."""
    spec = check_gate_config(gate)
    report = GateReport(spec.name, spec.description, settings=dict(gate))
    ctx = GateContext(run_dir=Path(run_dir) if run_dir is not None else None, model=model, tokenizer=tokenizer,
                      texts=val_texts, summary=dict(summary or {}))
    if run_dir is not None:
        from groundthink.gates.run_checks import RunData

        ctx.run = RunData(run_dir, summary)
        ctx.summary = ctx.summary or dict(ctx.run.summary)
        ctx.seed = int(ctx.run.setting("seed", 0) or 0)
    missing = [what for what, value in (("run", run_dir), ("model", model), ("tokenizer", tokenizer))
               if what in spec.reads and value is None]
    if missing:
        how = "groundthink-gate static" if spec.static else "groundthink-train gate=... (or groundthink-gate check)"
        raise ValueError(f"gate {spec.name} reads a {' and a '.join(missing)}; run it with {how}")
    report.criteria = spec.evaluate(ctx, gate)
    report.apply_severities(list(gate.get("warning_criteria") or []))
    step = ctx.step
    min_steps = gate.get("min_steps")
    if min_steps and (step or 0) < min_steps:
        report.smoke = (f"a smoke run: {step or 0} of the {min_steps} steps {spec.name}'s criteria are meant for, "
                        "so they are computed but not judged")
    report.context = {"run_dir": str(run_dir) if run_dir is not None else None, "step": step,
                      "status": ctx.summary.get("status")}
    return report


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
        report = GateReport(gate_name(gate.get("name")), "the gate could not be evaluated", settings=dict(gate))
        report.criteria = [Criterion("gate_evaluated", f"{type(exc).__name__}: {exc}", "no exception", "==", False,
                                     "see the message; the run folder may be incomplete")]
        report.context = {"run_dir": str(run_dir), "step": (summary or {}).get("step"),
                          "status": (summary or {}).get("status")}
    path = report.write(run_dir / GATES_FILE)
    print(report.render() + f"\nverdict written to {path}", flush=True)
    return 1 if report.verdict == "FAIL" and gate.get("fail_exit", True) else 0


__all__ = ["GATES", "check_gate_config", "evaluate_gate", "finish_gate_run", "gate_name"]
