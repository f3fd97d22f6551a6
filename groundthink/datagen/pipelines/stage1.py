"""`stage1`: instruction/response pairs from a base model in plain completion mode, in five phases.

1. instructions: `count` slots; slot i shows the model a numbered list of `n_shots` seed instructions (the
   prompt set, shuffled by slot) and lets it write item n_shots+1; the completion is cut at the first newline
   and stripped of a leading number.
2. instruction_critic: each usable instruction (non-empty, ended normally, not a duplicate of a lower slot's)
   judged A = clear and specific / B = vague, incomplete or unsafe (groundthink/datagen/critics.py).
3. responses: accepted instructions answered from `Instruction: <x>\\nResponse:` prompts (optionally after a few
   fixed examples), cleaned at the delimiters (`Instruction:`, `Response:`, ...).
4. pair_critic: clean responses (ended normally, non-empty, not runaway) judged A = fulfils the instruction /
   B = does not.
5. data: accepted pairs become chat records (user = instruction, assistant = response) with both critiques and
   full provenance; QC and the manifest follow in the entry point.

Each phase has its own exactly-once store under phases/ (data/ for phase 5) and reads its input from the
previous phase's records, so a kill anywhere resumes in the phase it stopped in, and a pilot (count=100) grows
to the full count by running the same command with the larger count.
"""

from __future__ import annotations

import random
import re
from typing import Any

from groundthink.datagen.backends.base import CompletionRequest, RequestRejected
from groundthink.datagen.critics import CriticSettings, judge
from groundthink.datagen.pipelines.base import PHASES_DIR, Pipeline, PipelineError, generate, output_fields
from groundthink.datagen.runner import Attempts, PhaseStats, Task, utc_now
from groundthink.datagen.text import clean_at_delimiters, derive_seed, is_runaway, sha256_text

_LEADING_NUMBER = re.compile(r"^\s*\d+[.)]\s*")


def _slot_id(slot: int) -> str:
    return f"s{slot:07d}"


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


class Stage1Pipeline(Pipeline):
    name = "stage1"

    def prepare(self) -> dict[str, Any]:
        s = self.settings
        if self.ctx.count is None or self.ctx.count < 1:
            raise PipelineError("pipeline=stage1 needs count=N (the number of instruction slots), e.g. count=100 "
                                "for a pilot")
        if not hasattr(self.ctx.backend, "check_prompt") and self.ctx.backend.supports_chat:
            raise PipelineError("stage1 drives a base model in plain completion mode; set backend.mode=completion")
        self.n_shots = int(s.get("n_shots", 8))
        if self.n_shots < 1:
            raise PipelineError(f"pipeline.n_shots={self.n_shots} must be >= 1")
        spellings = {str(k): [str(x) for x in v] for k, v in (s["critic"]["labels"]).items()}
        try:
            self.critic = CriticSettings(spellings=spellings, accept=str(s["critic"].get("accept", "A")),
                                         min_margin=float(s["critic"]["min_margin"]),
                                         top_logprobs=int(s["critic"]["top_logprobs"]),
                                         batch_size=int(s["critic"].get("batch_size", 8))).validate()
        except ValueError as exc:
            raise PipelineError(f"pipeline.critic: {exc}") from None
        self.templates = {k: s[k]["template"] for k in ("instruction", "instruction_critic", "response", "pair_critic")}
        for key, needs in (("instruction", "{examples}"), ("instruction_critic", "{instruction}"),
                           ("response", "{instruction}"), ("pair_critic", "{response}")):
            if needs not in self.templates[key]:
                raise PipelineError(f"pipeline.{key}.template must contain {needs}")
        self.template_sha = {k: sha256_text(v) for k, v in self.templates.items()}
        seeds = [p.text.strip() for p in self.prompts]
        if any("\n" in t for t in seeds):
            raise PipelineError("stage1 seed instructions must be single lines (the few-shot list is one per line)")
        self.seeds = seeds
        # Contamination guard now: the seeds and fixed template text reach the model in every prompt.
        if hasattr(self.ctx.backend, "check_prompt"):
            self.ctx.backend.check_prompt(self._instruction_prompt(0), "stage1 instruction prompt")
        return {"slots": self.ctx.count, "seed_instructions": len(seeds), "n_shots": self.n_shots,
                "templates_sha256": self.template_sha}

    # ----- prompts -------------------------------------------------------------------------------------------
    def _instruction_prompt(self, slot: int) -> str:
        rng = random.Random(derive_seed(self.ctx.seed, _slot_id(slot)))
        shots = rng.sample(self.seeds, min(self.n_shots, len(self.seeds)))
        examples = "\n".join(f"{i}. {text}" for i, text in enumerate(shots, start=1))
        return self.templates["instruction"].format(examples=examples, next=len(shots) + 1)

    def _params(self, key: str, record_id: str) -> dict[str, Any]:
        s = self.settings[key]
        return dict(max_tokens=int(s["max_tokens"]), temperature=float(s.get("temperature", 1.0)),
                    top_p=float(s.get("top_p", 1.0)), top_k=s.get("top_k"), stop=tuple(s.get("stop") or ()),
                    seed=derive_seed(self.ctx.seed, f"{key}:{record_id}"))

    # ----- phases --------------------------------------------------------------------------------------------
    async def run(self) -> list[PhaseStats]:
        stats = [await self._instructions()]
        stats.append(await self._critic("instruction_critic", self._usable_instructions(),
                                        self._instruction_critic_prompt))
        stats.append(await self._responses())
        stats.append(await self._critic("pair_critic", self._clean_responses(), self._pair_critic_prompt))
        stats.append(self._data())
        return stats

    async def _instructions(self) -> PhaseStats:
        store = self.ctx.store(PHASES_DIR, "instructions")
        tasks = [Task(_slot_id(i), i) for i in range(self.ctx.count)]
        delimiters = tuple(self.settings["instruction"].get("delimiters") or ("\n",))

        async def work(task: Task, attempts: Attempts) -> dict[str, Any]:
            request = CompletionRequest(prompt=self._instruction_prompt(task.payload),
                                        **self._params("instruction", task.id))
            result, latency = await generate(self.ctx, attempts, request)
            text, cut_at = clean_at_delimiters(result.text, delimiters)
            text = _LEADING_NUMBER.sub("", text).strip()
            return {"id": task.id, "phase": "instructions", "slot": task.payload, "text": text,
                    "raw_text": result.text,
                    **output_fields(self.ctx, result, request, template_sha256=self.template_sha["instruction"],
                                    attempts=attempts, latency_s=latency, cut_at=None, text=text),
                    "cut_at": cut_at}

        return await self.ctx.phase("instructions", tasks, work, store)

    def _records(self, stem: str) -> list[dict[str, Any]]:
        store = self.ctx.store(PHASES_DIR, stem)
        return sorted(store.records(), key=lambda r: r["id"])

    def _usable_instructions(self) -> list[dict[str, Any]]:
        """Phase-1 records that ended normally with a non-empty instruction, first occurrence of each text."""
        seen: set[str] = set()
        usable = []
        for record in self._records("instructions"):
            key = _normalise(record["text"])
            if not key or record["finish_reason"] != "stop" or key in seen:
                continue
            seen.add(key)
            usable.append({"id": record["id"], "instruction": record["text"]})
        return usable

    def _instruction_critic_prompt(self, item: dict[str, Any]) -> str:
        return self.templates["instruction_critic"].format(instruction=item["instruction"])

    def _pair_critic_prompt(self, item: dict[str, Any]) -> str:
        return self.templates["pair_critic"].format(instruction=item["instruction"], response=item["response"])

    async def _critic(self, phase: str, items: list[dict[str, Any]], build) -> PhaseStats:
        store = self.ctx.store(PHASES_DIR, phase)
        pending = [it for it in items if it["id"] not in store.done]
        # A prompt the contamination guard refuses (generated text can hold a control token) gets a task of its
        # own, so its rejection does not take a whole batch with it.
        alone, batchable = [], []
        for item in pending:
            try:
                if hasattr(self.ctx.backend, "check_prompt"):
                    self.ctx.backend.check_prompt(build(item), f"{phase} prompt for {item['id']}")
                batchable.append(item)
            except RequestRejected:
                alone.append(item)
        # In-process backends score a batch in one forward pass; HTTP critics run `concurrency` requests at once.
        size = self.critic.batch_size if self.ctx.backend.max_concurrency == 1 else 1
        tasks = [Task(f"{phase}:{it['id']}", [it], [it["id"]]) for it in alone]
        tasks += [Task(f"{phase}:{batchable[i]['id']}", batchable[i:i + size],
                       [it["id"] for it in batchable[i:i + size]]) for i in range(0, len(batchable), size)]
        skipped = len(items) - len(pending)

        async def work(task: Task, attempts: Attempts) -> list[dict[str, Any]]:
            prompts = [build(item) for item in task.payload]
            scores = await attempts.call(lambda: self.ctx.backend.label_logprobs_batch(
                prompts, self.critic.spellings, top_logprobs=self.critic.top_logprobs))
            return [{"id": item["id"], "phase": phase, **{k: v for k, v in item.items() if k != "id"},
                     "critic": judge(score, self.critic),
                     "generator": {**self.ctx.generator, "critic": True,
                                   "prompt_template_sha256": self.template_sha[phase]},
                     "created_utc": utc_now(), "attempts": attempts.count}
                    for item, score in zip(task.payload, scores)]

        stats = await self.ctx.phase(phase, tasks, work, store)
        stats.total += skipped
        stats.skipped += skipped
        return stats

    async def _responses(self) -> PhaseStats:
        store = self.ctx.store(PHASES_DIR, "responses")
        accepted = [r for r in self._records("instruction_critic") if r["critic"]["accepted"]]
        tasks = [Task(r["id"], r) for r in accepted]
        delimiters = tuple(self.settings["response"].get("delimiters") or ())

        async def work(task: Task, attempts: Attempts) -> dict[str, Any]:
            instruction = task.payload["instruction"]
            prompt = self.templates["response"].format(instruction=instruction)
            request = CompletionRequest(prompt=prompt, **self._params("response", task.id))
            result, latency = await generate(self.ctx, attempts, request)
            text, cut_at = clean_at_delimiters(result.text, delimiters)
            return {"id": task.id, "phase": "responses", "instruction": instruction, "text": text,
                    "raw_text": result.text,
                    **output_fields(self.ctx, result, request, template_sha256=self.template_sha["response"],
                                    attempts=attempts, latency_s=latency, cut_at=cut_at, text=text)}

        return await self.ctx.phase("responses", tasks, work, store)

    def _clean_responses(self) -> list[dict[str, Any]]:
        return [{"id": r["id"], "instruction": r["instruction"], "response": r["text"]}
                for r in self._records("responses")
                if r["finish_reason"] == "stop" and r["text"] and not is_runaway(r["text"], r.get("cut_at"))]

    def _data(self) -> PhaseStats:
        store = self.data_store()
        responses = {r["id"]: r for r in self._records("responses")}
        instruction_critic = {r["id"]: r["critic"] for r in self._records("instruction_critic")}
        instructions = {r["id"]: r for r in self._records("instructions")}
        pairs = [r for r in self._records("pair_critic") if r["critic"]["accepted"]]
        stats = PhaseStats(phase="data", total=len(pairs))
        for pair in pairs:
            if pair["id"] in store.done:
                stats.skipped += 1
                continue
            response = responses[pair["id"]]
            store.append({
                "id": pair["id"],
                "messages": [{"role": "user", "content": response["instruction"]},
                             {"role": "assistant", "content": response["text"]}],
                "pipeline": self.name,
                "finish_reason": response["finish_reason"],
                "usage": response["usage"],
                "runaway": response["runaway"],
                "cut_at": response["cut_at"],
                "critics": {"instruction": instruction_critic[pair["id"]], "pair": pair["critic"]},
                "generator": response["generator"],
                "instruction_generator": instructions[pair["id"]]["generator"],
                "created_utc": utc_now(),
            })
            stats.written += 1
        return stats
