"""`passkey`: can the model still name a passkey it was told `distance` tokens ago? Carried state, text level.

Each sample: "The pass key is 48213. Remember it. 48213 is the pass key." (a random `digits`-digit key), then
`distance` tokens of the classic filler ("The grass is green. The sky is blue. ..."), then the question
" What is the pass key? The pass key is". Everything is fed once through the carried state (one stream per
sample, the filler extended from one distance to the next), so distances far beyond the training segment cost
one pass.

Scoring (chosen over greedy decoding because it gives a graded answer for small models): the log-likelihood of
the true key " 48213" against `distractors` other random keys of the same length; a sample is correct when the
true key scores highest. Chance is 1 / (1 + distractors). Results: accuracy and mean margin (true minus best
distractor log-likelihood, nats) per distance in passkey.csv / passkey.png; scalars acc_d<distance>, acc_mean,
chance.

A run trained on the token-level task (data=passkey, no tokenizer) is scored on that task instead: held-out
examples at each distance (the run's vocabulary and passkey length, a seed of the task's own), each read from a
fresh state through the carried state in segments of the run's data.seq_len; `acc_d<distance>` is the per-digit
accuracy (argmax at the answer positions, the run's val/acc), `key_acc_d<distance>` the share of keys with every
digit right; chance is 1/10 per digit.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from groundthink.evaluation.tasks.base import (
    EvalError,
    EvalTask,
    check_positive,
    copy_state,
    feed,
    model_device,
    need_tokenizer,
    plot,
    register_task,
    score_candidates,
    write_csv,
)

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@dataclass
class PasskeySettings:
    distances: list[int] = field(default_factory=lambda: [64, 256, 1024, 4096, 16384])  # filler tokens
    samples: int = 10  # keys per distance
    digits: int = 5
    distractors: int = 9
    seed: int = 0


def _key(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits)) if digits > 1 else str(rng.randrange(10))


@register_task("passkey")
class PasskeyTask(EvalTask):
    Settings = PasskeySettings
    description = "passkey retrieval accuracy vs distance (log-likelihood vs distractor keys), carried state"

    def check(self, loaded: Any, s: PasskeySettings) -> None:
        if _token_level(loaded):
            check_positive("passkey", distances=s.distances, samples=s.samples)
            return
        tok = need_tokenizer(loaded, "passkey")
        check_positive("passkey", distances=s.distances, samples=s.samples, digits=s.digits,
                       distractors=s.distractors)
        if s.digits > 12:
            raise EvalError(f"eval.tasks.passkey.digits={s.digits}: at most 12")
        if 9 * 10 ** (s.digits - 1) <= s.distractors:
            raise EvalError(f"eval.tasks.passkey: {s.digits}-digit keys allow fewer than {s.distractors} "
                            f"distractors; raise digits or lower distractors")
        if tok.decode(tok.encode("0123456789")) != "0123456789":
            raise EvalError("the run's tokenizer does not round-trip digits, so passkeys cannot be scored")

    def run(self, loaded: Any, s: PasskeySettings, out_dir: Path, progress) -> dict[str, float]:
        if _token_level(loaded):
            return _run_token_level(loaded, s, out_dir, progress)
        tok, model = loaded.tokenizer, loaded.model
        distances = sorted(set(int(d) for d in s.distances))
        filler = tok.encode(FILLER * 8)
        while len(filler) < distances[-1]:
            filler = filler + filler
        question = tok.encode(" What is the pass key? The pass key is")
        rng = random.Random(s.seed)
        correct = {d: 0 for d in distances}
        margins: dict[int, list[float]] = {d: [] for d in distances}
        bar = progress(s.samples * distances[-1], "passkey")
        for _ in range(s.samples):
            key = _key(rng, s.digits)
            others: list[str] = []
            while len(others) < s.distractors:
                other = _key(rng, s.digits)
                if other != key and other not in others:
                    others.append(other)
            candidates = [tok.encode(" " + k) for k in [key, *others]]
            _, state = feed(model, tok.encode(f"The pass key is {key}. Remember it. {key} is the pass key."),
                            model.init_state(1, model_device(model)))
            fed = 0
            for d in distances:
                if d > fed:
                    _, state = feed(model, filler[fed:d], state)
                    bar.update(d - fed)
                    fed = d
                last, asked = feed(model, question, copy_state(state))
                scores = score_candidates(model, asked, last, candidates)
                best_other = max(scores[1:])
                correct[d] += int(scores[0] > best_other)
                margins[d].append(scores[0] - best_other)
        bar.close()
        chance = 1.0 / (1 + s.distractors)
        rows = [{"distance": d, "samples": s.samples, "accuracy": correct[d] / s.samples,
                 "mean_margin_nats": sum(margins[d]) / len(margins[d]), "chance": chance} for d in distances]
        write_csv(out_dir / "passkey.csv", rows)
        plot(out_dir / "passkey.png", {"accuracy": ([r["distance"] for r in rows], [r["accuracy"] for r in rows])},
             title="passkey retrieval (carried state)", xlabel="distance (filler tokens, log scale)",
             ylabel="accuracy", logx=True, hline=chance)
        out = {f"acc_d{r['distance']}": r["accuracy"] for r in rows}
        out.update({f"margin_d{r['distance']}": r["mean_margin_nats"] for r in rows})
        out["acc_mean"] = sum(r["accuracy"] for r in rows) / len(rows)
        out["chance"] = chance
        return {k: (v if math.isfinite(v) else math.nan) for k, v in out.items()}


def _token_level(loaded: Any) -> bool:
    return loaded.tokenizer is None and (loaded.config.get("data") or {}).get("source") == "passkey"


@torch.inference_mode()
def _run_token_level(loaded: Any, s: PasskeySettings, out_dir: Path, progress) -> dict[str, float]:
    """The token-level task of a data=passkey run (module docstring)."""
    from groundthink.data.synthetic import passkey

    model, data = loaded.model, loaded.config["data"]
    vocab, digits, segment = int(data["vocab_size"]), int(data["passkey_len"]), int(data["seq_len"])
    device = model_device(model)
    distances = sorted(set(int(d) for d in s.distances))
    bar = progress(len(distances) * s.samples, "passkey")
    rows = []
    for d in distances:
        length = segment * math.ceil((2 + 2 * digits + d + 1) / segment)
        ex = passkey(s.samples, d, vocab, passkey_len=digits, seq_len=length, seed=s.seed + 2_000_029 + 7919 * d)
        ids, labels = ex["input_ids"].to(device), ex["labels"].to(device)
        state, hits = model.init_state(ids.shape[0], device), []
        for start in range(0, length, segment):
            logits, state = model(ids[:, start:start + segment], state)
            hits.append(logits.argmax(-1) == labels[:, start:start + segment])
        mask = labels != -100
        right = torch.cat(hits, dim=1) & mask
        digit_acc = float(right.sum() / mask.sum())
        key_acc = float((right.sum(1) == mask.sum(1)).float().mean())
        rows.append({"distance": d, "samples": s.samples, "accuracy": digit_acc, "key_accuracy": key_acc,
                     "chance": 0.1})
        bar.update(s.samples)
    bar.close()
    write_csv(out_dir / "passkey.csv", rows)
    plot(out_dir / "passkey.png", {"digit accuracy": ([r["distance"] for r in rows], [r["accuracy"] for r in rows]),
                                   "key accuracy": ([r["distance"] for r in rows],
                                                    [r["key_accuracy"] for r in rows])},
         title=f"passkey retrieval, token level (segments of {segment})", xlabel="distance (tokens, log scale)",
         ylabel="accuracy", logx=True, hline=0.1)
    out = {f"acc_d{r['distance']}": r["accuracy"] for r in rows}
    out.update({f"key_acc_d{r['distance']}": r["key_accuracy"] for r in rows})
    out["acc_mean"] = sum(r["accuracy"] for r in rows) / len(rows)
    out["chance"] = 0.1
    return out
