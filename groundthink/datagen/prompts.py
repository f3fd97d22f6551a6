"""Prompt sets: a list of (id, text), inline in conf/prompts/<name>.yaml or read from a .jsonl / .txt file.

Ids are what makes resuming exact, so they must be stable: an `id` given with the prompt is used as it is; a
prompt without one gets `p-` + the first 12 hex digits of the sha256 of its text (stable when the set is
reordered or grown). Duplicate ids, empty texts and missing files are refused before any generation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from groundthink.datagen.text import sha256_text


class PromptSetError(ValueError):
    """A prompt set that cannot be used; the message names the set, the entry and the fix."""


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str


def _prompt(entry: Any, where: str, id_field: str, text_field: str) -> Prompt:
    if isinstance(entry, str):
        text, pid = entry, None
    elif isinstance(entry, dict):
        text, pid = entry.get(text_field), entry.get(id_field)
    else:
        raise PromptSetError(f"{where}: expected a string or an object with {text_field!r}, got {type(entry).__name__}")
    if not isinstance(text, str) or not text.strip():
        raise PromptSetError(f"{where}: the prompt text ({text_field!r}) is missing or empty")
    if pid is not None and (not isinstance(pid, (str, int)) or str(pid).strip() == ""):
        raise PromptSetError(f"{where}: {id_field!r} must be a non-empty string or integer, got {pid!r}")
    return Prompt(str(pid) if pid is not None else "p-" + sha256_text(text)[:12], text)


def load_prompt_set(settings: dict[str, Any]) -> list[Prompt]:
    """settings: {name, prompts: [...]} inline, or {name, path, id_field, text_field} for a file."""
    name = settings.get("name", "prompts")
    id_field = settings.get("id_field") or "id"
    text_field = settings.get("text_field") or "text"
    entries: list[tuple[str, Any]] = []
    path = settings.get("path")
    if path:
        file = Path(str(path)).expanduser()
        if not file.is_file():
            raise PromptSetError(f"prompts.path={path}: no such file (a .jsonl with one {{{id_field!r}, "
                                 f"{text_field!r}}} object per line, or a .txt with one prompt per line)")
        if file.suffix == ".jsonl":
            for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
                if line.strip():
                    try:
                        entries.append((f"{file}:{number}", json.loads(line)))
                    except ValueError as exc:
                        raise PromptSetError(f"{file}:{number} is not valid JSON ({exc})") from None
        elif file.suffix in (".txt", ".text"):
            entries = [(f"{file}:{n}", line) for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1)
                       if line.strip()]
        else:
            raise PromptSetError(f"prompts.path={path}: use a .jsonl or a .txt file")
    else:
        inline = settings.get("prompts")
        if not inline:
            raise PromptSetError(f"prompts={name}: no prompts (give prompts: [...] inline or prompts.path=FILE)")
        entries = [(f"prompts={name} entry {i}", e) for i, e in enumerate(inline)]
    prompts = [_prompt(entry, where, id_field, text_field) for where, entry in entries]
    if not prompts:
        raise PromptSetError(f"prompts={name}: the set is empty")
    seen: dict[str, int] = {}
    for i, p in enumerate(prompts):
        if p.id in seen:
            raise PromptSetError(f"prompts={name}: id {p.id!r} appears twice (entries {seen[p.id]} and {i}); ids "
                                 f"must be unique, they key the records for resuming")
        seen[p.id] = i
    return prompts
