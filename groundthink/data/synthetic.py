"""Synthetic memory tasks: multi-query associative recall (MQAR) and a token-level passkey.

MQAR follows Zoology (Arora et al., "Zoology: Measuring and Improving Recall in Efficient Language Models",
arXiv 2312.04927; HazyResearch/zoology ``zoology/data/multiquery_ar.py``): keys from [1, V/2), values from
[V/2, V), the ``k v k v ...`` pairs first, then each key queried once at power-law distributed gaps.
Differences: written with torch generators (seeded, chunked), and labels are aligned to the inputs
(``labels[:, t]`` is the target of position t, as in the TBPTT stream) instead of Zoology's shifted
``examples[:, 1:]``; the values are the same: the value of a query key is the label at the query's position.

The passkey task is the token-level version recommended for small models trained from scratch (see
reference/model_anchors.md §5.2): random filler tokens, a key marker and a passkey of digit tokens, `distance`
filler tokens, a query marker, then the passkey again; the only labels are the answer digits. The distance may
be far longer than a TBPTT segment, so solving it requires carried state.

Both generators return {"input_ids", "inputs" (the same tensor), "labels"} as [N,T] long tensors, with -100
where there is no target, and are deterministic in `seed`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from groundthink.data.errors import DataError

IGNORE_INDEX = -100


def _sample_without_replacement(
    gen: torch.Generator, n: int, low: int, high: int, k: int, chunk: int
) -> torch.Tensor:
    """[n, k] distinct integers from [low, high) per row."""
    out = torch.empty(n, k, dtype=torch.long)
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        scores = torch.rand(rows, high - low, generator=gen)
        out[start : start + rows] = scores.topk(k, dim=1).indices + low
    return out


def mqar(
    num_examples: int,
    seq_len: int,
    num_kv_pairs: int,
    vocab_size: int = 8192,
    *,
    power_a: float = 0.01,
    random_non_queries: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Multi-query associative recall examples: input_ids/labels [num_examples, seq_len].

    Positions 0..2kv-1 hold the pairs; in the rest, key i is queried at position 2kv + 2*gap_i, where the gaps
    are distinct, drawn with probability ~ gap^(power_a - 1) (short gaps likelier). Its label is value i;
    every other label is -100. Non-query positions hold random tokens (`random_non_queries`) or 0.
    """
    kv = int(num_kv_pairs)
    key_vocab = int(vocab_size) // 2
    if kv < 1 or num_examples < 1:
        raise DataError(
            f"mqar needs num_kv_pairs >= 1 and num_examples >= 1, got {num_kv_pairs}, {num_examples}"
        )
    if seq_len < 4 * kv:
        raise DataError(
            f"mqar seq_len={seq_len} is too short for num_kv_pairs={kv}: it needs seq_len >= 4*kv "
            f"(the pairs take 2*kv positions and each of kv queries needs its own 2-position slot)"
        )
    if key_vocab - 1 < kv or vocab_size - key_vocab < kv:
        raise DataError(
            f"mqar vocab_size={vocab_size} is too small for num_kv_pairs={kv}: keys come from "
            f"[1, vocab/2) and values from [vocab/2, vocab), each needs {kv} distinct tokens"
        )
    gen = torch.Generator().manual_seed(int(seed))
    chunk = max(1, 2**22 // max(key_vocab, 1))
    keys = _sample_without_replacement(gen, num_examples, 1, key_vocab, kv, chunk)
    values = _sample_without_replacement(gen, num_examples, key_vocab, int(vocab_size), kv, chunk)
    context = torch.stack([keys, values], dim=2).reshape(num_examples, 2 * kv)

    query_len = seq_len - 2 * kv
    space = query_len // 2
    gap_range = torch.arange(1, space + 1, dtype=torch.float64)
    log_p = (
        torch.log(torch.tensor(power_a, dtype=torch.float64)) + (power_a - 1) * torch.log(gap_range)
    ).float()
    # Gumbel top-k = sampling kv distinct gaps proportionally to p, one after another.
    uniform = torch.rand(num_examples, space, generator=gen).clamp_min(1e-20)
    gaps = (log_p - torch.log(-torch.log(uniform))).topk(kv, dim=1).indices
    rows = torch.arange(num_examples)[:, None]
    queries = torch.zeros(num_examples, query_len, dtype=torch.long)
    queries[rows, gaps * 2] = keys
    query_labels = torch.full((num_examples, query_len), IGNORE_INDEX, dtype=torch.long)
    query_labels[rows, gaps * 2] = values

    inputs = torch.cat([context, queries], dim=1)
    labels = torch.cat(
        [torch.full((num_examples, 2 * kv), IGNORE_INDEX, dtype=torch.long), query_labels], dim=1
    )
    if random_non_queries:
        noise = torch.randint(int(vocab_size), inputs.shape, generator=gen)
        fill = torch.zeros_like(inputs, dtype=torch.bool)
        fill[:, 2 * kv :] = queries == 0
        inputs = torch.where(fill, noise, inputs)
    return {"input_ids": inputs, "inputs": inputs, "labels": labels}


@dataclass(frozen=True)
class PasskeyTokens:
    """Token ids of the passkey task: 10 digits, key/query markers, filler in [filler_low, filler_high)."""

    digits: tuple[int, ...]
    key_id: int
    query_id: int
    filler_low: int
    filler_high: int

    @classmethod
    def for_vocab(cls, vocab_size: int, filler_low: int = 8) -> PasskeyTokens:
        """Digits and markers at the top of the vocabulary; filler above the 8 control ids by default."""
        if vocab_size < filler_low + 13:
            raise DataError(
                f"passkey vocab_size={vocab_size} is too small: it needs the 8 control ids, 10 digits, "
                f"2 markers and at least one filler token ({filler_low + 13})"
            )
        top = int(vocab_size)
        return cls(tuple(range(top - 12, top - 2)), top - 2, top - 1, filler_low, top - 12)


def passkey(
    num_examples: int,
    distance: int,
    vocab_size: int,
    *,
    passkey_len: int = 5,
    prefix_len: int = 16,
    seq_len: int | None = None,
    tokens: PasskeyTokens | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Token-level passkey retrieval: [filler]*prefix KEY d1..dL [filler]*distance QUERY d1..dL.

    labels: the QUERY position predicts d1, answer digit j predicts d(j+1); everything else -100.
    With `seq_len` the prefix is sized so that every sequence has exactly seq_len tokens.
    Also returns "passkeys" [N,L] (digits 0..9), and "needle_start"/"query_pos" (ints as 0-d tensors).
    """
    tokens = tokens or PasskeyTokens.for_vocab(vocab_size)
    L = int(passkey_len)
    if L < 1 or distance < 0 or num_examples < 1:
        raise DataError(
            f"passkey needs passkey_len >= 1, distance >= 0, num_examples >= 1 "
            f"(got {passkey_len}, {distance}, {num_examples})"
        )
    core = 2 + 2 * L + int(distance)
    if seq_len is not None:
        if seq_len < core:
            raise DataError(
                f"passkey seq_len={seq_len} is shorter than the task itself ({core} = distance "
                f"{distance} + 2*passkey_len {L} + 2 markers)"
            )
        prefix_len = int(seq_len) - core
    total = int(prefix_len) + core
    gen = torch.Generator().manual_seed(int(seed))
    inputs = torch.randint(tokens.filler_low, tokens.filler_high, (num_examples, total), generator=gen)
    keys = torch.randint(0, 10, (num_examples, L), generator=gen)
    digit_ids = torch.tensor(tokens.digits, dtype=torch.long)[keys]
    needle = int(prefix_len)
    query = needle + 1 + L + int(distance)
    inputs[:, needle] = tokens.key_id
    inputs[:, needle + 1 : needle + 1 + L] = digit_ids
    inputs[:, query] = tokens.query_id
    inputs[:, query + 1 : query + 1 + L] = digit_ids
    labels = torch.full_like(inputs, IGNORE_INDEX)
    labels[:, query : query + L] = digit_ids
    return {
        "input_ids": inputs,
        "inputs": inputs,
        "labels": labels,
        "passkeys": keys,
        "needle_start": torch.tensor(needle),
        "query_pos": torch.tensor(query),
    }
