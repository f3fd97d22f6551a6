"""`lm`: held-out perplexity and bits per byte with the state carried vs reset, and loss by token position.

Held-out data: the run's own validation split, rebuilt from its recorded data config (same source, documents,
`val_fraction` and seed, hence the same documents) and encoded with the run's tokenizer.

1. Carried vs reset (groundthink.evaluation.lm_eval.evaluate_batches). With batch_size / seq_len / max_batches
   unset, the batches are the run's own validation batches (data.batch_size x data.seq_len, data.val_batches), so
   `loss_carried` reproduces the run's last logged val/loss; `val_loss_logged` and `val_loss_abs_diff` say how
   closely (a check of `groundthink.load`).
2. Loss by token position: every held-out document read from its start with carried state (fed in chunks of the
   training segment, which is exact), the next-token loss at each position 0..max_tokens-1 averaged over the
   documents that reach it. Written as position_loss.csv (log-spaced bins: first/last position, documents, mean
   loss) and position_loss.png (log-x, a line at the training segment). Scalars: loss_first_segment (positions
   below data.seq_len), loss_beyond_segment (at or beyond it: context the model only sees through its carried
   state), beyond_over_first, max_position (the longest position measured: documents shorter than max_tokens
   end the curve earlier).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from groundthink.evaluation.tasks.base import (
    EvalError,
    EvalTask,
    check_positive,
    model_device,
    need_tokenizer,
    plot,
    register_task,
    write_csv,
)


@dataclass
class LMSettings:
    batch_size: int | None = None  # null = the run's data.batch_size (then the batches are its validation's)
    seq_len: int | None = None  # null = the run's data.seq_len
    max_batches: int | None = None  # null = the run's data.val_batches
    max_tokens: int = 8192  # loss-by-position curve out to this many tokens per document
    max_documents: int = 64  # held-out documents read for the curve (the longest first)
    lanes: int = 4  # documents per forward pass for the curve


def heldout(loaded: Any) -> dict[str, Any]:
    """The run's held-out texts and data settings (cached on `loaded`; gate G4 sets it from the run in memory)."""
    cached = getattr(loaded, "_heldout", None)
    if cached is not None:
        return cached
    from omegaconf import OmegaConf

    from groundthink.data.corpus import split_documents
    from groundthink.data.errors import DataError
    from groundthink.data.sources import DATA_SOURCES

    data = dict(loaded.config.get("data") or {})
    source = DATA_SOURCES.get(data.get("source"))
    if source is None or not hasattr(source(), "documents"):
        raise EvalError(f"the run's data.source={data.get('source')!r} is not a text source, so it has no held-out "
                        f"documents for the lm task")
    known = set(source.Settings.__dataclass_fields__)
    try:
        settings = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(source.Settings),
                                                       {k: v for k, v in data.items() if k in known}))
        _, val_texts = split_documents(source().documents(settings), settings.val_fraction,
                                       seed=int(loaded.config.get("seed", 0)))
    except (DataError, ValueError, OSError) as exc:
        raise EvalError(f"the run's held-out documents cannot be read again: {exc}") from None
    found = {"texts": val_texts, "batch_size": settings.batch_size, "seq_len": settings.seq_len,
             "val_batches": settings.val_batches, "seed": int(loaded.config.get("seed", 0))}
    loaded._heldout = found
    return found


def _logged_val_loss(run_dir: Path | None, step: int | None) -> float:
    if run_dir is None or not (run_dir / "metrics.csv").is_file():
        return math.nan
    from groundthink.training.metrics_file import read_metrics_csv

    series = read_metrics_csv(run_dir / "metrics.csv").get("val/loss", [])
    at_step = [v for s, v in series if s == step]
    return at_step[-1] if at_step else math.nan


@register_task("lm")
class LMTask(EvalTask):
    Settings = LMSettings
    description = "held-out ppl/bpb carried vs reset; loss by token position"

    def check(self, loaded: Any, s: LMSettings) -> None:
        need_tokenizer(loaded, "lm")
        check_positive("lm", max_tokens=s.max_tokens, max_documents=s.max_documents, lanes=s.lanes,
                       **{k: v for k, v in (("batch_size", s.batch_size), ("seq_len", s.seq_len),
                                            ("max_batches", s.max_batches)) if v is not None})
        if not heldout(loaded)["texts"]:
            raise EvalError("the run has no held-out documents (data.val_fraction=0?), so the lm task has nothing "
                            "to evaluate")

    def run(self, loaded: Any, s: LMSettings, out_dir: Path, progress) -> dict[str, float]:
        from groundthink.data.stream import TBPTTStream, encode_documents
        from groundthink.evaluation.lm_eval import evaluate_batches

        tok, model, data = loaded.tokenizer, loaded.model, heldout(loaded)
        token_bytes = torch.tensor(tok.token_byte_lengths(), dtype=torch.float64)
        replay = s.batch_size is None and s.seq_len is None and s.max_batches is None
        docs = encode_documents(tok, list(data["texts"]))
        stream = TBPTTStream(docs, batch_size=s.batch_size or data["batch_size"], pad_id=tok.pad_id,
                             seed=data["seed"])
        batches = stream.validation_batches(s.seq_len or data["seq_len"], s.max_batches or data["val_batches"])
        bar = progress(2 * len(batches), "lm carried/reset")
        metrics = evaluate_batches(model, batches, token_bytes=token_bytes)
        bar.update(2 * len(batches))
        bar.close()
        out = {k.removeprefix("eval/"): v for k, v in metrics.items()}
        if replay:
            logged = _logged_val_loss(loaded.run_dir, loaded.step)
            out["val_loss_logged"] = logged
            out["val_loss_abs_diff"] = abs(out["loss_carried"] - logged) if math.isfinite(logged) else math.nan
        out.update(self._positions(loaded, s, data, out_dir, progress))
        return out

    @torch.inference_mode()
    def _positions(self, loaded: Any, s: LMSettings, data: dict[str, Any], out_dir: Path, progress
                   ) -> dict[str, float]:
        tok, model = loaded.tokenizer, loaded.model
        device = model_device(model)
        segment = int(data["seq_len"])
        docs = [tok.encode(t) + [tok.eos_id] for t in data["texts"]]
        docs = sorted((d[: s.max_tokens + 1] for d in docs if len(d) >= 2), key=len, reverse=True)[: s.max_documents]
        nll_sum = torch.zeros(s.max_tokens, dtype=torch.float64)
        count = torch.zeros(s.max_tokens, dtype=torch.float64)
        bar = progress(sum(len(d) - 1 for d in docs), "lm loss by position")
        for first in range(0, len(docs), s.lanes):
            group = docs[first:first + s.lanes]
            longest = max(len(d) for d in group)
            ids = torch.full((len(group), longest), tok.pad_id, dtype=torch.long)
            labels = torch.full((len(group), longest), -100, dtype=torch.long)
            for row, d in enumerate(group):
                ids[row, : len(d)] = torch.as_tensor(d)
                labels[row, : len(d) - 1] = torch.as_tensor(d[1:])
            ids, labels = ids[:, :-1].to(device), labels[:, :-1].to(device)
            state = model.init_state(len(group), device)
            for start in range(0, ids.shape[1], segment):
                logits, state = model(ids[:, start:start + segment], state)
                lab = labels[:, start:start + segment]
                nll = F.cross_entropy(logits.float().transpose(1, 2), lab, ignore_index=-100, reduction="none")
                valid = (lab != -100).double().cpu()
                end = start + lab.shape[1]
                nll_sum[start:end] += (nll.double().cpu() * valid).sum(0)
                count[start:end] += valid.sum(0)
                bar.update(int(valid.sum()))
        bar.close()
        reached = int((count > 0).nonzero().max()) + 1 if bool((count > 0).any()) else 0
        rows, x, y = [], [], []
        edges = sorted({0, *(2**k for k in range(0, 40) if 2**k < reached), reached})
        for lo, hi in zip(edges[:-1], edges[1:]):
            n = float(count[lo:hi].sum())
            if n == 0:
                continue
            mean = float(nll_sum[lo:hi].sum()) / n
            rows.append({"position_first": lo, "position_last": hi - 1, "documents": int(count[lo]),
                         "tokens": int(n), "mean_loss": mean})
            x.append(max(1, (lo + hi - 1) / 2) if lo else 1)
            y.append(mean)
        write_csv(out_dir / "position_loss.csv", rows)
        if rows:
            plot(out_dir / "position_loss.png", {"carried state": (x, y)}, title="loss by token position",
                 xlabel="token position (log scale)", ylabel="mean next-token loss (nats)", logx=True,
                 vlines=[segment])

        def mean(lo: int, hi: int) -> float:
            n = float(count[lo:hi].sum())
            return float(nll_sum[lo:hi].sum()) / n if n else math.nan

        first, beyond = mean(0, segment), mean(segment, s.max_tokens)
        return {"loss_first_segment": first, "loss_beyond_segment": beyond,
                "beyond_over_first": beyond / first if first and math.isfinite(beyond) else math.nan,
                "max_position": float(reached), "position_documents": float(len(docs))}
