"""The one comparison helper for all parity tests."""

from __future__ import annotations

import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max(max|expected|, 1e-30), computed in fp64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if actual.shape != expected.shape:
        raise ValueError(f"shapes differ: actual {tuple(actual.shape)} vs expected {tuple(expected.shape)}")
    if actual.numel() == 0:
        return 0.0
    scale = max(expected.abs().max().item(), 1e-30)
    return (actual - expected).abs().max().item() / scale
