"""Text checks shared by the pipelines and QC: delimiter-aware cleaning, runaway detection, delimiter leakage.

- Cleaning (stage 1, phase 3): a base model asked `Instruction: ...\\nResponse:` often answers and then goes on
  with the next example ("\\nInstruction: ..."). The response is cut at the first delimiter and stripped; where
  it was cut is recorded.
- Runaway: an output that ran on past its answer, i.e. cleaning had to cut at a delimiter, or that degenerated
  into repetition (its zlib-compressed size is below `repeat_ratio` of its size, measured on outputs of at least
  `repeat_min_chars` characters; ordinary prose compresses to about 0.4-0.6, a loop of a phrase far below 0.2).
- Delimiter leakage: a delimiter or control/role marker still inside the final text (cleaning should make this 0).
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence

REPEAT_RATIO = 0.2
REPEAT_MIN_CHARS = 200


def clean_at_delimiters(text: str, delimiters: Sequence[str]) -> tuple[str, str | None]:
    """(text cut before the earliest delimiter and stripped, the delimiter that cut it or None)."""
    cut, at = len(text), None
    for delimiter in delimiters:
        i = text.find(delimiter)
        if 0 <= i < cut:
            cut, at = i, delimiter
    return text[:cut].strip(), at


def is_repetitive(text: str, *, ratio: float = REPEAT_RATIO, min_chars: int = REPEAT_MIN_CHARS) -> bool:
    if len(text) < min_chars:
        return False
    raw = text.encode("utf-8")
    return len(zlib.compress(raw, 9)) < ratio * len(raw)


def is_runaway(text: str, cut_at: str | None) -> bool:
    return cut_at is not None or is_repetitive(text)


def leaked(text: str, delimiters: Sequence[str]) -> list[str]:
    """The delimiters found in `text`."""
    return [d for d in delimiters if d and d in text]


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def derive_seed(seed: int, record_id: str) -> int:
    """A per-record sampling seed that does not depend on the order records are processed in."""
    return int(hashlib.sha256(f"{seed}:{record_id}".encode()).hexdigest()[:8], 16)
