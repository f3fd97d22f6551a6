"""Evaluation in plain PyTorch: held-out perplexity / bits per byte (carried vs reset state) and the state and
output measurements that the training diagnostics and the gates share."""

from groundthink.evaluation.lm_eval import evaluate_texts, evaluate_token_docs
from groundthink.evaluation.state_metrics import (
    DecaySaturation,
    has_recurrent_layer,
    lane_norm,
    predictive_entropy,
    recurrent_states,
    singular_values,
    spectral_entropy,
    state_cosine,
    top_k_energy,
)

__all__ = [
    "DecaySaturation",
    "evaluate_texts",
    "evaluate_token_docs",
    "has_recurrent_layer",
    "state_cosine",
    "lane_norm",
    "predictive_entropy",
    "recurrent_states",
    "singular_values",
    "spectral_entropy",
    "top_k_energy",
]
