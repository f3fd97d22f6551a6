"""`responses`: a prompt set -> one response per prompt and per system-prompt variant.

The previous version's phase 3e, made resumable: the same prompts answered under different system prompts (e.g.
`control` and `treatment` datasets), each record keyed `<prompt id>.<variant>`. Settings (conf/pipeline/
responses.yaml): the output budget `max_tokens`, sampling, the variants (name -> system prompt, null for none),
`system_prompt_token_budget` (a system prompt over it is refused before any generation; counted with the
backend's tokenizer in-process, estimated at 4 bytes per token for HTTP backends), and the format:

- `chat`: the backend's chat format (an HTTP server's /v1/chat/completions; a GroundThink run's control tokens);
- `completion`: plain text from `completion_template` (`{system_block}` is the system prompt and a blank line,
  or nothing; `{prompt}` the user prompt), cleaned at `stop` sequences; the contamination guard applies;
- `auto`: chat where the backend has a chat format, else completion.

Each record is chat JSONL for the SFT stage: messages [system (if any), user, assistant] plus provenance.
"""

from __future__ import annotations

from typing import Any

from groundthink.datagen.backends.base import CompletionRequest
from groundthink.datagen.pipelines.base import Pipeline, PipelineError, generate, output_fields
from groundthink.datagen.runner import Attempts, PhaseStats, Task
from groundthink.datagen.text import clean_at_delimiters, derive_seed, sha256_text


class ResponsesPipeline(Pipeline):
    name = "responses"

    def prepare(self) -> dict[str, Any]:
        s = self.settings
        variants = s.get("variants") or {"default": None}
        if not isinstance(variants, dict):
            raise PipelineError("pipeline.variants must map a variant name to its system prompt (or null)")
        for name in variants:
            if not str(name) or "." in str(name):
                raise PipelineError(f"pipeline.variants: {name!r} is not a usable variant name (no dots; ids are "
                                    f"<prompt id>.<variant>)")
        self.variants = {str(k): v for k, v in variants.items()}
        fmt = s.get("format", "auto")
        if fmt not in ("auto", "chat", "completion"):
            raise PipelineError(f"pipeline.format={fmt!r}: allowed auto, chat, completion")
        self.format = ("chat" if self.ctx.backend.supports_chat else "completion") if fmt == "auto" else fmt
        if self.format == "chat" and not self.ctx.backend.supports_chat:
            raise PipelineError(f"pipeline.format=chat but the {self.ctx.backend.name} backend has no chat format "
                                f"(set backend.mode=chat for an HTTP server, or pipeline.format=completion)")
        budget = s.get("system_prompt_token_budget")
        counts = {}
        for name, system in self.variants.items():
            if system:
                n, exact = self.ctx.backend.count_tokens(system)
                counts[name] = {"tokens": n, "exact": exact}
                if budget is not None and n > int(budget):
                    raise PipelineError(
                        f"pipeline.variants.{name}: the system prompt has {n} tokens"
                        f"{'' if exact else ' (estimated at 4 bytes per token)'}, over "
                        f"pipeline.system_prompt_token_budget={budget}; shorten it or raise the budget")
        self.template = s.get("completion_template") or "{system_block}Instruction: {prompt}\nResponse:"
        self.template_sha = sha256_text(self.template if self.format == "completion" else "chat")
        ids = [(p, v) for p in self.prompts for v in self.variants]
        count = self.ctx.count
        if count is not None:
            if count < 1:
                raise PipelineError(f"count={count} must be >= 1 (or null for every prompt x variant)")
            if count > len(ids):
                raise PipelineError(f"count={count} but the prompt set ({len(self.prompts)} prompts) x "
                                    f"{len(self.variants)} variants makes {len(ids)} records; lower count or use a "
                                    f"larger prompt set")
            ids = ids[:count]
        self.items = ids
        if self.format == "completion" and hasattr(self.ctx.backend, "check_prompt"):
            # The guard's token-id check on every prompt now, so a contaminated prompt set stops before any work.
            for prompt, variant in self.items:
                self.ctx.backend.check_prompt(self._completion_prompt(prompt.text, self.variants[variant]),
                                              f"prompt {prompt.id} (variant {variant})")
        return {"records": len(self.items), "format": self.format, "variants": list(self.variants),
                "system_prompt_tokens": counts}

    def _completion_prompt(self, text: str, system: str | None) -> str:
        return self.template.format(system_block=f"{system}\n\n" if system else "", prompt=text, system=system or "")

    def _request(self, prompt, variant: str) -> CompletionRequest:
        s = self.settings
        system = self.variants[variant]
        common = dict(max_tokens=int(s["max_tokens"]), temperature=float(s.get("temperature", 1.0)),
                      top_p=float(s.get("top_p", 1.0)), top_k=s.get("top_k"),
                      seed=derive_seed(self.ctx.seed, f"{prompt.id}.{variant}"))
        if self.format == "chat":
            messages = ((("system", system),) if system else ()) + (("user", prompt.text),)
            return CompletionRequest(messages=messages, **common)
        return CompletionRequest(prompt=self._completion_prompt(prompt.text, system),
                                 stop=tuple(s.get("stop") or ()), **common)

    async def run(self) -> list[PhaseStats]:
        store = self.data_store()
        tasks = [Task(f"{p.id}.{v}", (p, v)) for p, v in self.items]
        delimiters = tuple(self.settings.get("stop") or ()) if self.format == "completion" else ()

        async def work(task: Task, attempts: Attempts) -> dict[str, Any]:
            prompt, variant = task.payload
            request = self._request(prompt, variant)
            result, latency = await generate(self.ctx, attempts, request)
            text, cut_at = clean_at_delimiters(result.text, delimiters)
            system = self.variants[variant]
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt.text}, {"role": "assistant", "content": text}]
            return {"id": task.id, "prompt_id": prompt.id, "variant": variant, "messages": messages,
                    "pipeline": self.name, "format": self.format,
                    **output_fields(self.ctx, result, request, template_sha256=self.template_sha, attempts=attempts,
                                    latency_s=latency, cut_at=cut_at, text=text)}

        return [await self.ctx.phase(self.name, tasks, work, store)]
