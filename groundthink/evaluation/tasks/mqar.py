"""`mqar`: multi-query associative recall accuracy per (sequence length, kv pairs) on held-out examples.

Examples come from groundthink.data.synthetic.mqar (Zoology's generator) with a seed of their own (held out from
any training run that used the generator's default seed). Each example is read from a fresh state in one pass;
a query is correct when the argmax of the model's next-token logits at the query position is its value.
Tokens are model-vocabulary ids (keys from [1, V/2), values from [V/2, V)), so the task is meaningful for runs
trained on MQAR (data.source=mqar); on a text model it measures in-context copying of arbitrary ids.
Results: mqar.csv (accuracy per cell), mqar.png; scalars acc_T<seq_len>_kv<kv_pairs>, acc_mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from groundthink.evaluation.tasks.base import (
    EvalError,
    EvalTask,
    check_positive,
    model_device,
    plot,
    register_task,
    write_csv,
)


@dataclass
class MQARSettings:
    seq_lens: list[int] = field(default_factory=lambda: [64, 128, 256])
    kv_pairs: list[int] = field(default_factory=lambda: [4, 8, 16])
    examples: int = 64  # per cell
    vocab_size: int | None = None  # null = the model's vocabulary
    batch_size: int = 16
    seed: int = 4242


@register_task("mqar")
class MQARTask(EvalTask):
    Settings = MQARSettings
    description = "multi-query associative recall accuracy per (seq_len, kv_pairs)"

    def check(self, loaded: Any, s: MQARSettings) -> None:
        check_positive("mqar", seq_lens=s.seq_lens, kv_pairs=s.kv_pairs, examples=s.examples,
                       batch_size=s.batch_size)
        model_vocab = int(loaded.model_config.vocab_size)
        vocab = int(s.vocab_size or model_vocab)
        if vocab > model_vocab:
            raise EvalError(f"eval.tasks.mqar.vocab_size={vocab} exceeds the model's vocabulary ({model_vocab})")
        kv = max(int(k) for k in s.kv_pairs)
        if vocab // 2 - 1 < kv or vocab - vocab // 2 < kv:
            raise EvalError(f"eval.tasks.mqar: the vocabulary ({vocab} tokens) is too small for kv_pairs={kv}: keys "
                            f"come from [1, {vocab // 2}) and values from [{vocab // 2}, {vocab}), each needs {kv} "
                            f"distinct tokens; lower kv_pairs to at most {min(vocab // 2 - 1, vocab - vocab // 2)}")
        short = [(t, k) for t in s.seq_lens for k in s.kv_pairs if int(t) < 4 * int(k)]
        if short:
            raise EvalError(f"eval.tasks.mqar: seq_len must be >= 4 x kv_pairs, not so for (seq_len, kv_pairs) "
                            f"{short}")

    @torch.inference_mode()
    def run(self, loaded: Any, s: MQARSettings, out_dir: Path, progress) -> dict[str, float]:
        from groundthink.data.synthetic import mqar

        model = loaded.model
        device = model_device(model)
        vocab = int(s.vocab_size or loaded.model_config.vocab_size)
        cells = [(int(t), int(k)) for t in s.seq_lens for k in s.kv_pairs]
        bar = progress(len(cells) * s.examples, "mqar")
        rows = []
        for t, k in cells:
            data = mqar(s.examples, t, k, vocab, seed=s.seed + 1000 * t + k)
            hits = total = 0
            for first in range(0, s.examples, s.batch_size):
                ids = data["input_ids"][first:first + s.batch_size].to(device)
                labels = data["labels"][first:first + s.batch_size].to(device)
                logits, _ = model(ids, model.init_state(ids.shape[0], device))
                mask = labels != -100
                hits += int((logits.argmax(-1)[mask] == labels[mask]).sum())
                total += int(mask.sum())
                bar.update(ids.shape[0])
            rows.append({"seq_len": t, "kv_pairs": k, "examples": s.examples, "queries": total,
                         "accuracy": hits / total, "chance": 1.0 / (vocab - vocab // 2)})
        bar.close()
        write_csv(out_dir / "mqar.csv", rows)
        series = {f"kv_pairs={k}": ([r["seq_len"] for r in rows if r["kv_pairs"] == k],
                                    [r["accuracy"] for r in rows if r["kv_pairs"] == k])
                  for k in sorted({r["kv_pairs"] for r in rows})}
        plot(out_dir / "mqar.png", series, title="MQAR accuracy", xlabel="sequence length (log scale)",
             ylabel="accuracy", logx=True)
        out = {f"acc_T{r['seq_len']}_kv{r['kv_pairs']}": r["accuracy"] for r in rows}
        out["acc_mean"] = sum(r["accuracy"] for r in rows) / len(rows)
        return out
