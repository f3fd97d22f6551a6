"""The recurrences as functions (plain PyTorch): RWKV-6 WKV, Mamba-2 SSD, the causal depthwise conv.

Each op has a readable step-loop reference, a fast chunked pure-torch path and a lazily imported CUDA kernel;
`resolve_impl` picks one. Equations, stability arguments and the kernel mapping: README.md in this folder.
"""

from groundthink.ops.conv import CONV_IMPLS, causal_conv1d
from groundthink.ops.dispatch import model_impls, op_impl, resolve_impl
from groundthink.ops.ssd import SSD_IMPLS, ssd, ssd_chunked, ssd_reference
from groundthink.ops.wkv6 import WKV6_IMPLS, wkv6, wkv6_chunked, wkv6_reference

__all__ = [
    "CONV_IMPLS",
    "SSD_IMPLS",
    "WKV6_IMPLS",
    "causal_conv1d",
    "model_impls",
    "op_impl",
    "resolve_impl",
    "ssd",
    "ssd_chunked",
    "ssd_reference",
    "wkv6",
    "wkv6_chunked",
    "wkv6_reference",
]
