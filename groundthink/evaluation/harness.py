"""GroundThink as a model of lm-evaluation-harness (`lm-eval`, the `eval` extra): `--model groundthink`.

    python -m groundthink.evaluation.harness --model groundthink --model_args pretrained=outputs/default/<run> \\
        --tasks lambada_openai,hellaswag,piqa,arc_easy --output_path results/
    python -m groundthink.evaluation.harness --model groundthink --model_args pretrained=<run> \\
        --include_path my_tasks/ --tasks my_local_task          # a local JSON task (no hub needed)

`python -m groundthink.evaluation.harness` is lm-eval's own command line (lm_eval.__main__.cli_evaluate, every
flag the same) with this module imported first, which registers the model name `groundthink`; in Python,
`import groundthink.evaluation.harness` then `lm_eval.simple_evaluate(model="groundthink", ...)`.
model_args: pretrained (a run folder or checkpoint file: groundthink.load), device (cpu), dtype, batch_size
(sequences per forward pass for loglikelihood), max_length (tokens fed per forward pass; the state is carried
across them, so it does not limit the context). lm-eval's --device cuda falls back to cpu where CUDA is absent.

What each request type means here:
- loglikelihood(context, continuation): log P(continuation | context) summed over the continuation's tokens
  (context and continuation encoded separately; an empty context starts from end-of-text), and whether every
  continuation token is the argmax (is_greedy). Equal to the model's own summed log-probabilities.
- loglikelihood_rolling(text): the whole text's log-likelihood read from its start with carried state (no
  sliding windows: the recurrent state is the context), after an end-of-text token as training documents are.
- generate_until(context, {until, max_gen_toks, do_sample, temperature}): groundthink.generation's engine, greedy
  unless do_sample; the text stops before the first `until` string.
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model


@register_model("groundthink")
class GroundThinkHarnessLM(LM):
    def __init__(self, pretrained: str, device: str = "cpu", dtype: str | None = None, batch_size: int | str = 16,
                 max_length: int = 2048, **_: Any) -> None:
        super().__init__()
        import groundthink
        from groundthink.generation import GenerationEngine

        if str(device or "cpu").startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lm-eval's --device defaults to cuda
        loaded = groundthink.load(pretrained, device=device or "cpu", dtype=getattr(torch, dtype) if dtype else None)
        if loaded.tokenizer is None:
            raise ValueError(f"{pretrained}: a run without a tokenizer cannot read lm-eval's text tasks")
        self.loaded = loaded
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.engine = GenerationEngine.from_run(loaded, prefill_chunk=int(max_length))
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self.max_length = int(max_length)

    # ----- loglikelihood -----------------------------------------------------------------------------------------
    def _pair_scores(self, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        sequences, starts = [], []
        for context, continuation in pairs:
            ctx = self.tokenizer.encode(context) or [self.tokenizer.eos_id]
            cont = self.tokenizer.encode(continuation)
            if not cont:
                raise ValueError("lm-eval asked for the log-likelihood of an empty continuation")
            sequences.append(ctx + cont)
            starts.append(len(ctx))
        out: list[tuple[float, bool]] = []
        for first in range(0, len(sequences), self.batch_size):
            chunk = sequences[first:first + self.batch_size]
            for seq, n, logp in zip(chunk, starts[first:first + self.batch_size],
                                    self.engine.lm.score_batch(chunk)):
                positions = torch.arange(n - 1, len(seq) - 1)
                targets = torch.as_tensor(seq[n:], dtype=torch.long)
                logp = logp.cpu()
                total = float(logp[positions, targets].double().sum())
                greedy = bool((logp[positions].argmax(-1) == targets).all())
                out.append((total, greedy))
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self._pair_scores([tuple(r.args[:2]) for r in requests])

    @torch.inference_mode()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        device = next(self.model.parameters()).device
        for request in requests:
            ids = [self.tokenizer.eos_id, *self.tokenizer.encode(request.args[0])]
            tokens = torch.as_tensor(ids, dtype=torch.long, device=device)[None]
            state, total = self.model.init_state(1, device), 0.0
            for start in range(0, tokens.shape[1] - 1, self.max_length):
                chunk = tokens[:, start:start + self.max_length + 1]
                logits, state = self.model(chunk[:, :-1], state)
                logp = logits[0].float().log_softmax(-1)
                total += float(logp.gather(-1, chunk[0, 1:, None]).double().sum())
            out.append(total)
        return out

    # ----- generation --------------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from groundthink.generation import SamplingParams

        out = []
        for request in requests:
            context, kwargs = request.args[0], dict(request.args[1] if len(request.args) > 1 else {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sample = bool(kwargs.get("do_sample", False))
            params = SamplingParams(max_tokens=int(kwargs.get("max_gen_toks", 256)),
                                    temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
                                    seed=int(kwargs.get("seed", 0)), stop=tuple(u for u in until if u))
            out.append(self.engine.complete(context, params).text)
        return out


def main() -> None:
    """lm-eval's own command line with the `groundthink` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
