"""Measurements of a model's recurrent state and of its predictions, in plain PyTorch.

Used by the training diagnostics (groundthink/training/diagnostics.py) and by the gates (groundthink/gates). The
state matrices measured are the recurrent states of the carried LMState that each mixer declares
(`SequenceMixer.recurrent_state`, e.g. RWKV-6 `wkv` [B,H,K,V] and Mamba-2 `ssm` [B,H,P,N]); token-shift and conv
tails and attention windows are not recurrent memories and are not declared.
Singular values are taken per lane and head, of the [K,V] (or [P,N]) matrix, in fp32.

Definitions:
- **cosine** of two states of the same lane and head: <S_a, S_b> / (|S_a| |S_b|) of the flattened [K,V] matrices,
  per head (each head is its own memory; a whole-layer cosine would only see the head with the largest norm).
  Two zero matrices count as identical (1: a state that stays at zero is as frozen as any other), one as 0.
- **top-k energy**: sum_{i<=k} s_i^2 / sum_i s_i^2 over the singular values s_1 >= s_2 >= ... of a head's matrix:
  the share of its Frobenius energy that the best rank-k approximation keeps (Eckart-Young). 1 means rank <= k
  (structured); an isotropic r x r matrix gives k/r (noise-like). Undefined (nan) for a zero matrix.
- **spectral entropy** ("state entropy"): H = -sum_i p_i ln p_i in nats with p_i = s_i / sum_j s_j, the normalised
  singular-value spectrum; exp(H) is the effective rank of Roy & Vetterli (EUSIPCO 2007). Range [0, ln min(K,V)]:
  0 for a rank-1 state, ln 64 = 4.16 for a 64 x 64 head with a flat spectrum. nan for a zero matrix.
- **norm**: the Frobenius norm of a lane's whole state tensor (all heads).
- **decay saturation**: the per-token retention factor of every memory channel (what each recurrent mixer passes
  to `observe_decay`: RWKV-6 w_t = exp(log w_t) per head and key channel, Mamba-2 a_t = exp(dt_t A_h) per head,
  GLA's gate per key channel), is saturated when a_t > 1 - eps (the channel never
  forgets within reach of training) or a_t < eps (it forgets everything at every token). Both ends are where the
  derivative of the retention with respect to its pre-activation, a ln a, vanishes (|a ln a| ~ eps), as for a
  sigmoid gate beyond 1 - eps or below eps. Fraction over every token, lane and channel of the forward pass.
- **predictive entropy**: the mean over predicted positions of -sum_v p_v ln p_v of the softmax of the logits, in
  nats; ln V for uniform logits, 0 for a one-hot prediction.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from groundthink.mixers import SequenceMixer, mixer_for_branch


def _recurrent_mixers(model: torch.nn.Module) -> Iterator[tuple[int, str, SequenceMixer]]:
    """(layer index, branch, mixer) for every branch of the model that declares a recurrent state."""
    for i, block in enumerate(getattr(model, "blocks", [])):
        for branch in getattr(block, "branch_names", ()):
            mixer = getattr(block, branch)
            if mixer.recurrent_state:
                yield i, branch, mixer


def has_recurrent_layer(model: torch.nn.Module) -> bool:
    """True when some block of the model has a mixer with a recurrent state to measure."""
    return next(_recurrent_mixers(model), None) is not None


def recurrent_states(state: Any) -> Iterator[tuple[int, str, torch.Tensor]]:
    """(layer index, branch, state matrix [B,H,K,V]) for every declared recurrent state of an LMState, in layer
    order (a mixer with several recurrent states is reported per state as branch/key after the first)."""
    for i, branches in enumerate(state.layers):
        for branch, tensors in branches.items():
            mixer = mixer_for_branch(branch)
            for j, key in enumerate(mixer.recurrent_state if mixer is not None else ()):
                if key in tensors:
                    yield i, branch if j == 0 else f"{branch}/{key}", tensors[key]


def state_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per lane and head of two states [B,H,...] -> [B,H] (fp64; zeros: module docstring)."""
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"states to compare must have the same [B,H,...] shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    a, b = a.detach().flatten(2).double(), b.detach().flatten(2).double()
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    cos = (a * b).sum(-1) / (na * nb).clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where((na == 0) & (nb == 0), torch.ones_like(cos), cos)


def singular_values(state: torch.Tensor) -> torch.Tensor:
    """Singular values of every head's matrix, descending: [B,H,K,V] -> [B,H,min(K,V)] (fp32)."""
    return torch.linalg.svdvals(state.detach().float())


def top_k_energy(singular: torch.Tensor, k: int) -> torch.Tensor:
    """Share of the squared singular values in the k largest: [...,r] -> [...] (nan where all are zero)."""
    energy = singular.double().square()
    total = energy.sum(-1)
    top = energy[..., :k].sum(-1)
    return torch.where(total > 0, top / total.clamp_min(torch.finfo(torch.float64).tiny), torch.nan)


def spectral_entropy(singular: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of the normalised singular values: [...,r] -> [...] (nan where all are zero)."""
    s = singular.double()
    total = s.sum(-1, keepdim=True)
    p = s / total.clamp_min(torch.finfo(torch.float64).tiny)
    entropy = -torch.special.xlogy(p, p).sum(-1)
    return torch.where(total[..., 0] > 0, entropy, torch.nan)


def lane_norm(state: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of each lane's state: [B,...] -> [B]."""
    return state.detach().flatten(1).double().norm(dim=1)


def predictive_entropy(
    logits: torch.Tensor, mask: torch.Tensor | None = None, *, max_positions: int | None = None, chunk: int = 1024
) -> float:
    """Mean entropy (nats) of softmax(logits) over positions [...,V] where `mask` is True.

    At most `max_positions` positions (the first ones in row-major order) are used, and they are processed
    `chunk` rows at a time, so a large vocabulary costs bounded memory. nan when no position is selected.
    """
    rows = logits.detach().reshape(-1, logits.shape[-1])
    if mask is not None:
        rows = rows[mask.reshape(-1).to(rows.device)]
    if max_positions is not None:
        rows = rows[:max_positions]
    if rows.shape[0] == 0:
        return math.nan
    total = 0.0
    for start in range(0, rows.shape[0], chunk):
        logp = F.log_softmax(rows[start : start + chunk].float(), dim=-1)
        total += float(-(logp.exp() * logp).sum(-1).sum())
    return total / rows.shape[0]


def saturated(log_retention: torch.Tensor, eps: float) -> torch.Tensor:
    """Bool mask of saturated retention factors given their natural logs (<= 0): a > 1 - eps or a < eps."""
    return (log_retention > math.log1p(-eps)) | (log_retention < math.log(eps))


class DecaySaturation:
    """Counts saturated per-token decays of every recurrent mixer during the forwards run inside `with`.

        with DecaySaturation(model, eps=1e-3) as sat:
            model(tokens, state)
        sat.fractions()  # {(layer, "rwkv"): 0.004, (layer, "mamba"): 0.0, ...}

    Every recurrent mixer reports its per-step log retention through `observe_decay`; this installs an observer
    on each for the duration of the block and removes it on exit, so a model outside it runs exactly as before.
    """

    def __init__(self, model: torch.nn.Module, eps: float) -> None:
        if not 0.0 < eps < 0.5:
            raise ValueError(f"saturation eps={eps} must be in (0, 0.5)")
        self.model = model
        self.eps = float(eps)
        self.counts: dict[tuple[int, str], list[int]] = {}
        self._undo: list[Any] = []

    def _add(self, key: tuple[int, str], log_retention: torch.Tensor) -> None:
        with torch.no_grad():
            n_sat = int(saturated(log_retention, self.eps).sum())
        count = self.counts.setdefault(key, [0, 0])
        count[0] += n_sat
        count[1] += log_retention.numel()

    def __enter__(self) -> DecaySaturation:
        for layer, branch, mixer in _recurrent_mixers(self.model):
            self._observe(layer, branch, mixer)
        return self

    def _observe(self, layer: int, branch: str, mixer: SequenceMixer) -> None:
        def observer(_mixer: SequenceMixer, log_retention: torch.Tensor) -> None:
            self._add((layer, branch), log_retention)

        mixer.decay_observer = observer
        self._undo.append(lambda: mixer.__dict__.pop("decay_observer", None))

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()

    def fractions(self) -> dict[tuple[int, str], float]:
        return {key: n_sat / total for key, (n_sat, total) in self.counts.items() if total}
