"""Data layer: the canonical tokenizer, document sources, stateful TBPTT batching, synthetic tasks."""

from groundthink.data.corpus import load_documents, load_mixture, render_chat, split_documents
from groundthink.data.errors import DataError
from groundthink.data.stream import TBPTTStream, TokenizedDocuments, encode_documents
from groundthink.data.synthetic import PasskeyTokens, mqar, passkey
from groundthink.data.tokenizer import CONTROL_TOKENS, Tokenizer, build_tokenizer, check_control_tokens

__all__ = [
    "CONTROL_TOKENS",
    "DataError",
    "PasskeyTokens",
    "TBPTTStream",
    "TokenizedDocuments",
    "Tokenizer",
    "build_tokenizer",
    "check_control_tokens",
    "encode_documents",
    "load_documents",
    "load_mixture",
    "mqar",
    "passkey",
    "render_chat",
    "split_documents",
]
