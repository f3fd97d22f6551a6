"""GroundThink: configuration-driven experiments with small hybrid RWKV-6 / Mamba-2 language models."""

__version__ = "0.1.0"
