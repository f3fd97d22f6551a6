"""Sequence mixers and channel mixers (FFNs) around groundthink.ops, one file each.

Sequence mixers follow the contract of `groundthink.mixers.base` (forward with carried state, init_state,
state_size, build from their own settings dataclass, and the declarations the diagnostics and gates read) and are
registered in MIXERS when their module is imported: the imports of the mixer modules below are the registration.
FFNs (FFNS) share the forward/state contract and are built with `from_config(cfg, layer_id)`. The contract tests
in tests/test_mixers.py pick every registered entry up.
"""

from groundthink.mixers.attention import SlidingWindowAttention
from groundthink.mixers.base import MIXERS, LayerContext, SequenceMixer, mixer_for_branch, mixer_for_letter
from groundthink.mixers.channel_mix import RWKVChannelMix, SwiGLU
from groundthink.mixers.gla import GatedLinearAttention
from groundthink.mixers.mamba2 import Mamba2
from groundthink.mixers.rwkv6 import RWKV6TimeMix

FFNS: dict[str, type] = {
    "rwkv_cmix": RWKVChannelMix,
    "swiglu": SwiGLU,
}

__all__ = [
    "FFNS",
    "GatedLinearAttention",
    "MIXERS",
    "LayerContext",
    "Mamba2",
    "RWKV6TimeMix",
    "RWKVChannelMix",
    "SequenceMixer",
    "SlidingWindowAttention",
    "SwiGLU",
    "mixer_for_branch",
    "mixer_for_letter",
]
