"""`persona`: does the model keep a persona stated at the start of a conversation? Curve over distance.

The probe set is generated from `seed` (deterministic): each persona has a name, a role and three facts (a
favourite colour, a home city, a pet), stated in one turn with the control tokens (the templates are in
groundthink/data/persona.py, whose `data=persona` source trains this skill):

    <|persona|>Your name is Mira. You are a beekeeper. Your favourite colour is green. You live in Oslo. Your pet
    is a goat.<|end|>

(`role: system` uses <|system|> instead). Filler conversation turns follow (generic <|user|> / <|assistant|>
exchanges drawn from a fixed list) until at least `distance` tokens separate the end of the persona turn from the
probe; then, for each attribute, `<|user|>What is your name?<|end|>\n<|assistant|>My name is` and the score: the
true value's log-likelihood (" Mira.") against `distractors` other values of the same attribute. A probe is
correct when the true value scores highest; chance is 1 / (1 + distractors). With `calibrate` (the default) each
value's score is its log-likelihood minus its log-likelihood after the same question asked with no persona and no
filler (from h0): summed log-likelihoods favour short and frequent values ("red" over "purple"), a prior that
would otherwise decide most probes for trained and untrained models alike (measured on the 300-step default run:
0.175 accuracy uncalibrated, trained and untrained, against a chance of 0.25). One carried-state stream per persona,
probed at every distance (the state is copied for the probes, so they do not enter the conversation).
Results: accuracy per distance (persona.csv, persona.png; the actual mean distance in tokens is in the CSV);
scalars acc_d<distance>, acc_mean, chance.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from groundthink.data.persona import FILLER_TURNS, PROBES, STATEMENT, VALUES
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


@dataclass
class PersonaSettings:
    distances: list[int] = field(default_factory=lambda: [0, 64, 256, 1024, 4096, 8192])  # tokens since persona
    personas: int = 8
    distractors: int = 3
    role: str = "persona"  # the control token of the persona turn: persona | system
    calibrate: bool = True  # subtract each value's log-likelihood given the question alone (module docstring)
    seed: int = 0


def probe_set(settings: PersonaSettings) -> list[dict[str, str]]:
    """The personas of `seed` (deterministic): [{attribute: value}, ...]."""
    rng = random.Random(settings.seed)
    return [{attr: rng.choice(values) for attr, values in VALUES.items()} for _ in range(settings.personas)]


@register_task("persona")
class PersonaTask(EvalTask):
    Settings = PersonaSettings
    description = "persona facts (name, role, colour, city, pet) kept over filler conversation turns"

    def check(self, loaded: Any, s: PersonaSettings) -> None:
        from groundthink.data.tokenizer import ROLE_TOKENS

        tok = need_tokenizer(loaded, "persona")
        check_positive("persona", personas=s.personas, distractors=s.distractors)
        if not s.distances or any(int(d) < 0 for d in s.distances):
            raise EvalError(f"eval.tasks.persona.distances={s.distances}: non-empty, each >= 0")
        if s.role not in ("persona", "system"):
            raise EvalError(f"eval.tasks.persona.role={s.role}: persona or system")
        if s.distractors > min(len(v) for v in VALUES.values()) - 1:
            raise EvalError(f"eval.tasks.persona.distractors={s.distractors}: at most "
                            f"{min(len(v) for v in VALUES.values()) - 1} (the smallest value list)")
        for token in (ROLE_TOKENS[s.role], ROLE_TOKENS["user"], ROLE_TOKENS["assistant"]):
            if len(tok.encode(token)) != 1:
                raise EvalError(f"the run's tokenizer does not encode {token} as one control token")

    def run(self, loaded: Any, s: PersonaSettings, out_dir: Path, progress) -> dict[str, float]:
        from groundthink.data.tokenizer import END_OF_TURN_TOKEN, ROLE_TOKENS

        tok, model = loaded.tokenizer, loaded.model
        distances = sorted(set(int(d) for d in s.distances))
        correct = {d: 0 for d in distances}
        total = {d: 0 for d in distances}
        actual: dict[int, list[int]] = {d: [] for d in distances}
        priors: dict[tuple[str, ...], list[float]] = {}

        def prior(question: str, prefix: str, fmt: str, values: list[str]) -> list[float]:
            """log P(value | the question alone, asked from h0): what the model prefers without the persona."""
            key = (question, *values)
            if key not in priors:
                ids = tok.encode(f"{ROLE_TOKENS['user']}{question}{END_OF_TURN_TOKEN}\n"
                                 f"{ROLE_TOKENS['assistant']}{prefix}")
                last, asked = feed(model, ids, model.init_state(1, model_device(model)))
                priors[key] = score_candidates(model, asked, last, [tok.encode(fmt.format(v)) for v in values])
            return priors[key]

        bar = progress(len(probe_set(s)) * len(distances), "persona")
        for index, persona in enumerate(probe_set(s)):
            rng = random.Random(f"{s.seed}-filler-{index}")  # a persona's filler does not depend on the distances
            text = f"{ROLE_TOKENS[s.role]}{STATEMENT.format(**persona)}{END_OF_TURN_TOKEN}\n"
            _, state = feed(model, tok.encode(text), model.init_state(1, model_device(model)))
            fed = 0
            for d in distances:
                while fed < d:
                    user, answer = rng.choice(FILLER_TURNS)
                    turn = tok.encode(f"{ROLE_TOKENS['user']}{user}{END_OF_TURN_TOKEN}\n"
                                      f"{ROLE_TOKENS['assistant']}{answer}{END_OF_TURN_TOKEN}\n")
                    _, state = feed(model, turn, state)
                    fed += len(turn)
                actual[d].append(fed)
                for attr, (question, prefix, fmt) in PROBES.items():
                    others = [v for v in VALUES[attr] if v != persona[attr]]
                    rng_probe = random.Random(f"{s.seed}-{attr}-{persona[attr]}")
                    options = [persona[attr], *rng_probe.sample(others, s.distractors)]
                    probe = tok.encode(f"{ROLE_TOKENS['user']}{question}{END_OF_TURN_TOKEN}\n"
                                       f"{ROLE_TOKENS['assistant']}{prefix}")
                    last, asked = feed(model, probe, copy_state(state))
                    scores = score_candidates(model, asked, last, [tok.encode(fmt.format(v)) for v in options])
                    if s.calibrate:
                        scores = [a - b for a, b in zip(scores, prior(question, prefix, fmt, options))]
                    correct[d] += int(scores[0] > max(scores[1:]))
                    total[d] += 1
                bar.update(1)
        bar.close()
        chance = 1.0 / (1 + s.distractors)
        rows = [{"distance": d, "mean_tokens_since_persona": sum(actual[d]) / len(actual[d]),
                 "probes": total[d], "accuracy": correct[d] / total[d], "chance": chance} for d in distances]
        write_csv(out_dir / "persona.csv", rows)
        plot(out_dir / "persona.png",
             {"accuracy": ([max(1.0, r["mean_tokens_since_persona"]) for r in rows], [r["accuracy"] for r in rows])},
             title="persona consistency (carried state)", xlabel="tokens since the persona turn (log scale)",
             ylabel="accuracy", logx=True, hline=chance)
        out = {f"acc_d{r['distance']}": r["accuracy"] for r in rows}
        out["acc_mean"] = sum(r["accuracy"] for r in rows) / len(rows)
        out["chance"] = chance
        return out
