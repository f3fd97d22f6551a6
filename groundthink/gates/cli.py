"""`groundthink-gate`: gate verdicts without (or after) a training run.

    groundthink-gate static [--model tiny,8m] [--pattern H,R,M,A,HA] [--tokenizer char|bpe] [--vocab-size N]
                            [--tokenizer-dir DIR] [--gates g0,g1,g2] [--out DIR]
        G0-G2 on freshly built models (every preset x layer pattern) and a tokenizer; writes <out>/gates.json.
    groundthink-gate check RUN_DIR --gate g3|g3_5|g3_6|g5 [--baseline DIR] [--set thresholds.KEY=VALUE ...]
                           [--out FILE]
        Judge a finished run folder for a gate that reads only metrics (default <run>/gates_<gate>.json), e.g.
        G3.5 on a G3 run, or G3.6 between two existing runs.
    groundthink-gate matrix SWEEP_DIR [--out DIR]
        One PASS/FAIL table over the jobs of a gate multirun (`groundthink-train -m gate=g1 model=tiny,small`):
        printed, and written to <out>/gate_matrix.md and gate_matrix.json.

Thresholds come from conf/gate/<gate>.yaml, the same files gate runs use. The exit code is 1 when any verdict is
FAIL (or a job has none), else 0 (PASS, or SMOKE: a run shorter than the gate's min_steps, not judged).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from groundthink.gates import GATES, gate_name
from groundthink.gates.report import GATES_FILE, Criterion, GateReport

CONF_GATE_DIR = Path(__file__).resolve().parent.parent.parent / "conf" / "gate"
DEFAULT_PATTERNS = "H,R,M,A,HA"


def gate_config(name: str) -> dict[str, Any]:
    """The `gate` block of conf/gate/<name>.yaml (name as g3_5, G3.5, ...)."""
    canonical = gate_name(name)
    if canonical not in GATES:
        raise SystemExit(f"error: {name!r} is not a gate; known: {', '.join(sorted(GATES))}")
    path = CONF_GATE_DIR / f"{canonical.lower().replace('.', '_')}.yaml"
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing (the gate configs live in conf/gate/)")
    return yaml.safe_load(path.read_text())["gate"]


def _apply_sets(gate: dict[str, Any], sets: list[str]) -> None:
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --set {item!r}: expected KEY=VALUE, e.g. thresholds.max_cos=0.995")
        node = gate
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)


# ----- static ----------------------------------------------------------------------------------------------------
def _tokenizer(args):
    from groundthink.data.tokenizer import Tokenizer, build_tokenizer
    from groundthink.gates.static_checks import default_sample_texts

    if args.tokenizer_dir:
        return Tokenizer.load(args.tokenizer_dir)
    if args.tokenizer == "bpe":
        return build_tokenizer("bpe", default_sample_texts(), args.vocab_size)
    return build_tokenizer(args.tokenizer)


def run_static(args) -> int:
    import torch

    from groundthink.gates.registry import GateContext
    from groundthink.models import HybridLM
    from groundthink.models.presets import PRESETS, preset

    gates = [gate_name(g) for g in args.gates.split(",") if g]
    static = [name for name, spec in GATES.items() if spec.static]
    bad = [g for g in gates if g not in static]
    if bad:
        raise SystemExit(f"error: static checks are {', '.join(static)}; got {bad} (the others judge a training run)")
    unknown = [m for m in args.model.split(",") if m and m not in PRESETS]
    if unknown:
        raise SystemExit(f"error: --model {','.join(unknown)}: not a model preset; allowed: {', '.join(PRESETS)}")
    tokenizer = _tokenizer(args)
    configs = {g: gate_config(g) for g in gates}
    combined = GateReport("+".join(gates), f"static checks of {args.model} x {args.pattern}, tokenizer "
                          f"{tokenizer.kind} ({tokenizer.vocab_size} ids)", settings={"gates": configs})
    verdicts: dict[str, str] = {}
    variants = [(m, p) for m in args.model.split(",") if m for p in args.pattern.split(",") if p]
    for gate in gates:
        cfg, spec = configs[gate], GATES[gate]
        report = GateReport(gate, spec.description, settings=cfg)
        if "model" not in spec.reads:
            report.criteria = spec.evaluate(GateContext(tokenizer=tokenizer, seed=args.seed), cfg)
        for model_name, pattern in variants if "model" in spec.reads else []:
            torch.manual_seed(args.seed)
            try:
                model = HybridLM(preset(model_name, vocab_size=tokenizer.vocab_size, pattern=pattern))
            except ValueError as exc:
                raise SystemExit(f"error: --model {model_name} --pattern {pattern}: {exc}") from None
            if spec.applies_to is not None and not spec.applies_to(model):
                continue
            for c in spec.evaluate(GateContext(model=model, tokenizer=tokenizer, seed=args.seed), cfg):
                c.name = f"{model_name}:{pattern}/{c.name}"
                report.criteria.append(c)
        report.apply_severities(list(cfg.get("warning_criteria") or []))
        print(report.render(), flush=True)
        verdicts[gate] = report.verdict
        for c in report.criteria:
            combined.criteria.append(Criterion(f"{gate}/{c.name}", c.value, c.threshold, c.rule, c.passed,
                                               c.evidence, c.severity))
    combined.context = {"verdicts": verdicts}
    path = combined.write(Path(args.out) / GATES_FILE)
    print(f"\n{combined.gate}: {combined.verdict}  ({', '.join(f'{g} {v}' for g, v in verdicts.items())}) -> {path}")
    return 0 if combined.verdict == "PASS" else 1


# ----- check -----------------------------------------------------------------------------------------------------
def run_check(args) -> int:
    from groundthink.gates.runner import evaluate_gate

    name = gate_name(args.gate)
    metric_gates = [g for g, spec in GATES.items() if spec.judges_run_folder]
    if name not in metric_gates:
        raise SystemExit(f"error: `check` judges gates that read a run folder's metrics ({', '.join(metric_gates)}); "
                         f"{name} needs a model: use `groundthink-gate static` or a gate run")
    run_dir = Path(args.run_dir)
    if not (run_dir / "metrics.csv").is_file():
        raise SystemExit(f"error: {run_dir} has no metrics.csv; pass a finished run folder")
    gate = gate_config(name)
    if args.baseline:
        gate["baseline_run"] = args.baseline
    _apply_sets(gate, args.set or [])
    try:
        report = evaluate_gate(gate, run_dir)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    out = Path(args.out) if args.out else run_dir / f"gates_{name.lower().replace('.', '_')}.json"
    report.write(out)
    print(report.render() + f"\nverdict written to {out}")
    return 0 if report.verdict in ("PASS", "SMOKE") else 1


# ----- matrix ----------------------------------------------------------------------------------------------------
def gate_matrix(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder: its overrides, status, gate, verdict, failed criteria and warnings."""
    from groundthink.reporting.runs import CompareError, discover_runs, load_run

    try:
        job_dirs = discover_runs(sweep_dir)
    except CompareError as exc:
        raise SystemExit(f"error: {exc}") from None
    rows = []
    for job in job_dirs:
        run = load_run(job, sweep_dir)
        report = run.gates or {}
        overrides = run.overrides or {}
        rows.append({
            "job": run.name,
            "overrides": " ".join(f"{k}={v}" for k, v in overrides.items() if k != "gate"),
            "status": run.status,
            "gate": report.get("gate") or overrides.get("gate", ""),
            "verdict": report.get("verdict") or "NONE",
            "failed": report.get("failed", []),
            "warnings": report.get("warnings", []),
            "error": None if report else (run.error or "no gates.json"),
        })
    return rows


def render_matrix(rows: list[dict[str, Any]]) -> str:
    lines = ["| job | overrides | gate | verdict | failed criteria | warnings |", "|---|---|---|---|---|---|"]
    for r in rows:
        failed = ", ".join(r["failed"]) or (r["error"] or "")
        lines.append(f"| {r['job']} | {r['overrides']} | {r['gate']} | {r['verdict']} | {failed} | "
                     f"{', '.join(r['warnings'])} |")
    n_pass = sum(r["verdict"] == "PASS" for r in rows)
    lines.append(f"\n{n_pass} of {len(rows)} jobs PASS")
    return "\n".join(lines)


def run_matrix(args) -> int:
    sweep = Path(args.sweep_dir)
    rows = gate_matrix(sweep)
    text = render_matrix(rows)
    out = Path(args.out) if args.out else sweep
    out.mkdir(parents=True, exist_ok=True)
    (out / "gate_matrix.md").write_text(text + "\n")
    (out / "gate_matrix.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text + f"\nwritten to {out / 'gate_matrix.md'} and gate_matrix.json")
    return 0 if rows and all(r["verdict"] in ("PASS", "SMOKE") for r in rows) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="groundthink-gate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("static", help="G0-G2 on fresh models and a tokenizer, no training")
    p.add_argument("--model", default="tiny", help="model presets, comma-separated (default tiny)")
    p.add_argument("--pattern", default=DEFAULT_PATTERNS, help=f"layer patterns (default {DEFAULT_PATTERNS})")
    p.add_argument("--tokenizer", default="char", choices=("char", "bpe"))
    p.add_argument("--vocab-size", type=int, default=24000, help="BPE vocabulary (trained on embedded text)")
    p.add_argument("--tokenizer-dir", help="a saved tokenizer folder (e.g. a run's tokenizer/) instead")
    p.add_argument("--gates", default="g0,g1,g2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/gate-static", help="folder for gates.json")
    p.set_defaults(func=run_static)
    p = sub.add_parser("check", help="judge a finished run folder (G3, G3.5, G3.6, G5)")
    p.add_argument("run_dir")
    p.add_argument("--gate", required=True)
    p.add_argument("--baseline", help="G3.6: the baseline's run folder")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a gate setting")
    p.add_argument("--out", help="verdict file (default <run_dir>/gates_<gate>.json)")
    p.set_defaults(func=run_check)
    p = sub.add_parser("matrix", help="PASS/FAIL table over the jobs of a gate multirun")
    p.add_argument("sweep_dir")
    p.add_argument("--out", help="folder for gate_matrix.md/json (default the sweep folder)")
    p.set_defaults(func=run_matrix)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
