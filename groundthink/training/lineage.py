"""`init_from=<run folder or checkpoint>`: a run that starts from another run's weights (stage=sft, stage=rl).

The parent is loaded with `groundthink.load` (its checkpoint verified against its sidecar). Strict: the child's
tokenizer group must describe the parent's tokenizer (which is copied into the child's tokenizer/ folder and used
for its data), and the child's model must have exactly the parent's parameter names and shapes. Every mismatch is
a UserError raised before the first step (so a single run leaves no folder behind), in one line naming both sides.
The child records its parent (`parent_record`) in summary.json and in every checkpoint sidecar; groundthink-compare
shows it as the `parent` column.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from groundthink.training.run import UserError

STAGES_WITH_A_PARENT = ("sft", "ste", "rl")  # stages that start from a trained run (conf/stage/<name>.yaml)


def required(cfg: Any) -> str | None:
    """cfg.init_from, or a clear error when the stage (stage=sft) requires it and it was not given."""
    stage = cfg.get("stage") or "pretrain"
    if stage in STAGES_WITH_A_PARENT and not cfg.get("init_from"):
        raise UserError(f"stage={stage} starts from a trained run: give init_from=<run folder or checkpoint> "
                        f"(e.g. stage={stage} init_from=outputs/tiny/2026-11-24_07-00-00_1a2b3c4d)")
    value = cfg.get("init_from")
    return str(value) if value else None


def load_parent(init_from: str, tokenizer_settings: Any, tokenizer_dir: Path, *, resume: bool) -> Any:
    """The parent run (groundthink.LoadedRun); its tokenizer is saved as the child's unless resuming."""
    from groundthink.data.sources import tokenizer_settings_match
    from groundthink.loading import LoadError, load

    try:
        parent = load(init_from)
    except LoadError as exc:
        raise UserError(f"init_from={init_from}: {exc}") from None
    tok = parent.tokenizer
    if tok is None:
        raise UserError(f"init_from={init_from}: the parent run has no tokenizer (it trained on token-level "
                        "synthetic data); fine-tuning on text needs a parent trained with a tokenizer")
    if not tokenizer_settings_match(tokenizer_settings, tok):
        raise UserError(f"init_from={init_from}: vocabulary mismatch: parent tokenizer {tok.kind} with "
                        f"{tok.vocab_size} ids, this run asks for tokenizer.kind={tokenizer_settings.kind} "
                        f"vocab_size={tokenizer_settings.vocab_size}; "
                        f"the tokenizer comes from the parent (use tokenizer={tok.kind}, or no tokenizer override)")
    if not resume:  # as the text sources do (every rank writes the same files)
        tok.save(tokenizer_dir)
    return parent


def init_weights(model: Any, parent: Any, init_from: str) -> dict[str, Any]:
    """Copy the parent's weights into `model`; names and shapes must match exactly (else a one-line UserError).
    Returns the parent's record (`parent_record`)."""
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in parent.model.state_dict().items()}
    if mine != theirs:
        a, b = dataclasses.asdict(parent.model_config), dataclasses.asdict(model.cfg)
        fields = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
        key = next((k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)), None)
        detail = ", ".join(f"{k}: parent {p!r} vs this run {c!r}" for k, (p, c) in fields.items())
        raise UserError(f"init_from={init_from}: model shape mismatch: parent {parent.model_config.pattern!r} "
                        f"({sum(1 for _ in theirs)} tensors) vs this run {model.cfg.pattern!r}: {detail or 'config'}; "
                        f"first tensor {key}: parent {theirs.get(key)} vs this run {mine.get(key)}. Use the parent's "
                        f"model settings")
    model.load_state_dict(parent.model.state_dict(), strict=True)
    return parent_record(parent, init_from)


def parent_record(parent: Any, init_from: str) -> dict[str, Any]:
    """What the child records about its parent (summary.json `parent`, checkpoint sidecars)."""
    run_dir = str(Path(parent.run_dir).resolve()) if parent.run_dir is not None else None
    return {"init_from": str(init_from), "run_id": parent.run_id, "run_dir": run_dir,
            "checkpoint": str(Path(parent.checkpoint).resolve()), "checkpoint_sha256": parent.checkpoint_sha256,
            "step": parent.step}
