"""The language model: ModelConfig, the generic Block, HybridLM and its carried LMState (presets:
groundthink.models.presets)."""

from groundthink.models.block import Block
from groundthink.models.config import ModelConfig
from groundthink.models.lm import HybridLM
from groundthink.models.state import LMState

__all__ = ["Block", "HybridLM", "LMState", "ModelConfig"]
