"""`UserError`, here rather than in groundthink/training/run.py (which re-exports it) so that the entry point's
command-line and config checks can raise and catch it without importing the training stack (torch, Lightning)."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: printed as a one-paragraph message, without a traceback."""
