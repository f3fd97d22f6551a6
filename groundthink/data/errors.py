"""The one exception type of groundthink.data: a problem with the user's data or tokenizer files."""

from __future__ import annotations


class DataError(ValueError):
    """Raised with a message that names the path or field, the value found, and what to do instead."""
