"""`UserError` and `NothingToTrain`, here rather than in groundthink/training/run.py (which re-exports them) so
that the entry point's command-line and config checks can raise and catch them without importing the training
stack (torch, Lightning)."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: printed as a one-paragraph message, without a traceback."""


class NothingToTrain(Exception):
    """`resume=` of a run that already reached its step budget: the message says so and how to train it longer;
    the command exits 0 and leaves the run's files as they were (no summary, W&B run or checkpoint rewritten)."""
