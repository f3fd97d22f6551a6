"""Gate verdicts: criteria, the PASS/FAIL rule, gates.json and the console table.

A gate's verdict is FAIL when any of its *required* criteria failed, else PASS. A criterion named in the gate's
`warning_criteria` (e.g. G2's state-entropy band, a warning band per the spec) is reported and listed under
`warnings` but does not fail the gate. A run shorter than the gate's `min_steps` gets the verdict SMOKE: the
criteria are computed and shown, but not judged (`smoke` says why). gates.json:

    {"gate": "G3", "verdict": "PASS" | "FAIL" | "SMOKE", "smoke": null | reason, "description": ..., "criteria": [
        {"name", "value", "threshold", "rule", "passed", "severity": "required" | "warning", "evidence"}, ...],
     "failed": [names of failed required criteria], "warnings": [names of failed warning criteria],
     "settings": {the gate's config}, "run_dir", "step", "status", "created"}
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

GATES_FILE = "gates.json"


@dataclass
class Criterion:
    """One checked condition: `value` compared with `threshold` by `rule` (e.g. "<", "<=", "in", "=="), and
    `evidence` saying where the value comes from (step, layer, file)."""

    name: str
    value: Any
    threshold: Any
    rule: str
    passed: bool
    evidence: str
    severity: str = "required"

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["value"] = _jsonable(self.value)
        out["threshold"] = _jsonable(self.threshold)
        out["passed"] = bool(self.passed)
        return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no nan/inf; keep them readable
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def compare(value: float | None, rule: str, threshold: Any) -> bool:
    """value <rule> threshold; a missing or non-finite value never passes."""
    if value is None or isinstance(value, bool) or not math.isfinite(float(value)):
        return False
    value = float(value)
    if rule == "<":
        return value < threshold
    if rule == "<=":
        return value <= threshold
    if rule == ">":
        return value > threshold
    if rule == ">=":
        return value >= threshold
    if rule == "==":
        return value == threshold
    if rule == "in":
        low, high = threshold
        return low <= value <= high
    raise ValueError(f"unknown comparison rule {rule!r}")


def measured(name: str, value: float | None, rule: str, threshold: Any, evidence: str) -> Criterion:
    return Criterion(name, value, threshold, rule, compare(value, rule, threshold), evidence)


@dataclass
class GateReport:
    gate: str
    description: str
    criteria: list[Criterion] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)
    smoke: str | None = None  # why the verdict is SMOKE (a run shorter than the gate's min_steps)

    def apply_severities(self, warning_criteria: list[str]) -> None:
        """Mark the criteria whose name (or name prefix before '/') is listed as warnings."""
        for c in self.criteria:
            if c.name in warning_criteria or c.name.split("/")[-1] in warning_criteria:
                c.severity = "warning"

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.criteria if not c.passed and c.severity == "required"]

    @property
    def warnings(self) -> list[str]:
        return [c.name for c in self.criteria if not c.passed and c.severity == "warning"]

    @property
    def verdict(self) -> str:
        if self.smoke:
            return "SMOKE"
        return "FAIL" if self.failed or not self.criteria else "PASS"

    def as_json(self) -> dict[str, Any]:
        return {
            "gate": self.gate,
            "verdict": self.verdict,
            "smoke": self.smoke,
            "description": self.description,
            "criteria": [c.as_json() for c in self.criteria],
            "failed": self.failed,
            "warnings": self.warnings,
            "settings": _jsonable(self.settings),
            **_jsonable(self.context),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def write(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.as_json(), indent=2) + "\n")
        tmp.replace(path)
        return path

    def render(self) -> str:
        """A short human-readable table for the console."""
        lines = [f"=== gate {self.gate}: {self.verdict} === {self.description}"]
        if self.smoke:
            lines.append(f"  not judged: {self.smoke}")
        for c in self.criteria:
            mark = "ok  " if c.passed else ("WARN" if c.severity == "warning" else "FAIL")
            lines.append(f"  [{mark}] {c.name}: {_short(c.value)} {c.rule} {_short(c.threshold)}  ({c.evidence})")
        if not self.criteria:
            lines.append("  no criterion could be evaluated: the gate fails")
        return "\n".join(lines)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)
