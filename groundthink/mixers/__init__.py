"""Sequence mixers and channel mixers (FFNs) around groundthink.ops, one file each.

Contract (every entry of MIXERS and FFNS): `forward(x [B,T,D], state=None, *, position=0) -> (y [B,T,D],
new_state: dict[str, Tensor])`, `init_state(batch_size, device)`, `state_size()` (floats per batch lane), and
`from_config(cfg, layer_id, device=None)` which reads a ModelConfig by field name. `position` is the absolute
stream position of x[:, 0] (LMState.position); StateNorm uses it. Register a new mixer here and the contract
tests in tests/test_mixers.py pick it up.
"""

from groundthink.mixers.attention import SlidingWindowAttention
from groundthink.mixers.channel_mix import RWKVChannelMix, SwiGLU
from groundthink.mixers.mamba2 import Mamba2
from groundthink.mixers.rwkv6 import RWKV6TimeMix

MIXERS: dict[str, type] = {
    "rwkv6": RWKV6TimeMix,
    "mamba2": Mamba2,
    "attention": SlidingWindowAttention,
}

FFNS: dict[str, type] = {
    "rwkv_cmix": RWKVChannelMix,
    "swiglu": SwiGLU,
}

__all__ = ["FFNS", "MIXERS", "Mamba2", "RWKV6TimeMix", "RWKVChannelMix", "SlidingWindowAttention", "SwiGLU"]
