"""Quantisation: BitNet b1.58-style ternary weights trained with the straight-through estimator (stage=ste), their
2-bit packed export and its loader. See groundthink/quant/ternary.py (layers, quantisers, packing) and
groundthink/quant/stage.py (the stage: layer selection, PTQ report, export, load_packed)."""

from groundthink.quant.stage import SteSettings, export_packed, load_packed, quantise_model
from groundthink.quant.ternary import (
    PackedTernaryLinear,
    TernaryLinear,
    pack_ternary,
    quantise_activations,
    ternarise,
    ternary_codes,
    unpack_ternary,
)

__all__ = ["SteSettings", "export_packed", "load_packed", "quantise_model", "PackedTernaryLinear", "TernaryLinear",
           "pack_ternary", "quantise_activations", "ternarise", "ternary_codes", "unpack_ternary"]
