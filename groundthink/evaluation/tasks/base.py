"""The evaluation-task registry and what tasks share (scoring from a carried state, result files).

    @register_task("passkey")
    class Passkey(EvalTask):
        Settings = PasskeySettings          # a dataclass: every setting's type and default (conf/eval/passkey.yaml
                                            # holds only what differs; schema/eval/passkey in Hydra's ConfigStore)
        def check(self, loaded, settings): ...        # raise EvalError before any compute
        def run(self, loaded, settings, out_dir, progress) -> dict[str, float]: ...

`loaded` is a `groundthink.load(...)` result (groundthink.loading.LoadedRun). `run` writes its files (JSON, CSV,
PNG) into `out_dir` (a fresh folder that replaces `<run>/eval/<task>/` atomically when the task succeeds, see
groundthink.evaluation.suite) and returns a flat dict of scalars; the suite stores them as `eval/<task>/<key>` in
`result.json`, logs them to W&B and `groundthink-compare` shows them as columns. `progress(total, desc)` returns a
tqdm-like bar (`update(n)`, `close()`).

Adding a task = a module in this package with its decorated class, imported by tasks/__init__.py, plus
conf/eval/<task>.yaml and its test; nothing else names it.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch


class EvalError(ValueError):
    """A task whose settings do not fit the run or model (or a run it cannot read): one line saying what to change."""


class EvalTask:
    """Base of the registered tasks (see the module docstring)."""

    name: ClassVar[str]
    Settings: ClassVar[type]
    needs_model: ClassVar[bool] = True
    description: ClassVar[str] = ""

    def check(self, loaded: Any, settings: Any) -> None:
        """Raise EvalError when the settings do not fit this run (vocabulary, context, tokenizer): before compute."""

    def run(self, loaded: Any, settings: Any, out_dir: Path, progress: Callable[..., Any]) -> dict[str, float]:
        raise NotImplementedError


TASKS: dict[str, type[EvalTask]] = {}


def register_task(name: str) -> Callable[[type[EvalTask]], type[EvalTask]]:
    def decorate(cls: type[EvalTask]) -> type[EvalTask]:
        cls.name = name
        TASKS[name] = cls
        return cls

    return decorate


# ----- shared helpers ----------------------------------------------------------------------------------------------
def need_tokenizer(loaded: Any, task: str) -> Any:
    if loaded.tokenizer is None:
        raise EvalError(f"eval task '{task}' reads text, but this run has no tokenizer (it was trained on "
                        f"token-level synthetic data); use the mqar, dynamics or (for data=passkey runs) passkey task")
    return loaded.tokenizer


def check_positive(task: str, **values: Any) -> None:
    for key, value in values.items():
        items = value if isinstance(value, (list, tuple)) else [value]
        if not items or any(int(v) < 1 for v in items):
            raise EvalError(f"eval.tasks.{task}.{key}={value}: must be >= 1" + (" (and not empty)" if
                                                                              isinstance(value, (list, tuple))
                                                                              else ""))


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def feed(model: torch.nn.Module, ids: Sequence[int], state: Any, chunk: int = 512) -> tuple[torch.Tensor, Any]:
    """Feed one lane's ids after `state` in chunks (the generation engine's prefill); returns the logits of the
    last position [V] (fp32) and the new state."""
    from groundthink.generation import prefill

    return prefill(model, ids, state, chunk=chunk)


@torch.inference_mode()
def score_candidates(model: torch.nn.Module, state: Any, last_logits: torch.Tensor,
                     candidates: Sequence[Sequence[int]]) -> list[float]:
    """log P(candidate | the context behind `state`) for each candidate token list, all in one batch.

    `state` (batch 1) is the carried state after the context and `last_logits` [V] the logits of its last position
    (they predict the candidates' first token). The state is copied into one lane per candidate; candidates are
    right-padded, which is exact because every layer is causal.
    """
    n, longest = len(candidates), max(len(c) for c in candidates)
    if any(len(c) == 0 for c in candidates):
        raise ValueError("every candidate must hold at least one token")
    device = last_logits.device
    lanes = state.map(lambda t: t.repeat_interleave(n, dim=0))
    batch = torch.zeros(n, longest, dtype=torch.long, device=device)
    for row, cand in enumerate(candidates):
        batch[row, : len(cand)] = torch.as_tensor(list(cand), dtype=torch.long)
    first = last_logits.log_softmax(-1)
    scores = [float(first[c[0]]) for c in candidates]
    if longest > 1:
        logits, _ = model(batch[:, :-1], lanes)
        logp = logits.float().log_softmax(-1)
        for row, cand in enumerate(candidates):
            for j in range(1, len(cand)):
                scores[row] += float(logp[row, j - 1, cand[j]])
    return scores


def copy_state(state: Any) -> Any:
    return state.map(torch.Tensor.clone)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n", encoding="utf-8")


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        path.write_text("", encoding="utf-8")
        return
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(path: Path, series: dict[str, tuple[Sequence[float], Sequence[float]]], *, title: str, xlabel: str,
         ylabel: str, logx: bool = False, hline: float | None = None, vlines: Sequence[float] = ()) -> Path:
    """One PNG with a line per series {label: (x, y)} (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, (x, y) in series.items():
        ax.plot(list(x), list(y), marker="o", markersize=3, label=label)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=1, label=f"chance {hline:.3g}")
    for v in vlines:
        ax.axvline(v, color="red", linestyle=":", linewidth=1)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1 or hline is not None:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def finite_or_nan(value: float) -> float:
    return float(value) if value is not None and math.isfinite(float(value)) else math.nan
