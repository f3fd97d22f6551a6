"""Input validation shared by the ops: errors name the argument, the shape seen and the shape expected."""

from __future__ import annotations

import torch


def check_rank(name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor with layout {layout}, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have rank {rank} ({layout}), got shape {tuple(t.shape)}")


def check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...], layout: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {layout} = {tuple(expected)}, got {tuple(t.shape)}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The ops compute in fp32; fp64 inputs (used by the parity tests) stay fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32
