"""Held-out perplexity and bits per byte, with the recurrent state carried across segments and reset at each one.

The held-out documents are read as the validation stream reads them (groundthink.data.TBPTTStream,
`validation_batches`: B lanes, each a continuous stream of documents, cut into segments of `seq_len` tokens).
Two passes over the same batches:
- carried: every lane continues from the state its previous segment left (h0 at a document start), as in
  training; this is the model's real long-context perplexity;
- reset: every segment starts from h0, so the model sees at most `seq_len` tokens of context.
reset / carried perplexity > 1 means the carried state helps. Bits per byte divide the summed loss (nats / ln 2)
by the UTF-8 bytes behind the predicted tokens (control tokens count 0 bytes), so tokenizers compare fairly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from groundthink.data.stream import TBPTTStream, TokenizedDocuments, encode_documents


@torch.no_grad()
def evaluate_token_docs(
    model: torch.nn.Module,
    docs: TokenizedDocuments | Sequence[Sequence[int]],
    *,
    pad_id: int,
    token_bytes: torch.Tensor,
    batch_size: int = 8,
    seq_len: int = 128,
    max_batches: int | None = 8,
) -> dict[str, float]:
    """Metrics over held-out token documents (see the module docstring): eval/loss_<mode>, eval/ppl_<mode> and
    eval/bpb_<mode> for mode carried and reset, eval/ppl_reset_over_carried, eval/tokens, eval/batches."""
    stream = TBPTTStream(docs, batch_size=batch_size, pad_id=pad_id, shuffle=False)
    return evaluate_batches(model, stream.validation_batches(seq_len, max_batches), token_bytes=token_bytes)


@torch.no_grad()
def evaluate_batches(model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]], *,
                     token_bytes: torch.Tensor) -> dict[str, float]:
    """The carried and reset passes over ready validation batches (as TBPTTStream.validation_batches gives them;
    the carried pass reads them exactly as training's validation does, so eval/loss_carried on a run's own
    validation batches is its val/loss)."""
    if not batches:
        raise ValueError("the held-out documents gave no evaluation batch")
    device = next(model.parameters()).device
    token_bytes = token_bytes.to(device=device, dtype=torch.float64)
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    try:
        for mode in ("carried", "reset"):
            state = None
            nats = tokens = nbytes = 0.0
            for batch in batches:
                ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
                fresh = model.init_state(ids.shape[0], device)
                if mode == "reset" or state is None:
                    state = fresh
                elif bool(batch["reset"].any()):
                    state = state.reset_lanes(batch["reset"].to(device), fresh)
                logits, state = model(ids, state)
                flat = labels.reshape(-1)
                nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), flat, ignore_index=-100,
                                      reduction="none")
                valid = flat != -100
                nats += float(nll[valid].double().sum())
                tokens += float(valid.sum())
                nbytes += float(token_bytes[flat[valid]].sum())
            if tokens == 0:
                raise ValueError("the held-out documents hold no predicted token (every label is padding)")
            loss = nats / tokens
            out[f"eval/loss_{mode}"] = loss
            out[f"eval/ppl_{mode}"] = math.exp(min(loss, 700.0)) if math.isfinite(loss) else loss
            out[f"eval/bpb_{mode}"] = nats / math.log(2) / nbytes if nbytes > 0 else math.nan
        out["eval/ppl_reset_over_carried"] = out["eval/ppl_reset"] / out["eval/ppl_carried"]
        out["eval/tokens"] = tokens
        out["eval/batches"] = float(len(batches))
    finally:
        model.train(was_training)
    return out


def evaluate_texts(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    seq_len: int = 128,
    max_batches: int | None = 8,
) -> dict[str, float]:
    """`evaluate_token_docs` over raw held-out texts, encoded with `tokenizer` (each followed by end-of-text)."""
    if not texts:
        raise ValueError("no held-out texts to evaluate on")
    docs = encode_documents(tokenizer, list(texts))
    return evaluate_token_docs(
        model,
        docs,
        pad_id=tokenizer.pad_id,
        token_bytes=torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.float64),
        batch_size=batch_size,
        seq_len=seq_len,
        max_batches=max_batches,
    )
