"""Gates G0-G2: checks of a tokenizer and of a model at initialisation; no training needed.

- G0: every control token encodes as exactly its own single id, alone and inside text ("Hello <tok>world",
  which must also decode back unchanged): groundthink.data.tokenizer.probe_control_tokens.
- G1: a forward pass of a [B,T] batch of random ids (T odd, so no chunk size divides it) gives logits [B,T,V]
  and a state with exactly the shapes of `init_state`; logits and state are finite; the cross-entropy gradient
  of every parameter is finite; and continuing from the carried state (first half, then the second half with the
  returned state) reproduces the one-pass logits within `rel_tol` (max |diff| / max |logits|).
- G2: the spectral entropy (state_metrics.spectral_entropy: entropy in nats of the normalised singular values of
  each head's state matrix, i.e. the log of its effective rank) of every recurrent layer's state after one
  forward of a sample batch of real text from the initial state, averaged over lanes and heads; the gate value
  is the mean over recurrent layers. Required: the model has a recurrent layer and every such state is finite
  and non-zero. The band [2.0, 5.0] is a warning (SPEC §4) unless removed from `warning_criteria`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from groundthink.data.tokenizer import probe_control_tokens
from groundthink.evaluation.state_metrics import (
    has_recurrent_layer,
    recurrent_states,
    singular_values,
    spectral_entropy,
)
from groundthink.gates.registry import GateContext, register_gate
from groundthink.gates.report import Criterion, measured


# ----- G0 --------------------------------------------------------------------------------------------------------
def control_token_criteria(tokenizer) -> list[Criterion]:
    criteria = []
    for p in probe_control_tokens(tokenizer):
        criteria.append(Criterion(
            f"control_token/{p.token}/alone", len(p.alone), 1, "==", p.alone_ok,
            f"encode({p.token!r}) = {p.alone}, its id is {p.id}",
        ))
        count = p.in_text.count(p.id) if p.id is not None else 0
        criteria.append(Criterion(
            f"control_token/{p.token}/in_text", count, 1, "==", p.in_text_ok,
            f"encode({p.text!r}) = {p.in_text[:24]}{' ...' if len(p.in_text) > 24 else ''} holds id {p.id} "
            f"{count}x; decodes back {'unchanged' if p.round_trip else 'differently'}",
        ))
    return criteria


# ----- G1 --------------------------------------------------------------------------------------------------------
def _state_shapes(state) -> dict[str, tuple[int, ...]]:
    return {
        f"L{i}/{branch}/{key}": tuple(t.shape)
        for i, branches in enumerate(state.layers)
        for branch, tensors in branches.items()
        for key, t in tensors.items()
    }


def forward_criteria(
    model: torch.nn.Module, *, batch_size: int, seq_len: int, rel_tol: float, label: str = "", seed: int = 0
) -> list[Criterion]:
    """G1 on one model (see the module docstring). Leaves no gradient behind."""
    from groundthink.training.module import first_non_finite_module

    prefix = f"{label}/" if label else ""
    device = next(model.parameters()).device
    vocab = model.cfg.vocab_size
    tokens = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))
    tokens = tokens.to(device)
    where = f"random ids [{batch_size},{seq_len}], vocab {vocab}"
    try:
        logits, state = model(tokens)
    except Exception as exc:  # noqa: BLE001 - the failure is the gate's evidence
        return [Criterion(f"{prefix}forward_runs", f"{type(exc).__name__}: {exc}", "no exception", "==", False, where)]
    criteria = [Criterion(f"{prefix}forward_runs", "ok", "no exception", "==", True, where)]

    expected, got = _state_shapes(model.init_state(batch_size, device)), _state_shapes(state)
    wrong = [k for k in sorted(set(expected) | set(got)) if expected.get(k) != got.get(k)]
    shapes_ok = tuple(logits.shape) == (batch_size, seq_len, vocab) and not wrong
    criteria.append(Criterion(
        f"{prefix}shapes", list(logits.shape), [batch_size, seq_len, vocab], "==", shapes_ok,
        f"logits {tuple(logits.shape)}; {len(got)} state tensors"
        + (f"; state shapes differ from init_state at {wrong[:4]}" if wrong else ", all as init_state"),
    ))

    finite = bool(torch.isfinite(logits).all()) and all(bool(torch.isfinite(t).all()) for t in state.tensors())
    evidence = "logits and every state tensor finite"
    if not finite:
        evidence = first_non_finite_module(model, tokens, None)
        bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            evidence += f"; non-finite parameter '{bad[0]}' ({model.component_of(bad[0])})"
    criteria.append(Criterion(f"{prefix}finite_outputs", finite, True, "==", finite, evidence))

    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), tokens[:, 1:].reshape(-1))
    model.zero_grad(set_to_none=True)
    loss.backward()
    bad_grads = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    n_grads = sum(p.grad is not None for p in model.parameters())
    model.zero_grad(set_to_none=True)
    criteria.append(Criterion(
        f"{prefix}finite_gradients", len(bad_grads), 0, "==", not bad_grads,
        f"{n_grads} parameters got a gradient"
        + (f"; first non-finite: '{bad_grads[0]}' ({model.component_of(bad_grads[0])})" if bad_grads else ""),
    ))

    with torch.no_grad():
        full = logits.detach()
        half = seq_len // 2
        first, carried = model(tokens[:, :half])
        second, _ = model(tokens[:, half:], carried)
        diff = float((torch.cat([first, second], 1) - full).abs().max())
        scale = float(full.abs().max())
    rel = diff / scale if scale > 0 else diff
    criteria.append(measured(
        f"{prefix}carried_state_continues", rel, "<=", rel_tol,
        f"logits of [:{half}] then [{half}:] from the carried state vs one pass: max |diff| {diff:.3g}, "
        f"max |logit| {scale:.3g}",
    ))
    return criteria


# ----- G2 --------------------------------------------------------------------------------------------------------
def sample_tokens(tokenizer, texts: Sequence[str], batch_size: int, seq_len: int) -> torch.Tensor:
    """[batch_size, seq_len] ids: consecutive pieces of the texts encoded and concatenated (each ending with
    end-of-text), one piece per lane."""
    need = batch_size * seq_len
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text))
        ids.append(tokenizer.eos_id)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(f"the sample texts give {len(ids)} tokens; the G2 sample needs {need} "
                         f"(gate.sample.batch_size x gate.sample.seq_len)")
    return torch.tensor(ids[:need], dtype=torch.long).view(batch_size, seq_len)


def default_sample_texts() -> list[str]:
    """Real English text with no download: the language reference topics of the embedded corpus."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics) if topics[name].strip()]


@torch.no_grad()
def state_entropy_criteria(model: torch.nn.Module, tokens: torch.Tensor, band: Sequence[float],
                           *, label: str = "", where: str = "") -> list[Criterion]:
    """G2 on one model from its initial state (see the module docstring)."""
    prefix = f"{label}/" if label else ""
    device = next(model.parameters()).device
    _, state = model(tokens.to(device))
    layers = list(recurrent_states(state))
    criteria = [Criterion(
        f"{prefix}recurrent_state_present", len(layers), 1, ">=", bool(layers),
        f"{len(layers)} recurrent layer states (the states each mixer declares) in a model of "
        f"{len(state.layers)} layers",
    )]
    per_layer: dict[str, float] = {}
    for i, branch, matrix in layers:
        norm = float(matrix.double().norm())
        criteria.append(measured(
            f"{prefix}state_nonzero/L{i}/{branch}", norm, ">", 0.0,
            f"Frobenius norm of the {branch} state {tuple(matrix.shape)} after the sample forward",
        ))
        if math.isfinite(norm) and norm > 0:
            per_layer[f"L{i}/{branch}"] = float(spectral_entropy(singular_values(matrix)).nanmean())
    low, high = (float(b) for b in band)
    value = sum(per_layer.values()) / len(per_layer) if per_layer else None
    listing = ", ".join(f"{k} {v:.2f}" for k, v in per_layer.items())
    criteria.append(measured(
        f"{prefix}state_entropy", value, "in", [low, high],
        f"mean over {len(per_layer)} recurrent layers of the spectral entropy (nats) after {where or 'a sample'} "
        f"from the initial state: {listing or 'no measurable layer'}",
    ))
    return criteria


# ----- registration ----------------------------------------------------------------------------------------------
def _sample(gate: dict) -> tuple[int, int]:
    sample = gate.get("sample") or {}
    return int(sample["batch_size"]), int(sample["seq_len"])


@register_gate("G0", "every control token encodes as a single token", reads=("tokenizer",))
def g0(ctx: GateContext, gate: dict) -> list[Criterion]:
    return control_token_criteria(ctx.tokenizer)


@register_gate("G1", "forward pass works, no NaN/Inf, shapes correct", thresholds=("rel_tol",),
               extras={"sample": ("batch_size", "seq_len")}, reads=("model",))
def g1(ctx: GateContext, gate: dict) -> list[Criterion]:
    batch_size, seq_len = _sample(gate)
    return forward_criteria(ctx.model, batch_size=batch_size, seq_len=seq_len,
                            rel_tol=float(gate["thresholds"]["rel_tol"]))


@register_gate("G2", "state entropy at step 0 in the band (a warning band)", thresholds=("state_entropy_band",),
               extras={"sample": ("batch_size", "seq_len")}, reads=("model", "tokenizer"),
               applies_to=has_recurrent_layer)
def g2(ctx: GateContext, gate: dict) -> list[Criterion]:
    batch_size, seq_len = _sample(gate)
    model = ctx.model
    source = "held-out text" if ctx.texts else "the language-reference text"
    tokens = sample_tokens(ctx.tokenizer, ctx.texts or default_sample_texts(), batch_size, seq_len)
    where = f"one forward of {batch_size} x {seq_len} tokens of {source}"
    if ctx.step:
        # G2 is defined at step 0: measure a fresh initialisation of the same config rather than the trained model.
        with torch.random.fork_rng():
            torch.manual_seed(ctx.seed)
            model = type(model)(model.cfg, device=next(model.parameters()).device)
        where += f" (a fresh initialisation with seed {ctx.seed}: this run trained {ctx.step} steps)"
    return state_entropy_criteria(model, tokens, gate["thresholds"]["state_entropy_band"], where=where)
