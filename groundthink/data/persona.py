"""Persona conversations: the templates of groundthink-eval's `persona` probe, and `data=persona`, synthetic
conversations that teach the probe's skill (answering from facts stated earlier in the conversation).

    groundthink-train data=persona model.pattern=RMA data.max_filler_turns=4

A persona has a name, a role and three facts (a favourite colour, a home city, a pet), stated in one turn:

    <|persona|>Your name is Mira. You are a beekeeper. Your favourite colour is green. You live in Oslo. Your pet
    is a goat.<|end|>

**data=persona**: every conversation (deterministic from `data.seed`) states a persona whose five values are drawn
at random from `VALUES`, then asks all five probe questions (`PROBES`) in a random order, each answered in the
probe's own words (``My name is Mira.``), with 0..`max_filler_turns` filler exchanges (`FILLER_TURNS`) before each
question. Since every conversation draws its values afresh, no answer can be memorised: it has to be read back from
the persona turn, across the filler. The loss is on assistant tokens only and held-out conversations give val/loss,
exactly as for data=chat (groundthink/data/chat.py). The eval probe draws its personas from its own seed and puts
them at token distances of its choosing, so a data=persona run is scored on conversations it never saw, at
distances up to and beyond those it trained on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from groundthink.data.chat import ChatSource
from groundthink.data.errors import DataError
from groundthink.data.sources import DataSettings, PreparedData, TokenizerSettings, register_source

VALUES = {
    "name": ["Mira", "Tomas", "Ingrid", "Kofi", "Lena", "Arjun", "Sofia", "Emil", "Yara", "Nils", "Priya", "Oskar"],
    "role": ["beekeeper", "librarian", "train driver", "glassblower", "astronomer", "baker", "lighthouse keeper",
             "ship's navigator"],
    "colour": ["green", "orange", "purple", "silver", "yellow", "blue", "red", "brown"],
    "city": ["Oslo", "Lima", "Kyoto", "Cairo", "Dublin", "Quito", "Perth", "Riga"],
    "pet": ["cat", "parrot", "tortoise", "goat", "ferret", "dog", "rabbit", "hamster"],
}
STATEMENT = ("Your name is {name}. You are a {role}. Your favourite colour is {colour}. You live in {city}. "
             "Your pet is a {pet}.")
PROBES = {  # attribute: (question, answer prefix, continuation format)
    "name": ("What is your name?", "My name is", " {}."),
    "role": ("What is your job?", "I am a", " {}."),
    "colour": ("What is your favourite colour?", "My favourite colour is", " {}."),
    "city": ("Where do you live?", "I live in", " {}."),
    "pet": ("What pet do you have?", "My pet is a", " {}."),
}
FILLER_TURNS = [
    ("Can you tell me about the weather today?", "It looks like rain later, so an umbrella would help."),
    ("What should I cook for dinner?", "A simple soup with bread is warm and quick to make."),
    ("How do I keep a plant alive?", "Give it light, water it when the soil is dry, and do not drown it."),
    ("Any tips for sleeping better?", "Go to bed at the same time each night and keep the room dark."),
    ("What is a good way to learn a language?", "Practise a little every day and speak it with other people."),
    ("How far is the moon?", "About three hundred and eighty thousand kilometres from the earth."),
    ("Why is the sea salty?", "Rivers carry salts from rocks into the sea, and the water evaporates."),
    ("Can you recommend a book?", "A collection of short stories is easy to read in small pieces."),
    ("How do I fix a squeaky door?", "A drop of oil on the hinges usually stops the noise."),
    ("What makes a good walk?", "A quiet path, comfortable shoes and no hurry at all."),
    ("How do bees make honey?", "They gather nectar, store it in the comb and fan it until it thickens."),
    ("Is tea better than coffee?", "Both are fine; tea has less caffeine and coffee is stronger."),
]


@dataclass
class PersonaDataSettings(DataSettings):
    source: str = "persona"
    conversations: int = 4000  # generated conversations, training and held-out together
    max_filler_turns: int = 2  # filler exchanges before each question: uniform in 0..max_filler_turns
    role: str = "persona"  # the control token of the persona turn: persona | system
    seed: int = 0  # the conversations' seed (the train/held-out split uses the run's seed, as data=chat)
    val_fraction: float = 0.05  # share of conversations held out (assistant-token val/loss)
    max_tokens: int = 4096  # a conversation longer than this is truncated (as data=chat)
    batch_size: int = 16
    seq_len: int = 256


def persona_conversation(rng: random.Random, max_filler_turns: int, role: str = "persona"
                         ) -> list[dict[str, str]]:
    """One conversation: a random persona, then the five questions in a random order with filler before each."""
    persona = {attr: rng.choice(values) for attr, values in VALUES.items()}
    messages = [{"role": role, "content": STATEMENT.format(**persona)}]
    for attr in rng.sample(list(PROBES), len(PROBES)):
        for _ in range(rng.randint(0, max_filler_turns)):
            user, answer = rng.choice(FILLER_TURNS)
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        question, prefix, fmt = PROBES[attr]
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": prefix + fmt.format(persona[attr])}]
    return messages


def persona_conversations(settings: PersonaDataSettings) -> list[list[dict[str, str]]]:
    rng = random.Random(f"persona-data-{settings.seed}")
    return [persona_conversation(rng, int(settings.max_filler_turns), settings.role)
            for _ in range(int(settings.conversations))]


@register_source
class PersonaSource(ChatSource):
    """Synthetic persona conversations (PersonaDataSettings; the module docstring): data=chat's preparation over
    generated conversations instead of a file."""

    name = "persona"
    Settings = PersonaDataSettings

    def conversations(self, settings: PersonaDataSettings) -> list[list[dict[str, str]]]:
        if settings.role not in ("persona", "system"):
            raise DataError(f"data.role={settings.role}: persona or system (the control token of the persona turn)")
        if int(settings.max_filler_turns) < 0:
            raise DataError(f"data.max_filler_turns={settings.max_filler_turns} must be >= 0")
        if int(settings.conversations) < 2:
            raise DataError(f"data.conversations={settings.conversations}: at least 2 (training and held-out)")
        return persona_conversations(settings)

    def where(self, settings: PersonaDataSettings) -> str:
        return "data=persona"

    def prepare(self, settings: PersonaDataSettings, tokenizer: TokenizerSettings, **kwargs) -> PreparedData:
        prepared = super().prepare(settings, tokenizer, **kwargs)
        prepared.description = f"persona conversations: {prepared.description}"
        return prepared
