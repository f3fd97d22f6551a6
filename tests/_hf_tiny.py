"""A tiny Hugging Face causal LM made locally (no hub): a byte-level BPE trained with `tokenizers` on a few lines,
wrapped in PreTrainedTokenizerFast, and a 1-layer GPT-2 with random weights, saved with save_pretrained."""

from __future__ import annotations

from pathlib import Path

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Instruction: Name three primary colours.\nResponse: Red, yellow and blue.",
    "1. Boil the water.\n2. Add the tea.\n3. Wait three minutes.",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "A good answer is clear, specific and short.",
] * 8
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(chat_template: str | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(TEXTS, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                  additional_special_tokens=SPECIAL[1:])
    if chat_template:
        tok.chat_template = chat_template
    return tok


def build_model(vocab_size: int, *, seed: int = 0, chat_token_id: int | None = None):
    """A random 1-layer GPT-2. chat_token_id: rig it so that its greedy continuation of anything is that token
    (the final norm outputs a constant vector, and that token's tied embedding points along it), the behaviour of
    a model tuned on a chat template."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=vocab_size, n_positions=256, bos_token_id=0,
                        eos_token_id=0, pad_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    if chat_token_id is not None:
        with torch.no_grad():
            direction = torch.randn(config.n_embd)
            model.transformer.ln_f.weight.zero_()
            model.transformer.ln_f.bias.copy_(direction)
            model.transformer.wte.weight[chat_token_id] = 10 * direction
    return model


def save_tiny(directory: Path, *, chat_template: str | None = None, chat_token: str | None = None) -> Path:
    tok = build_tokenizer(chat_template)
    chat_id = tok.convert_tokens_to_ids(chat_token) if chat_token else None
    model = build_model(len(tok), chat_token_id=chat_id)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory
