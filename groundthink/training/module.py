"""The LightningModule: a thin stateful train step around a plain-PyTorch HybridLM.

Truncated BPTT: the recurrent state of every layer (WKV and SSM states, token-shift and conv tails, attention
window) is carried from one batch to the next and detached at the boundary; a lane whose batch starts a new
document gets a fresh (h0) state. The carried state, the data position and the RNG states go into every
checkpoint, so a resumed run continues bit for bit.

Steps are counted from 1 everywhere a user sees them: step s is the s-th optimizer step; its training loss, the
validation after it, its diagnostics and the checkpoint written after it all carry the number s
(`current_step` while it runs). The module leaves the step's metrics in `step_metrics`; the callbacks in
groundthink/training/callbacks.py log them, validate and checkpoint, in that order, so a checkpoint is written
only after everything logged for its step.
"""

from __future__ import annotations

import math
import os
import signal
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from groundthink.models import HybridLM, LMState
from groundthink.training.checkpoint import capture_rng_state, restore_rng_state
from groundthink.training.schedules import warmup_cosine
from groundthink.training.settings import FaultSettings, OptimSettings


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf; the message names the step and the first component that went non-finite."""


class LMTrainingModule(L.LightningModule):
    def __init__(
        self,
        model: HybridLM,
        *,
        optim: OptimSettings,
        max_steps: int,
        token_bytes: torch.Tensor | None,
        faults: FaultSettings | None = None,
        run_meta: dict[str, Any] | None = None,
        val_accuracy: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.optim = optim
        self.max_steps = max_steps
        self.faults = faults or FaultSettings()
        # Bytes of text behind each token id (0 for control tokens): turns nats per token into bits per byte.
        self.has_bytes = token_bytes is not None
        bytes_per_id = token_bytes if token_bytes is not None else torch.zeros(model.cfg.vocab_size)
        self.register_buffer("token_bytes", bytes_per_id.float(), persistent=False)
        self.run_meta = run_meta if run_meta is not None else {}
        self.val_accuracy = val_accuracy  # validation also reports val/acc (recall tasks: data=mqar, data=passkey)
        self.stopped_early: dict[str, Any] | None = None  # set by the Validation callback's early stop
        self.carried: LMState | None = None
        self.step_metrics: dict[str, float] = {}
        self.val_metrics: dict[str, float] = {}  # the latest validation's, for the checkpoint sidecar
        # Diagnostics callbacks set `capture_outputs` before a step they want to inspect; the step then leaves
        # its detached logits, labels and the state it started from in `last_outputs`.
        self.capture_outputs = False
        self.last_outputs: dict[str, Any] | None = None
        self.trained_position: dict[str, Any] | None = None
        self.step_started: int | None = None  # the step the current batch belongs to (callbacks.completed_step)

    @property
    def world_size(self) -> int:
        """Data-parallel processes of this run (1 outside a Trainer)."""
        return self.trainer.world_size if self._trainer is not None else 1

    @property
    def current_step(self) -> int:
        """The 1-based number of the optimizer step being trained (global_step counts the completed ones)."""
        return self.global_step + 1

    # ----- state handling -------------------------------------------------------------------------------
    def _state_for(self, batch: dict[str, torch.Tensor], carried: LMState | None) -> LMState:
        ids, reset = batch["input_ids"], batch["reset"]
        fresh = self.model.init_state(ids.shape[0], ids.device)
        if carried is None or carried.batch_size != ids.shape[0]:
            return fresh
        if bool(reset.any()):
            carried = carried.reset_lanes(reset, fresh)
        return carried

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor,
              denominator: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean NLL over the valid labels (or the summed NLL over `denominator`), and its sums for metrics."""
        logits = logits.float()
        flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        nll = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="none")
        valid = flat_labels != -100
        n_valid = valid.sum().clamp_min(1) if denominator is None else denominator
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
        self.step_started = self.current_step
        self._inject_faults()
        state = self._state_for(batch, self.carried)
        logits, new_state = self.model(batch["input_ids"], state)
        world = self.world_size
        denominator = self._rank_share_of_tokens(batch["labels"], world) if world > 1 else None
        loss, stats = self._loss(logits, batch["labels"], denominator)
        reported = self._global_sums(stats) if world > 1 else stats
        if not torch.isfinite(loss):
            raise NonFiniteLossError(self._describe_non_finite(batch, state, loss))
        if self.capture_outputs:
            self.last_outputs = {"logits": logits.detach(), "labels": batch["labels"], "state_before": state.detach()}
        self.carried = new_state.detach()
        self.trained_position = batch.get("stream_position")
        metrics = {"train/loss": float(loss.detach()) if world == 1 else float(reported["nats"] / reported["tokens"])}
        if reported["bytes"] > 0:
            metrics["train/bpb"] = float(reported["nats"] / math.log(2) / reported["bytes"])
        if "entropy" in stats:
            metrics["train/entropy"] = float(stats["entropy"])
        metrics["train/seq_len"] = float(batch["input_ids"].shape[1])
        metrics["train/lr"] = float(self.optimizers().param_groups[0]["lr"])
        self.step_metrics = metrics
        self.log("train/loss", loss.detach(), prog_bar=True, logger=False, batch_size=batch["input_ids"].numel())
        return loss

    @staticmethod
    def _rank_share_of_tokens(labels: torch.Tensor, world: int) -> torch.Tensor:
        """Data parallelism: the step must be the one a single process takes on the global batch (every rank's
        lanes side by side). DDP averages the ranks' gradients, so each rank divides its summed NLL by the mean
        number of valid labels per rank (global count / world) instead of its own count: the average of the ranks'
        gradients is then the gradient of the global token mean, whatever each rank's share of padding. (The
        entropy bonus, if any, stays a per-rank mean.)"""
        import torch.distributed as dist

        count = (labels != -100).sum().to(torch.float64)
        dist.all_reduce(count)
        return (count / world).clamp_min(1.0 / world).to(torch.float32)

    @staticmethod
    def _global_sums(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The NLL, label and byte sums of the whole global batch (all ranks), for the logged loss and bpb."""
        import torch.distributed as dist

        sums = torch.stack([stats["nats"].double(), stats["tokens"].double(), stats["bytes"].double()])
        dist.all_reduce(sums)
        return {"nats": sums[0], "tokens": sums[1].clamp_min(1), "bytes": sums[2]}

    def _inject_faults(self) -> None:
        step, faults = self.current_step, self.faults
        if faults.nan_at_step is not None and step == faults.nan_at_step:
            name, param = next((n, p) for n, p in self.model.named_parameters()
                               if self.model.component_of(n) in self.model.mixer_components())
            with torch.no_grad():
                param.fill_(float("nan"))
        if faults.sigterm_at_step is not None and step == faults.sigterm_at_step:
            os.kill(os.getpid(), signal.SIGTERM)
        if faults.raise_at_step is not None and step == faults.raise_at_step:
            raise RuntimeError(f"deliberate failure at step {step} (faults.raise_at_step)")

    @torch.no_grad()
    def _describe_non_finite(self, batch: dict[str, Any], state: LMState, loss: torch.Tensor) -> str:
        where = f"The loss became {loss.item()} at step {self.current_step}"
        bad_params = [n for n, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad_params:
            culprit = f"parameter '{bad_params[0]}' ({self.model.component_of(bad_params[0])}) is non-finite"
        else:
            culprit = first_non_finite_module(self.model, batch["input_ids"], state)
        return f"{where}: {culprit}"

    # ----- validation (run by groundthink.training.callbacks.Validation) --------------------------------
    @torch.no_grad()
    def validate(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """val/loss, val/ppl and val/bpb (and val/acc, the argmax accuracy at the labelled positions, when the data
        asks for it) over held-out batches read lane by lane with carried state (h0 at a document start). Under
        data parallelism each rank reads every world_size-th lane of every batch (so each lane keeps its state from
        batch to batch, as in one process) and the sums are all-reduced. Empty when there is nothing to predict."""
        was_training = self.model.training
        self.model.eval()
        sums = torch.zeros(4, dtype=torch.float64)  # nats, labelled tokens, bytes, correct argmax
        state = None
        rank, world = self.global_rank, self.world_size
        try:
            for batch in batches:
                batch = {k: v[rank::world].to(self.device) for k, v in batch.items()}
                if batch["input_ids"].shape[0] == 0:  # fewer lanes than ranks
                    continue
                state = self._state_for(batch, state)
                logits, state = self.model(batch["input_ids"], state)
                _, stats = self._loss(logits, batch["labels"])
                hits = (logits.argmax(-1) == batch["labels"]).sum() if self.val_accuracy else stats["tokens"] * 0
                sums += torch.stack([stats["nats"], stats["tokens"], stats["bytes"], hits]).double().cpu()
        finally:
            self.model.train(was_training)
        if world > 1:
            sums = self.all_gather(sums.to(self.device)).sum(0).cpu()
        nats, tokens, nbytes, correct = (float(x) for x in sums)
        if tokens == 0:
            return {}
        loss = nats / tokens
        metrics = {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))}
        if nbytes > 0:
            metrics["val/bpb"] = nats / math.log(2) / nbytes
        if self.val_accuracy:
            metrics["val/acc"] = correct / tokens
        self.val_metrics = metrics
        return metrics

    # ----- optimisation ---------------------------------------------------------------------------------
    def configure_optimizers(self):
        opt = self.optim
        optimizer = torch.optim.AdamW(
            self.model.param_groups(opt.weight_decay, lora_weight_decay=opt.lora_weight_decay),
            lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps,
        )

        def lr_lambda(step: int) -> float:
            return warmup_cosine(
                step, warmup_steps=opt.warmup_steps, max_steps=self.max_steps, min_lr_ratio=opt.min_lr_ratio
            )

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----- checkpoint content ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["groundthink"] = {
            **self.run_meta,
            "step": self.global_step,
            "metrics": {**self.step_metrics, **self.val_metrics},
            "data_position": self.trained_position,
        }
        if self.carried is not None:
            checkpoint["carried_state"] = {"tensors": self.carried.to_flat(), "position": self.carried.position}
        checkpoint["rng"] = capture_rng_state()
        checkpoint["data_position"] = self.trained_position
        world = self.world_size
        if world > 1:
            # Every rank has its own lanes: its data position, carried state and RNG states. Rank 0 writes the file,
            # so the others' are gathered into it (rank r's under rank_states[r]); the top-level entries stay rank
            # 0's. Lightning calls this hook on every rank while saving, so the collective is matched.
            import torch.distributed as dist

            carried = checkpoint.get("carried_state")
            if carried is not None:  # on the CPU, so the gathered copy does not name another process's device
                carried = {**carried, "tensors": {k: v.detach().cpu() for k, v in carried["tensors"].items()}}
            mine = {"data_position": self.trained_position, "carried_state": carried, "rng": checkpoint["rng"]}
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, mine)
            checkpoint["rank_states"] = gathered
            checkpoint["groundthink"]["world_size"] = world

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        world = self.world_size
        rank_states = checkpoint.get("rank_states")
        if rank_states is not None or world > 1:
            saved_world = len(rank_states) if rank_states is not None else 1
            if saved_world != world:
                from groundthink.training.checkpoint import CheckpointError

                raise CheckpointError(
                    f"the checkpoint was written by {saved_world} data-parallel rank(s) and this run has {world}: "
                    "each rank's lanes (data position and carried state) belong to that world size. Resume with "
                    f"the same number of processes (trainer.devices x trainer.num_nodes = {saved_world}).")
            if rank_states is not None:
                checkpoint = {**checkpoint, **rank_states[self.global_rank]}
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
