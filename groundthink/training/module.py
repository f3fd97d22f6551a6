"""The LightningModule: a thin stateful train step around a plain-PyTorch HybridLM.

Truncated BPTT: the recurrent state of every layer (WKV and SSM states, token-shift and conv tails, attention
window) is carried from one batch to the next and detached at the boundary; a lane whose batch starts a new
document gets a fresh (h0) state. The carried state, the data position and the RNG states go into every
checkpoint, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import math
import os
import signal
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from groundthink.models import HybridLM, LMState
from groundthink.training.checkpoint import capture_rng_state, restore_rng_state
from groundthink.training.schedules import warmup_cosine


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf; the message names the step and the first component that went non-finite."""


@dataclass(frozen=True)
class OptimSettings:
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    entropy_coef: float = 0.0


@dataclass(frozen=True)
class FaultSettings:
    """Deliberate faults for the failure-handling tests (all None in real runs)."""

    nan_at_step: int | None = None
    sigterm_at_step: int | None = None
    raise_at_step: int | None = None


class LMTrainingModule(L.LightningModule):
    def __init__(
        self,
        model: HybridLM,
        *,
        optim: OptimSettings,
        max_steps: int,
        token_bytes: torch.Tensor,
        faults: FaultSettings = FaultSettings(),
        run_meta: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.optim = optim
        self.max_steps = max_steps
        self.faults = faults
        # Bytes of text behind each token id (0 for control tokens): turns nats per token into bits per byte.
        self.register_buffer("token_bytes", token_bytes.float(), persistent=False)
        self.run_meta = run_meta if run_meta is not None else {}
        self.carried: LMState | None = None
        # Diagnostics callbacks set `capture_outputs` before a step they want to inspect; the step then leaves
        # its detached logits, labels and the state it started from in `last_outputs`.
        self.capture_outputs = False
        self.last_outputs: dict[str, Any] | None = None
        self.trained_position: dict[str, Any] | None = None
        self._val_state: LMState | None = None
        self._val_sums = torch.zeros(3, dtype=torch.float64)

    # ----- state handling -------------------------------------------------------------------------------
    def _state_for(self, batch: dict[str, torch.Tensor], carried: LMState | None) -> LMState:
        ids, reset = batch["input_ids"], batch["reset"]
        fresh = self.model.init_state(ids.shape[0], ids.device)
        if carried is None or carried.batch_size != ids.shape[0]:
            return fresh
        if bool(reset.any()):
            carried = carried.reset_lanes(reset, fresh)
        return carried

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = logits.float()
        flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        nll = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="none")
        valid = flat_labels != -100
        n_valid = valid.sum().clamp_min(1)
        loss = nll.sum() / n_valid
        stats = {"nats": nll.sum().detach(), "tokens": valid.sum().detach()}
        stats["bytes"] = self.token_bytes[flat_labels.clamp_min(0)][valid].sum().detach()
        if self.optim.entropy_coef > 0:
            logp = F.log_softmax(flat_logits[valid], dim=-1)
            entropy = -(logp.exp() * logp).sum(-1).mean()
            stats["entropy"] = entropy.detach()
            loss = loss - self.optim.entropy_coef * entropy
        return loss, stats

    # ----- training -------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self._inject_faults()
        state = self._state_for(batch, self.carried)
        logits, new_state = self.model(batch["input_ids"], state)
        loss, stats = self._loss(logits, batch["labels"])
        if not torch.isfinite(loss):
            raise NonFiniteLossError(self._describe_non_finite(batch, state, loss))
        if self.capture_outputs:
            self.last_outputs = {"logits": logits.detach(), "labels": batch["labels"], "state_before": state.detach()}
        self.carried = new_state.detach()
        self.trained_position = batch.get("stream_position")
        tokens = batch["input_ids"].numel()
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=tokens)
        if stats["bytes"] > 0:
            bpb = stats["nats"] / math.log(2) / stats["bytes"]
            self.log("train/bpb", bpb, batch_size=tokens)
        if "entropy" in stats:
            self.log("train/entropy", stats["entropy"], batch_size=tokens)
        self.log("train/seq_len", float(batch["input_ids"].shape[1]), batch_size=tokens)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=tokens)
        return loss

    def _inject_faults(self) -> None:
        step = self.global_step
        if self.faults.nan_at_step is not None and step == self.faults.nan_at_step:
            name, param = next((n, p) for n, p in self.model.named_parameters() if "mamba" in n or "rwkv" in n)
            with torch.no_grad():
                param.fill_(float("nan"))
        if self.faults.sigterm_at_step is not None and step == self.faults.sigterm_at_step:
            os.kill(os.getpid(), signal.SIGTERM)
        if self.faults.raise_at_step is not None and step == self.faults.raise_at_step:
            raise RuntimeError(f"deliberate failure at step {step} (faults.raise_at_step)")

    @torch.no_grad()
    def _describe_non_finite(self, batch: dict[str, Any], state: LMState, loss: torch.Tensor) -> str:
        where = f"The loss became {loss.item()} at step {self.global_step}"
        bad_params = [n for n, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad_params:
            culprit = f"parameter '{bad_params[0]}' ({self.model.component_of(bad_params[0])}) is non-finite"
        else:
            culprit = self._first_non_finite_module(batch, state)
        return (
            f"{where}: {culprit}. The run stopped; its last good checkpoint is kept in the run folder. "
            "Try a lower optim.lr, trainer.precision=32-true, or a smaller model.gamma_init."
        )

    def _first_non_finite_module(self, batch: dict[str, Any], state: LMState) -> str:
        return first_non_finite_module(self.model, batch["input_ids"], state)

    # ----- validation -----------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_state = None
        self._val_sums = torch.zeros(3, dtype=torch.float64)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        state = self._state_for(batch, self._val_state)
        logits, self._val_state = self.model(batch["input_ids"], state)
        _, stats = self._loss(logits, batch["labels"])
        self._val_sums += torch.stack([stats["nats"], stats["tokens"], stats["bytes"]]).double().cpu()

    def on_validation_epoch_end(self) -> None:
        sums = self._val_sums.to(self.device)
        if self.trainer.world_size > 1:
            sums = self.all_gather(sums).sum(0)
        nats, tokens, nbytes = (float(x) for x in sums)
        if tokens == 0:
            return
        loss = nats / tokens
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        self.log("val/ppl", math.exp(min(loss, 50.0)))
        if nbytes > 0:
            self.log("val/bpb", nats / math.log(2) / nbytes)
        self._val_state = None

    # ----- optimisation ---------------------------------------------------------------------------------
    def configure_optimizers(self):
        opt = self.optim
        optimizer = torch.optim.AdamW(
            self.model.param_groups(opt.weight_decay), lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps
        )

        def lr_lambda(step: int) -> float:
            return warmup_cosine(
                step, warmup_steps=opt.warmup_steps, max_steps=self.max_steps, min_lr_ratio=opt.min_lr_ratio
            )

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----- checkpoint content ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        metrics = {
            k: float(v) for k, v in self.trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1
        }
        checkpoint["groundthink"] = {
            **self.run_meta,
            "step": self.global_step,
            "metrics": metrics,
            "data_position": self.trained_position,
        }
        if self.carried is not None:
            checkpoint["carried_state"] = {"tensors": self.carried.to_flat(), "position": self.carried.position}
        checkpoint["rng"] = capture_rng_state()
        checkpoint["data_position"] = self.trained_position

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        carried = checkpoint.get("carried_state")
        if carried is not None:
            self.carried = LMState.from_flat(carried["tensors"], carried["position"])
        if checkpoint.get("rng") is not None:
            restore_rng_state(checkpoint["rng"])
        position = checkpoint.get("data_position")
        if position is not None and self.trainer is not None and self.trainer.datamodule is not None:
            self.trainer.datamodule.restore_position(position)
        self.trained_position = position


@torch.no_grad()
def first_non_finite_module(model: HybridLM, tokens: torch.Tensor, state: LMState | None) -> str:
    """Re-run a forward with hooks and say which module first output NaN/Inf, and its component (for messages)."""
    found: list[str] = []
    names = {m: n for n, m in model.named_modules() if n}

    def hook(module, _inputs, output):
        if found:
            return
        tensors = output if isinstance(output, (tuple, list)) else (output,)
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
                found.append(names[module])
                return

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        model(tokens, state)
    finally:
        for h in handles:
            h.remove()
    if not found:
        return "every activation is finite, so the loss itself overflowed"
    return f"the first non-finite activation is the output of '{found[0]}' ({model.component_of(found[0])})"
