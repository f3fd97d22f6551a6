"""Tasks with verifiable rewards for stage=rl: each makes prompts and scores completions, on CPU, exactly.

A task is registered under a name (`rl.reward=<name>`) and built from the policy's tokenizer, the model's
vocabulary size, its own settings (`rl.task={...}`, its `Settings` dataclass) and the run's seed. It hands out
episodes by index (`episode(index, split)`: the same index and split always give the same prompt, so a resumed
run trains on exactly the episodes it would have) and scores a completion's token ids (`reward`), in [0, 1].

Every completion is exactly as long as its answer (`Episode.max_tokens`, end tokens ignored while sampling), and
the reward is partial credit: the fraction of answer positions whose token is right. So a policy is paid for each
correct token, which a small model can climb, and 1.0 means the whole answer is right.

- copy:       "<s> <s> " -> s (rl.task.template), s a random string over `alphabet` of min_len..max_len
              characters (text tasks go through the tokenizer: the answer is compared as the tokenizer writes it).
- arithmetic: "<a>+<b>=" -> the decimal sum, a and b in [0, max_operand].
- passkey:    the token-level passkey of groundthink/data/synthetic.py: filler, KEY d1..dL, `distance` filler
              tokens, QUERY -> d1..dL (ids at the top of the vocabulary, no tokenizer involved).
- mqar:       multi-query associative recall (groundthink/data/synthetic.py): the k v pairs, then one key ->
              its value (one token).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from typing import Any

import torch

REWARDS: dict[str, type[Task]] = {}


def register(name: str):
    def wrap(cls: type[Task]) -> type[Task]:
        cls.name = name
        REWARDS[name] = cls
        return cls

    return wrap


@dataclass(frozen=True)
class Episode:
    prompt_ids: list[int]
    answer_ids: list[int]

    @property
    def max_tokens(self) -> int:
        return len(self.answer_ids)


def token_match_reward(answer_ids: list[int], completion_ids: list[int]) -> float:
    """Fraction of answer positions whose completion token is the answer's token (missing tokens are wrong)."""
    if not answer_ids:
        raise ValueError("an episode's answer must have at least one token")
    right = sum(1 for a, c in zip(answer_ids, completion_ids) if a == c)
    return right / len(answer_ids)


class Task:
    """Base class: `Settings` is the task's dataclass of `rl.task` keys."""

    name = ""

    @dataclass
    class Settings:
        pass

    def __init__(self, settings: Any, *, tokenizer: Any, vocab_size: int, seed: int) -> None:
        self.s = settings
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.seed = int(seed)

    @classmethod
    def build(cls, options: dict[str, Any], *, tokenizer: Any, vocab_size: int, seed: int) -> Task:
        """The task from `rl.task` (a ValueError naming an unknown key or a bad value)."""
        known = {f.name for f in fields(cls.Settings)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"rl.task has unknown key(s) {unknown} for rl.reward={cls.name}; its keys: "
                             f"{sorted(known)}")
        task = cls(cls.Settings(**options), tokenizer=tokenizer, vocab_size=vocab_size, seed=seed)
        task.check()
        return task

    def check(self) -> None:
        """Raise ValueError for settings this task cannot use."""

    def rng(self, index: int, split: str) -> random.Random:
        """The random source of one episode: a function of the run's seed, the split and the index only."""
        return random.Random(f"{self.name}:{self.seed}:{split}:{index}")

    def episode(self, index: int, split: str) -> Episode:
        raise NotImplementedError

    def reward(self, episode: Episode, completion_ids: list[int]) -> float:
        return token_match_reward(episode.answer_ids, completion_ids)


class _TextTask(Task):
    def check(self) -> None:
        if self.tokenizer is None:
            raise ValueError(f"rl.reward={self.name} is a text task and the policy has no tokenizer")

    def text_episode(self, prompt: str, answer: str) -> Episode:
        return Episode(self.tokenizer.encode(prompt), self.tokenizer.encode(answer))


@register("copy")
class CopyTask(_TextTask):
    @dataclass
    class Settings:
        alphabet: str = "ab"
        min_len: int = 1
        max_len: int = 3
        # The prompt; {s} is the string to copy. The default shows it twice, so the answer continues a repetition
        # (a pattern a small pretrained model already half-follows: ~5% reward at the start, room to rise).
        template: str = "{s} {s} "

    def check(self) -> None:
        super().check()
        s = self.s
        if not s.alphabet or not 1 <= s.min_len <= s.max_len or "{s}" not in s.template:
            raise ValueError(f"rl.task for copy: alphabet must be non-empty, 1 <= min_len <= max_len and the template "
                             f"must contain {{s}} (got alphabet={s.alphabet!r} min_len={s.min_len} "
                             f"max_len={s.max_len} template={s.template!r})")

    def episode(self, index: int, split: str) -> Episode:
        rng = self.rng(index, split)
        text = "".join(rng.choice(self.s.alphabet) for _ in range(rng.randint(self.s.min_len, self.s.max_len)))
        return self.text_episode(self.s.template.format(s=text), text)


@register("arithmetic")
class ArithmeticTask(_TextTask):
    @dataclass
    class Settings:
        max_operand: int = 9

    def check(self) -> None:
        super().check()
        if self.s.max_operand < 0:
            raise ValueError(f"rl.task.max_operand={self.s.max_operand} must be >= 0")

    def episode(self, index: int, split: str) -> Episode:
        rng = self.rng(index, split)
        a, b = rng.randint(0, self.s.max_operand), rng.randint(0, self.s.max_operand)
        return self.text_episode(f"{a}+{b}=", str(a + b))


def _torch_seed(rng: random.Random) -> int:
    return rng.getrandbits(62)


@register("passkey")
class PasskeyTask(Task):
    @dataclass
    class Settings:
        distance: int = 8
        passkey_len: int = 2
        prefix_len: int = 4

    def check(self) -> None:
        from groundthink.data.synthetic import passkey

        passkey(1, self.s.distance, self.vocab_size, passkey_len=self.s.passkey_len, prefix_len=self.s.prefix_len)

    def episode(self, index: int, split: str) -> Episode:
        from groundthink.data.synthetic import passkey

        ex = passkey(1, self.s.distance, self.vocab_size, passkey_len=self.s.passkey_len,
                     prefix_len=self.s.prefix_len, seed=_torch_seed(self.rng(index, split)))
        ids, query = ex["input_ids"][0], int(ex["query_pos"])
        return Episode(ids[: query + 1].tolist(), ids[query + 1: query + 1 + self.s.passkey_len].tolist())


@register("mqar")
class MQARTask(Task):
    @dataclass
    class Settings:
        num_kv_pairs: int = 4
        # Keys and values come from the first `vocab` ids ([1, vocab/2) and [vocab/2, vocab)); null = the model's.
        vocab: int | None = None

    def check(self) -> None:
        from groundthink.data.synthetic import mqar

        if self.s.vocab is not None and not 4 <= self.s.vocab <= self.vocab_size:
            raise ValueError(f"rl.task.vocab={self.s.vocab} must be in [4, the model's vocabulary {self.vocab_size}]")
        mqar(1, 4 * self.s.num_kv_pairs, self.s.num_kv_pairs, self.s.vocab or self.vocab_size)

    def episode(self, index: int, split: str) -> Episode:
        from groundthink.data.synthetic import mqar

        kv = self.s.num_kv_pairs
        ex = mqar(1, 4 * kv, kv, self.s.vocab or self.vocab_size, seed=_torch_seed(self.rng(index, split)))
        ids, labels = ex["input_ids"][0], ex["labels"][0]
        query = int(torch.nonzero(labels != -100)[0])  # the first query of the sequence: one key, one value
        return Episode(ids[: 2 * kv].tolist() + [int(ids[query])], [int(labels[query])])


def build_task(name: str, options: dict[str, Any], *, tokenizer: Any, vocab_size: int, seed: int) -> Task:
    if name not in REWARDS:
        raise ValueError(f"rl.reward={name!r} is not a registered reward; registered: {sorted(REWARDS)} "
                         "(groundthink/rl/rewards.py)")
    return REWARDS[name].build(dict(options or {}), tokenizer=tokenizer, vocab_size=vocab_size, seed=seed)
