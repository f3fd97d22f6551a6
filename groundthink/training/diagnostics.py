"""Training diagnostics: component gradient norms, recurrent-state health and output entropy, every N steps.

Three Lightning callbacks, built from the `diagnostics` config group by `build_diagnostics`. Each runs on the
(1-based) optimizer steps s with s % every_n_steps == 0 (so its values land in the same metrics.csv rows as
train/loss when every_n_steps is a multiple of trainer.log_every_n_steps) and costs nothing on the other steps:
no hook is installed, no tensor kept, no extra forward. every_n_steps: 0 turns one off (it is not even built).
Values go straight to the trainer's loggers (metrics.csv and W&B) at the step being measured, independent of
trainer.log_every_n_steps. Alerts are `DiagnosticWarning`s, raised once when a value leaves its band and again
only after it has come back (no spam while it stays out).

Metrics (definitions of the state and entropy measures: groundthink/evaluation/state_metrics.py):
- `diag/grad_norm/<component>`: L2 norm of the gradients of a component's parameters (one component per mixer
  branch, e.g. rwkv, mamba, attention, gla, then ffn, embed_head, norm_other: HybridLM.component_of), before
  clipping; `diag/grad_norm/total` over all; `diag/grad_ratio_<a>_<b>` = the norm of the hybrid block's first
  branch over its second (e.g. `diag/grad_ratio_rwkv_mamba`), alert outside `ratio_band` (SPEC: [0.1, 10]);
  `diag/grad_norm/in_band` = 1 when the total is inside `total_band`, else 0 (alert on leaving it). A NaN/Inf
  gradient stops the run with a NonFiniteLossError naming the parameter and its component (`stop_on_non_finite`).
- `diag/state/L<i>/<branch>/<cos|svd_top5|entropy|saturation|norm>` per recurrent layer i and branch, from the state
  carried out of step s against the one carried into it: cosine similarity per head, mean over heads and the
  lanes that did not restart a document in step s (>= `frozen_cos` alerts: the state no longer changes); top-k
  singular-value energy and spectral entropy (mean over the first `max_lanes` lanes and the heads); decay
  saturation during step s's forward; mean Frobenius norm per lane, alert at `max_norm` or above (the research
  plan's state-explosion check: carried-state norms should stay below 10; with StateNorm the norm is fixed by
  construction, so the alert is off and the direction change (cos) is what matters). A non-finite carried state
  alerts, naming the layer and branch.
- `diag/output_entropy`: mean predictive entropy (nats) of step s's logits at positions with a target; alert
  below `collapse_below` (SPEC: 0.3).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import fields
from typing import Any

import lightning as L
import torch

from groundthink.evaluation.state_metrics import (
    DecaySaturation,
    has_recurrent_layer,
    lane_norm,
    predictive_entropy,
    recurrent_states,
    singular_values,
    spectral_entropy,
    state_cosine,
    top_k_energy,
)
from groundthink.training.callbacks import log_metrics
from groundthink.training.module import NonFiniteLossError
from groundthink.training.settings import (  # noqa: F401 - the settings live there (no Lightning import); kept here
    DiagnosticsSettings,
    EntropySettings,
    GradNormSettings,
    StateSettings,
)


class DiagnosticWarning(UserWarning):
    """A training diagnostic left its healthy band (gradient ratio, state frozen, output entropy collapse, ...)."""


def is_due(step: int, every_n_steps: int) -> bool:
    """True on the (1-based) optimizer steps a diagnostic with this period measures: s % N == 0."""
    return every_n_steps > 0 and step % every_n_steps == 0


class _Alerts:
    """Edge-triggered alerts: one warning when a condition turns bad, silence until it has been good again."""

    def __init__(self) -> None:
        self.active: set[str] = set()
        self.raised: list[tuple[int, str]] = []

    def update(self, key: str, bad: bool, step: int, message: str) -> None:
        if bad and key not in self.active:
            self.active.add(key)
            self.raised.append((step, message))
            # Attributed to "groundthink diagnostics" rather than a source line, so the console shows the message only.
            warnings.warn_explicit(f"step {step}: {message}", DiagnosticWarning, "groundthink diagnostics", 0)
        elif not bad:
            self.active.discard(key)


def _band(value: Iterable[float], name: str) -> tuple[float, float]:
    low, high = (float(v) for v in value)
    if not low < high:
        raise ValueError(f"diagnostics: {name}={[low, high]} must be [low, high] with low < high")
    return low, high


# ----------------------------------------------------------------------------------------------------------------
def component_grad_norms(named_params: Iterable[tuple[str, torch.nn.Parameter]], component_of) -> dict[str, float]:
    """{component: L2 norm of its gradients} plus "total", over the parameters that have a gradient."""
    squares: dict[str, list[torch.Tensor]] = {}
    for name, param in named_params:
        if param.grad is not None:
            squares.setdefault(component_of(name), []).append(torch.linalg.vector_norm(param.grad.float()) ** 2)
    norms = {comp: float(torch.stack(sq).sum().sqrt()) for comp, sq in squares.items()}
    if squares:
        norms["total"] = math.sqrt(math.fsum(v * v for v in norms.values()))
    return norms


class GradientNormDiagnostics(L.Callback):
    """Per-component gradient norms (before clipping), the hybrid branches' ratio and a total-norm band check."""

    def __init__(
        self,
        every_n_steps: int,
        *,
        ratio_band: Iterable[float] = (0.1, 10.0),
        total_band: Iterable[float] = (0.5, 1.5),
        stop_on_non_finite: bool = True,
    ) -> None:
        self.every_n_steps = int(every_n_steps)
        self.ratio_band = _band(ratio_band, "grad_norms.ratio_band")
        self.total_band = _band(total_band, "grad_norms.total_band")
        self.stop_on_non_finite = bool(stop_on_non_finite)
        self.alerts = _Alerts()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        step = trainer.global_step + 1  # the step whose update is about to be applied
        if not is_due(step, self.every_n_steps):
            return
        model = pl_module.model
        norms = component_grad_norms(model.named_parameters(), model.component_of)
        if not norms:
            return
        bad = [c for c, v in norms.items() if c != "total" and not math.isfinite(v)]
        if bad:
            name = next(
                n for n, p in model.named_parameters()
                if p.grad is not None and model.component_of(n) == bad[0] and not torch.isfinite(p.grad).all()
            )
            message = (
                f"The gradient became non-finite at step {step}: parameter '{name}' ({bad[0]}) has a NaN/Inf "
                f"gradient (non-finite components: {', '.join(bad)}). Try a lower optim.lr or a smaller "
                "model.gamma_init."
            )
            if self.stop_on_non_finite:
                raise NonFiniteLossError(message)
            self.alerts.update("non_finite", True, step, message)
        metrics = {f"diag/grad_norm/{c}": v for c, v in norms.items()}
        low, high = self.total_band
        in_band = low <= norms["total"] <= high
        metrics["diag/grad_norm/in_band"] = float(in_band)
        self.alerts.update(
            "total", not in_band, step, f"total gradient norm {norms['total']:.3g} left the band [{low:g}, {high:g}]"
        )
        pair = model.hybrid_branches()
        if pair is not None and all(b in norms for b in pair):
            first, second = pair
            ratio = norms[first] / norms[second] if norms[second] > 0 else math.inf
            metrics[f"diag/grad_ratio_{first}_{second}"] = ratio
            low, high = self.ratio_band
            self.alerts.update(
                "ratio",
                not low <= ratio <= high,
                step,
                f"{first}/{second} gradient-norm ratio {ratio:.3g} left the band [{low:g}, {high:g}] "
                f"({first} {norms[first]:.3g}, {second} {norms[second]:.3g}): one branch dominates the learning",
            )
        log_metrics(trainer, metrics, step)


# ----------------------------------------------------------------------------------------------------------------
class StateHealthDiagnostics(L.Callback):
    """Recurrent-state health per layer and branch: cosine to the previous state, top-k SVD energy, spectral
    entropy, decay saturation and norm (definitions: groundthink/evaluation/state_metrics.py)."""

    def __init__(
        self,
        every_n_steps: int,
        *,
        top_k: int = 5,
        saturation_eps: float = 1e-3,
        frozen_cos: float = 0.99,
        max_norm: float = 10.0,
        max_lanes: int | None = 4,
    ) -> None:
        if int(top_k) < 1:
            raise ValueError(f"diagnostics: state.top_k={top_k} must be >= 1")
        self.every_n_steps = int(every_n_steps)
        self.top_k = int(top_k)
        self.saturation_eps = float(saturation_eps)
        self.frozen_cos = float(frozen_cos)
        self.max_norm = float(max_norm)
        self.max_lanes = int(max_lanes) if max_lanes else None
        self.norm_alert = True  # off for models whose StateNorm fixes the norm (on_fit_start)
        self.alerts = _Alerts()
        self._step: int | None = None
        self._before = None
        self._saturation: DecaySaturation | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self.norm_alert = not getattr(getattr(pl_module.model, "cfg", None), "state_norm", False)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step + 1
        if not is_due(step, self.every_n_steps) or self._step == step:  # once per step, also with accumulation
            return
        self._step = step
        self._before = pl_module.carried
        self._saturation = DecaySaturation(pl_module.model, self.saturation_eps).__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._saturation is None:
            return
        saturation, self._saturation = self._saturation, None
        saturation.remove()
        before, self._before = self._before, None
        after = pl_module.carried
        if after is None:
            return
        keep = ~batch["reset"].to(torch.bool).cpu()
        metrics = self.measure(after, before, keep, saturation.fractions(), self._step)
        log_metrics(trainer, metrics, self._step)

    def measure(self, after, before, keep: torch.Tensor | None, saturation: dict, step: int) -> dict[str, float]:
        """The metrics of one carried state `after` (and the `before` it continued from, may be None)."""
        metrics: dict[str, float] = {}
        previous = {(i, b): s for i, b, s in recurrent_states(before)} if before is not None else {}
        frozen: list[str] = []
        exploding: list[str] = []
        for i, branch, state in recurrent_states(after):
            prefix = f"diag/state/L{i}/{branch}"
            if not torch.isfinite(state).all():
                self.alerts.update(f"nonfinite/{i}/{branch}", True, step,
                                   f"the carried {branch} state of layer {i} holds NaN/Inf")
                metrics[f"{prefix}/norm"] = math.nan
                continue
            lanes = state[: self.max_lanes] if self.max_lanes else state
            singular = singular_values(lanes)  # [b,H,r]
            metrics[f"{prefix}/svd_top{self.top_k}"] = float(top_k_energy(singular, self.top_k).nanmean())
            metrics[f"{prefix}/entropy"] = float(spectral_entropy(singular).nanmean())
            metrics[f"{prefix}/norm"] = float(lane_norm(state).mean())
            if metrics[f"{prefix}/norm"] >= self.max_norm:
                exploding.append(f"L{i}/{branch} ({metrics[f'{prefix}/norm']:.3g})")
            if (i, branch) in saturation:
                metrics[f"{prefix}/saturation"] = saturation[(i, branch)]
            old = previous.get((i, branch))
            if old is not None and old.shape == state.shape:
                cos = state_cosine(old, state)  # [B,H]
                if keep is not None:
                    cos = cos[keep.to(cos.device)]
                if cos.numel():
                    value = float(cos.mean())
                    metrics[f"{prefix}/cos"] = value
                    if value >= self.frozen_cos:
                        frozen.append(f"L{i}/{branch} ({value:.4f})")
        self.alerts.update("frozen", bool(frozen), step,
                           f"recurrent state frozen (cosine to the previous step >= {self.frozen_cos}): "
                           + ", ".join(frozen))
        if self.norm_alert:
            self.alerts.update("exploding", bool(exploding), step,
                               f"carried-state norm at or above {self.max_norm:g} (state explosion): "
                               + ", ".join(exploding))
        return metrics

    def _cleanup(self) -> None:
        if self._saturation is not None:
            self._saturation.remove()
            self._saturation = None
        self._before = None

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._cleanup()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._cleanup()


# ----------------------------------------------------------------------------------------------------------------
class OutputEntropyDiagnostics(L.Callback):
    """Mean predictive entropy of the training logits (asks the module to keep them only on measured steps)."""

    def __init__(self, every_n_steps: int, *, collapse_below: float = 0.3, max_positions: int | None = 4096) -> None:
        self.every_n_steps = int(every_n_steps)
        self.collapse_below = float(collapse_below)
        self.max_positions = int(max_positions) if max_positions else None
        self.alerts = _Alerts()
        self._step: int | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step + 1
        if is_due(step, self.every_n_steps) and self._step != step:  # once per step, also with accumulation
            self._step = step
            pl_module.capture_outputs = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not pl_module.capture_outputs:
            return
        captured, pl_module.last_outputs = pl_module.last_outputs, None
        pl_module.capture_outputs = False
        if captured is None:
            return
        labels = captured["labels"]
        value = predictive_entropy(captured["logits"], labels != -100, max_positions=self.max_positions)
        self.alerts.update(
            "collapse", value < self.collapse_below, self._step,
            f"output entropy {value:.3f} nats is below {self.collapse_below} (the predictions are collapsing)",
        )
        log_metrics(trainer, {"diag/output_entropy": value}, self._step)

    def on_exception(self, trainer, pl_module, exception) -> None:
        pl_module.capture_outputs = False
        pl_module.last_outputs = None


# ----------------------------------------------------------------------------------------------------------------
_BUILDERS = {
    "grad_norms": GradientNormDiagnostics,
    "state": StateHealthDiagnostics,
    "entropy": OutputEntropyDiagnostics,
}


def build_diagnostics(settings: DiagnosticsSettings | Mapping[str, Any],
                      model: torch.nn.Module | None = None) -> list[L.Callback]:
    """The diagnostic callbacks that `settings` turns on (none when `enabled` is false or every_n_steps is 0).

    With `model` given, state health is skipped for a model without a recurrent layer (nothing to measure).
    """
    if not isinstance(settings, DiagnosticsSettings):
        settings = DiagnosticsSettings.from_dict(settings)
    if not settings.enabled:
        return []
    callbacks: list[L.Callback] = []
    for section, builder in _BUILDERS.items():
        options = {f.name: getattr(getattr(settings, section), f.name) for f in fields(getattr(settings, section))}
        every = int(options.pop("every_n_steps") or 0)
        if every < 0:
            raise ValueError(f"diagnostics.{section}.every_n_steps={every} must be >= 0 (0 = off)")
        if section == "state" and model is not None and not has_recurrent_layer(model):
            continue
        if every > 0:
            callbacks.append(builder(every, **options))
    return callbacks
