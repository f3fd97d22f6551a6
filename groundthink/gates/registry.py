"""The gate registry: each gate is one decorated function that turns what it reads into criteria.

    @register_gate("G3", "training: loss decreasing, mean gradient norm in the band",
                   thresholds=("loss_window", ...), reads=("run",), diagnostics=("grad_norms",))
    def g3(ctx: GateContext, gate: dict) -> list[Criterion]: ...

`reads` says what the gate needs, checked before it runs: "run" (a run folder: metrics.csv, summary.json,
config.yaml), "model", "tokenizer". A gate that reads only "run" can be re-judged on a finished run folder
(`groundthink-gate check`); one that reads no run is judged on fresh models (`groundthink-gate static`).
`extras` are gate keys besides the common ones, with the sub-keys they must hold; `diagnostics` the diagnostics
sections whose metrics the gate reads (checked to be on before training); `check` a gate-specific validation of
its block; `applies_to` which fresh models `groundthink-gate static` judges with it.

Adding a gate = its decorated function in a module that gates/__init__.py imports + conf/gate/<name>.yaml + its
test; nothing else names it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from groundthink.gates.report import Criterion

COMMON_KEYS = ("name", "fail_exit", "thresholds", "warning_criteria", "min_steps")


@dataclass
class GateContext:
    """Everything a gate may read; what it declares in `reads` is guaranteed to be there."""

    run: Any = None  # groundthink.gates.run_checks.RunData of the run folder
    run_dir: Path | None = None
    model: Any = None
    tokenizer: Any = None
    texts: list[str] | None = None  # held-out texts of the run (or None)
    summary: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    @property
    def step(self) -> int | None:
        return self.summary.get("step")


@dataclass(frozen=True)
class GateSpec:
    name: str
    description: str
    evaluate: Callable[[GateContext, dict[str, Any]], list[Criterion]]
    thresholds: tuple[str, ...] = ()
    extras: dict[str, tuple[str, ...]] = field(default_factory=dict)
    reads: tuple[str, ...] = ()
    diagnostics: tuple[str, ...] = ()
    check: Callable[[dict[str, Any]], None] | None = None
    applies_to: Callable[[Any], bool] | None = None  # static checks: which fresh models the gate judges

    @property
    def judges_run_folder(self) -> bool:
        return self.reads == ("run",)

    @property
    def static(self) -> bool:
        return "run" not in self.reads


GATES: dict[str, GateSpec] = {}


def register_gate(name: str, description: str, **spec: Any) -> Callable:
    def decorate(fn: Callable[[GateContext, dict[str, Any]], list[Criterion]]):
        GATES[name] = GateSpec(name, description, fn, **spec)
        return fn

    return decorate


def gate_name(name: Any) -> str:
    """'g3_5', 'G3.5', 'g3.5' -> 'G3.5'."""
    return str(name).strip().upper().replace("_", ".")
