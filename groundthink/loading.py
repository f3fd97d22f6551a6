"""`groundthink.load`: a trained run (or one checkpoint file) back as a model, its tokenizer and its config.

    run = groundthink.load("outputs/default/2026-11-24_07-00-00_1a2b3c4d")   # newest checkpoint that verifies
    run = groundthink.load(".../checkpoints/step_0000200.safetensors", device="cuda", dtype=torch.bfloat16)
    logits, state = run.model(ids, run.model.init_state(1))

Every later stage starts here (evaluation, generation, serving, data generation with a trained model, fine-tuning
from `init_from=`). The checkpoint is verified against its JSON sidecar (size, sha256, meta hash) before anything
is built, the model is built from the config recorded in that sidecar (what the weights were trained with), and
the weights must match the model exactly (no missing or unexpected keys). A stage=ste run is rebuilt with its
ternary layers (groundthink/quant), so its latent weights load into the quantised model that was trained; its packed
export (export/ternary.safetensors) loads as the packed ternary model. The tokenizer comes from the run folder's
`tokenizer/` (or the one beside the file); a char tokenizer, which is fixed, is rebuilt when a lone checkpoint file
has none beside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_SUFFIX = ".safetensors"
_WEIGHT_PREFIXES = ("state_dict.model.", "model.")


class LoadError(ValueError):
    """A path that cannot be loaded as a GroundThink model; the message names the path, the problem and what to do."""


@dataclass
class LoadedRun:
    """What `load` returns. `config` is the run's resolved config as a plain dict (the sidecar's copy)."""

    model: Any  # HybridLM, in eval mode
    tokenizer: Any  # groundthink.data.Tokenizer, or None for runs trained on token-level synthetic data
    config: dict[str, Any]
    model_config: Any  # ModelConfig
    checkpoint: Path
    run_dir: Path | None
    step: int | None
    checkpoint_sha256: str
    meta: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def run_id(self) -> str | None:
        return self.meta.get("run_id")

    @property
    def wandb_run_id(self) -> str | None:
        return self.meta.get("wandb_run_id")


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """(checkpoint file, run folder or None) for a run folder, a checkpoints/ folder or a checkpoint file."""
    from groundthink.training.checkpoint import find_last_good_checkpoint, list_checkpoints

    path = Path(path)
    if not path.exists():
        raise LoadError(f"{path} does not exist; pass a run folder (outputs/<name>/<date>_<time>_<id>) or a "
                        f"checkpoint file (<run>/checkpoints/last.safetensors)")
    if path.is_dir():
        run_dir = path.parent if path.name == "checkpoints" else path
        if not list_checkpoints(run_dir):
            what = "a run folder" if (run_dir / "config.yaml").is_file() else "not a GroundThink run folder"
            raise LoadError(f"{path} is {what} with no checkpoints (expected checkpoints/last.safetensors and its "
                            f".json sidecar); a run writes them every callbacks.checkpoint.every_n_steps and at its "
                            f"end")
        checkpoint = find_last_good_checkpoint(run_dir)
        if checkpoint is None:
            raise LoadError(f"{run_dir}: no checkpoint in {run_dir / 'checkpoints'} verifies against its sidecar "
                            f"(all are truncated, tampered or half-written); nothing can be loaded from this run")
        return checkpoint, run_dir
    if path.suffix == ".json":
        path = path.with_suffix(CHECKPOINT_SUFFIX)
    if path.suffix != CHECKPOINT_SUFFIX:
        raise LoadError(f"{path} is not a GroundThink checkpoint (a .safetensors file with a .json sidecar)")
    parent = path.parent.parent if path.parent.name == "checkpoints" else None
    run_dir = parent if parent is not None and (parent / "config.yaml").is_file() else None
    return path, run_dir


def _weights(tensors: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    for prefix in _WEIGHT_PREFIXES:
        found = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if found:
            return found
    raise LoadError(f"{where} holds no model weights (no tensor key starts with {' or '.join(_WEIGHT_PREFIXES)})")


def _tokenizer(run_dir: Path | None, checkpoint: Path, config: dict[str, Any]):
    from groundthink.data.errors import DataError
    from groundthink.data.tokenizer import Tokenizer, build_tokenizer

    candidates = [d / "tokenizer" for d in (run_dir, checkpoint.parent, checkpoint.parent.parent) if d is not None]
    for directory in candidates:
        if directory.is_dir():
            try:
                return Tokenizer.load(directory)
            except DataError as exc:
                raise LoadError(f"the tokenizer of {checkpoint} cannot be read: {exc}") from exc
    from groundthink.data.recall import TOKEN_LEVEL_SOURCES

    if (config.get("data") or {}).get("source") in TOKEN_LEVEL_SOURCES:
        return None  # token-level recall tasks (data=mqar, data=passkey) have no tokenizer
    kind = (config.get("tokenizer") or {}).get("kind")
    if kind == "char":
        return build_tokenizer("char")
    if kind is None:
        return None
    raise LoadError(f"{checkpoint}: its run used a '{kind}' tokenizer, but no tokenizer/ folder was found next to it "
                    f"(looked in {', '.join(str(c) for c in candidates)}); copy the run's tokenizer/ folder along "
                    f"with the checkpoint")


def load(path: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> LoadedRun:
    """Load a trained model, its tokenizer and its resolved config from a run folder or a checkpoint file.

    device: where the model runs (default CPU); dtype: e.g. torch.bfloat16 to cast the weights (default: as
    saved, fp32). Raises LoadError for a path that is not a run or checkpoint, a checkpoint that does not verify
    (tampered, truncated), a config that does not build a model, or weights that do not fit that model.
    """
    from groundthink.models import HybridLM, ModelConfig
    from groundthink.training.checkpoint import CheckpointError, load_checkpoint

    checkpoint, run_dir = resolve_checkpoint(path)
    try:
        tensors, meta = load_checkpoint(checkpoint)
    except CheckpointError as exc:
        raise LoadError(str(exc)) from None
    config = meta.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        config = _run_config(run_dir, checkpoint)
    device = torch.device(device) if device is not None else torch.device("cpu")
    try:
        model_config = ModelConfig.from_dict(config["model"])
    except (TypeError, ValueError) as exc:
        raise LoadError(f"{checkpoint}: the model config recorded with it does not build a model ({exc}); it was "
                        f"written by an incompatible GroundThink version or edited by hand") from None
    if meta.get("packed_format"):  # a stage=ste packed export (groundthink/quant): its ternary model
        from groundthink.quant.stage import packed_model

        model = packed_model(tensors, meta, checkpoint, device=device)
    else:
        with torch.device("meta"):
            model = HybridLM(model_config, device=device)
        weights = _weights(tensors, checkpoint)
        try:
            model.load_state_dict(weights, strict=True, assign=True)
        except RuntimeError as exc:
            raise LoadError(f"{checkpoint}: its weights do not fit the model its config describes ({exc})") from None
        _quantise_if_ste(model, config, checkpoint)
    model.to(device=device)
    if dtype is not None:
        model.to(dtype=dtype)
    model.eval()
    sha = (json.loads(checkpoint.with_suffix(".json").read_text()).get("integrity") or {}).get("sha256", "")
    return LoadedRun(
        model=model,
        tokenizer=_tokenizer(run_dir, checkpoint, config),
        config=config,
        model_config=model_config,
        checkpoint=checkpoint,
        run_dir=run_dir,
        step=meta.get("step"),
        checkpoint_sha256=sha,
        meta=meta,
    )


def _quantise_if_ste(model: Any, config: dict[str, Any], checkpoint: Path) -> None:
    """A stage=ste run's checkpoint holds the latent full-precision weights: rebuild its ternary layers, so what is
    loaded (and evaluated) is the ternary model it trained."""
    from groundthink.quant.stage import quantise_model, settings_from_config

    ste = settings_from_config(config)
    if ste is not None:
        try:
            quantise_model(model, ste)
        except (TypeError, ValueError) as exc:
            raise LoadError(f"{checkpoint}: its ste settings do not rebuild the ternary model ({exc})") from None


def _run_config(run_dir: Path | None, checkpoint: Path) -> dict[str, Any]:
    import yaml

    if run_dir is not None and (run_dir / "config.yaml").is_file():
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        if isinstance(config, dict) and isinstance(config.get("model"), dict):
            return config
    raise LoadError(f"{checkpoint}: no model config is recorded in its sidecar or in a config.yaml beside it, so "
                    f"the model cannot be rebuilt")
