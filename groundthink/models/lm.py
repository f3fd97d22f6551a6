"""HybridLM: embedding -> blocks (one Block per layer letter) -> final norm -> head, with carried state.

`forward(tokens, state)` continues a stream exactly from `state` (an LMState) and returns the next one, so a
long stream fed segment by segment gives the same logits as one pass (truncated BPTT: the caller detaches).

Init: embedding and (untied) head N(0, 0.02), as in mamba_ssm / GPT-2, rather than RWKV-LM's U(±1e-4)
embedding + ln0 + orthogonal head. With pre-norm blocks both train; N(0, 0.02) needs no extra ln0, keeps the
residual stream at a scale comparable to γ·branch at γ = 0.01, and is what the weight-tied variant wants.
Mixers and FFNs use their own official inits (see groundthink/mixers).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch
from torch import nn

from groundthink.mixers import MIXERS
from groundthink.mixers._common import default_device
from groundthink.models.block import Block, make_norm
from groundthink.models.config import ModelConfig
from groundthink.models.state import LMState

# Gradient-diagnostics components: one per registered sequence mixer (its branch name), then the rest.
COMPONENTS = (*(mixer.branch for mixer in MIXERS.values()), "ffn", "embed_head", "norm_other")
_BRANCH_COMPONENT = {**{mixer.branch: mixer.branch for mixer in MIXERS.values()}, "ffn": "ffn"}


class HybridLM(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None) -> None:
        """`device`: where the model will run, used once to resolve impl="auto" (default: CUDA if any)."""
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"HybridLM needs a ModelConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        device = device if device is not None else default_device()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(
            Block(cfg, i, letter, device=device) for i, letter in enumerate(cfg.layer_letters())
        )
        self.norm_f = make_norm(cfg.norm, cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        with torch.no_grad():
            nn.init.normal_(self.embed.weight, std=0.02)
            if cfg.tie_embeddings:
                self.head.weight = self.embed.weight
            else:
                nn.init.normal_(self.head.weight, std=0.02)
        # What the blocks read of the stream position: RoPE all of it, StateNorm only its phase (position mod the
        # interval), the other mixers nothing. Blocks get the position reduced to what they read, so that a
        # compiled block (trainer.compile) sees one value per phase instead of a new int to recompile for each step.
        rope = any(getattr(m, "rope_base", None) is not None for m in self.modules())
        intervals = [m.state_norm_interval for m in self.modules() if getattr(m, "state_norm", False) is True]
        self.position_period = None if rope else math.lcm(*intervals) if intervals else 1

    # ----- state ---------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, device=None) -> LMState:
        """The start of a stream: zeros, or grounding_strength·h0 where learn_h0 is on (differentiable)."""
        device = device if device is not None else self.embed.weight.device
        return LMState([block.init_state(batch_size, device) for block in self.blocks], position=0)

    def state_size(self, seq_len: int | None = None) -> int:
        """Floats per batch lane in the carried state (constant: it does not grow with the stream). With seq_len:
        the state a sequence of that length fills (attention's KV cache holds min(window, seq_len) positions)."""
        return sum(block.state_size(seq_len) for block in self.blocks)

    def state_sizes(self, seq_len: int | None = None) -> dict[str, Any]:
        """{"total", "per_layer": [...], "by_mixer": {"rwkv6": ..., ...}} of `state_size(seq_len)` (the token-shift
        state of the RWKV channel-mix FFN counts under "ffn"): what summary.json records and the recall report
        plots accuracy against."""
        by_mixer: dict[str, int] = {}
        for block in self.blocks:
            for name in block.branch_names:
                by_mixer[name] = by_mixer.get(name, 0) + getattr(block, name).state_size(seq_len)
            by_mixer["ffn"] = by_mixer.get("ffn", 0) + block.ffn.state_size(seq_len)
        return {"total": self.state_size(seq_len), "per_layer": [b.state_size(seq_len) for b in self.blocks],
                "by_mixer": by_mixer, "seq_len": seq_len}

    def impls(self) -> dict[str, str]:
        """The implementation each op resolved to at construction, for logging: {"wkv6": "chunked", ...}."""
        found: dict[str, str] = {}
        for block in self.blocks:
            for branch in block.branch_names:
                found.update(getattr(block, branch).impls())
        return found

    def hybrid_branches(self) -> tuple[str, str] | None:
        """The branch names of the hybrid (two-mixer) blocks, e.g. ("rwkv", "mamba"), or None without one."""
        return next((b.branch_names for b in self.blocks if len(b.branch_names) == 2), None)

    # ----- forward -------------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, state: LMState | None = None) -> tuple[torch.Tensor, LMState]:
        """tokens [B,T] long -> (logits [B,T,V], the state after the last token)."""
        if tokens.ndim != 2 or tokens.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(
                f"tokens must be a [B,T] integer tensor, got dtype {tokens.dtype} shape {tuple(tokens.shape)}"
            )
        B, T = tokens.shape
        if T < 1:
            raise ValueError("tokens must hold at least one time step (T >= 1)")
        if state is None:
            state = self.init_state(B, tokens.device)
        if len(state.layers) != len(self.blocks):
            raise ValueError(f"state has {len(state.layers)} layers but the model has {len(self.blocks)}")
        x = self.embed(tokens)
        layers = []
        position = state.position if self.position_period is None else state.position % self.position_period
        for block, layer_state in zip(self.blocks, state.layers):
            x, new = block(x, layer_state, position=position)
            layers.append(new)
        logits = self.head(self.norm_f(x))
        # Each state tensor in its own memory: a token-shift state is a view of the last row of a [B,T,D] activation,
        # which would keep the whole activation alive while the state is carried, and would hand a compiled block
        # (trainer.compile) a new stride to recompile for.
        return logits, LMState(layers, state.position + T).map(torch.Tensor.contiguous)

    @torch.no_grad()
    def generate(
        self,
        prompt_ids,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        state: LMState | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, LMState]:
        """Stream tokens one at a time with the carried state; memory does not grow with the output.

        prompt_ids: [B,T] or [T] ids (or a list). temperature 0 = greedy. Returns (new ids [B,max_new_tokens],
        the state after the last generated token, ready to continue the stream).
        """
        device = self.embed.weight.device
        tokens = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k={top_k} must be >= 1 or None")
        logits, state = self(tokens, state)
        next_logits = logits[:, -1].float()
        out = []
        for _ in range(max_new_tokens):
            if temperature == 0:
                token = next_logits.argmax(-1)
            else:
                scaled = next_logits / temperature
                if top_k is not None and top_k < scaled.shape[-1]:
                    kth = scaled.topk(top_k, dim=-1).values[:, -1:]
                    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
                token = torch.multinomial(scaled.softmax(-1), 1, generator=generator)[:, 0]
            out.append(token)
            logits, state = self(token[:, None], state)
            next_logits = logits[:, -1].float()
        new_ids = torch.stack(out, dim=1) if out else tokens.new_zeros(tokens.shape[0], 0)
        return new_ids, state

    # ----- parameters ----------------------------------------------------------------------------------
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def param_groups(self, weight_decay: float, lora_weight_decay: bool = False) -> list[dict]:
        """AdamW groups with weight-decay isolation.

        No decay for every parameter with ndim < 2 (norms, biases, time_decay, lerp coefficients, A_log,
        dt_bias, D, γ, α), for every parameter a mixer marked `no_weight_decay` (bonus u, h0), and for the
        low-rank data-dependent mixing/decay projections a mixer marked `lora` (RWKV-6's time_maa_w1/w2 and
        time_decay_w1/w2, as in RWKV-LM's optimizer groups) unless `lora_weight_decay`; decay for the rest
        (projection matrices, conv weights, embedding/head).
        """
        decay, no_decay = [], []
        for _, param in self.named_parameters():
            if not param.requires_grad:
                continue
            lora = getattr(param, "_lora", False)
            if param.ndim < 2 or getattr(param, "_no_weight_decay", False) or (lora and not lora_weight_decay):
                no_decay.append(param)
            else:
                decay.append(param)
        groups = [
            {"params": decay, "weight_decay": float(weight_decay), "group": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "group": "no_decay"},
        ]
        return [g for g in groups if g["params"]]

    @staticmethod
    def mixer_components() -> tuple[str, ...]:
        """The components that are sequence mixers (one per registered mixer's branch)."""
        return tuple(mixer.branch for mixer in MIXERS.values())

    @staticmethod
    def component_of(param_name: str) -> str:
        """Which component a parameter (or module) name belongs to: one of COMPONENTS.

        Mixer-internal norms count with their mixer (rwkv's ln_x, mamba's gated norm); block norms, branch
        norms, γ, α and the final norm are "norm_other". A leading wrapper prefix such as "model." is ignored.
        """
        parts = param_name.split(".")
        for i, part in enumerate(parts):
            if part in ("embed", "head"):
                return "embed_head"
            if part == "blocks":
                branch = parts[i + 2] if i + 2 < len(parts) else ""
                return _BRANCH_COMPONENT.get(branch, "norm_other")
            if part == "norm_f":
                return "norm_other"
        return "norm_other"

    def component_param_counts(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for name, param in self.named_parameters():
            counts[self.component_of(name)] += param.numel()
        return dict(counts)
