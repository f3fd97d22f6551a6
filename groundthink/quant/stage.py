"""stage=ste: quantisation-aware fine-tuning of a trained run to BitNet b1.58-style ternary weights, its loading
and its packed export.

    groundthink-train stage=ste init_from=<parent run> [ste.scale=channel ste.activation_bits=0 ste.layers=[ffn]]

- `quantise_model` swaps the selected nn.Linear layers of a HybridLM for TernaryLinear (same parameters, so a
  checkpoint holds the latent full-precision weights under their usual names). groundthink-train calls it after
  the parent's weights are copied in; `groundthink.load` calls it again for a run whose config says stage=ste, so
  evaluation, generation and a later init_from see the ternary model.
- `PtqReport`: at step 0 of a fresh run, the held-out loss of the parent in full precision (`ste/fp_val_loss`) and
  after naive post-training ternarisation with the same quantiser (`ste/ptq_val_loss`); the run's final `val/loss`
  is the STE number. `finish` prints the three and the recovery (ptq - ste) / (ptq - fp), and exports.
- `export_packed` writes `export/ternary.safetensors` (2 bits per weight, 4 per uint8, plus each layer's scale;
  every other tensor as trained) with a verified JSON sidecar; `load_packed` rebuilds the model from it, and its
  logits equal the fine-tuned model's (the ternary model in eval mode) exactly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from groundthink.quant.ternary import (
    SCALES,
    PackedTernaryLinear,
    TernaryLinear,
    pack_ternary,
    ternary_codes,
    unpack_ternary,
)

log = logging.getLogger("groundthink")
PACKED_FORMAT = "groundthink-ternary-packed"
EXPORT_DIR, EXPORT_NAME = "export", "ternary"
# Names for ste.layers besides each mixer's branch name (rwkv, mamba, attention, gla).
GROUP_NAMES = ("mixers", "ffn", "head", "all")


@dataclass
class SteSettings:
    """The `ste` group: which linear layers are ternary and how (read only by stage=ste)."""

    # Linear layers to ternarise: "mixers" (every sequence mixer's projections), a mixer's branch name (rwkv, mamba,
    # attention, gla), "ffn", "head", or "all" (= mixers + ffn + head). Embeddings are never quantised.
    layers: list[str] = field(default_factory=lambda: ["mixers", "ffn"])
    scale: str = "tensor"  # absmean scale per tensor | per output channel ("channel")
    activation_bits: int = 8  # absmax per-token activation quantisation of the quantised layers' inputs; 0 = off
    eval_ptq: bool = True  # log ste/fp_val_loss and ste/ptq_val_loss at step 0 of a fresh run
    export: bool = True  # write export/ternary.safetensors when the run completes


def check_settings(s: SteSettings) -> None:
    """A clear ValueError for a setting the stage cannot use (before any compute)."""
    from groundthink.models.lm import HybridLM

    valid = (*GROUP_NAMES, *HybridLM.mixer_components())
    unknown = [name for name in s.layers if name not in valid]
    if unknown:
        hint = " (embeddings are not linear layers and stay full precision)" if "embed" in unknown else ""
        raise ValueError(f"ste.layers: unknown layer selection {unknown}{hint}; use any of {list(valid)}, e.g. "
                         f"ste.layers=[mixers,ffn]")
    if not s.layers:
        raise ValueError("ste.layers is empty: name at least one layer group, e.g. ste.layers=[mixers,ffn]")
    if s.scale not in SCALES:
        raise ValueError(f"ste.scale={s.scale!r}: use one of {list(SCALES)}")
    if s.activation_bits != 0 and not 2 <= s.activation_bits <= 16:
        raise ValueError(f"ste.activation_bits={s.activation_bits}: use 0 (off) or 2..16 (BitNet uses 8)")


def settings_from_config(config: dict[str, Any]) -> SteSettings | None:
    """The SteSettings of a run's resolved config, or None when it is not an STE run."""
    if (config.get("stage") or "pretrain") != "ste":
        return None
    known = set(SteSettings.__dataclass_fields__)
    return SteSettings(**{k: v for k, v in (config.get("ste") or {}).items() if k in known})


def selected(name: str, model: Any, layers: list[str]) -> bool:
    """Whether the linear layer `name` of `model` (a HybridLM) is in the selection `layers`."""
    if name == "head":
        return "head" in layers or "all" in layers
    component = model.component_of(name)
    if component == "ffn":
        return "ffn" in layers or "all" in layers
    if component in model.mixer_components():
        return component in layers or "mixers" in layers or "all" in layers
    return False


def quantise_model(model: nn.Module, s: SteSettings) -> list[str]:
    """Swap the selected nn.Linear layers of `model` for TernaryLinear in place; returns the names swapped (none
    when `model` is already quantised)."""
    check_settings(s)
    chosen = [name for name, m in model.named_modules() if type(m) is nn.Linear and selected(name, model, s.layers)]
    if not chosen and not ternary_layers(model):
        raise ValueError(f"ste.layers={list(s.layers)} selects no linear layer of this model (pattern "
                         f"{model.cfg.pattern!r}); choose layers the model has, e.g. ste.layers=[mixers,ffn]")
    for name in chosen:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, attr, TernaryLinear(getattr(owner, attr), scale=s.scale, activation_bits=s.activation_bits))
    return chosen


def ternary_layers(model: nn.Module) -> dict[str, TernaryLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, TernaryLinear)}


@contextlib.contextmanager
def full_precision(model: nn.Module) -> Iterator[None]:
    """Within the block the TernaryLinear layers of `model` compute with their latent full-precision weights."""
    layers = list(ternary_layers(model).values())
    for m in layers:
        m.quantise = False
    try:
        yield
    finally:
        for m in layers:
            m.quantise = True


def recovery(fp: float, ptq: float, ste: float) -> float | None:
    """(ptq - ste) / (ptq - fp): 1 = the full-precision loss is recovered, 0 = no better than ternarising."""
    return (ptq - ste) / (ptq - fp) if ptq != fp else None


# ----- training-time reporting ------------------------------------------------------------------------------------
def ptq_report(val_batches: list[dict[str, torch.Tensor]]) -> Any:
    """The callback that logs ste/fp_val_loss and ste/ptq_val_loss at step 0 (a Lightning Callback)."""
    import lightning as L

    from groundthink.training.callbacks import log_metrics

    class PtqReport(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            if trainer.global_step != 0 or not val_batches:  # a resumed run logged them already
                return
            with full_precision(pl_module.model):
                fp = pl_module.validate(val_batches)
            ptq = pl_module.validate(val_batches)
            pl_module.val_metrics = {}  # the sidecar's metrics are the training's, not these
            if not fp:
                return
            metrics = {"ste/fp_val_loss": fp["val/loss"], "ste/ptq_val_loss": ptq["val/loss"]}
            if "val/bpb" in fp:
                metrics.update({"ste/fp_val_bpb": fp["val/bpb"], "ste/ptq_val_bpb": ptq["val/bpb"]})
            log_metrics(trainer, metrics, 0)
            log.info(f"ste: held-out loss of the parent in full precision {fp['val/loss']:.4f}, after naive "
                     f"post-training ternarisation (PTQ) {ptq['val/loss']:.4f}")

    return PtqReport()


def finish(run_dir: Path, summary: dict[str, Any], s: SteSettings) -> list[str]:
    """After a completed STE run: the three losses and the recovery, and the packed export. Returns the lines."""
    final = summary.get("final", {})
    lines = []
    fp, ptq, ste_loss = final.get("ste/fp_val_loss"), final.get("ste/ptq_val_loss"), final.get("val/loss")
    if None not in (fp, ptq, ste_loss):
        r = recovery(fp, ptq, ste_loss)
        lines.append(f"ste      held-out loss: full precision {fp:.4f}, PTQ {ptq:.4f}, STE {ste_loss:.4f}"
                     + (f"   recovery {r:.3f}" if r is not None else ""))
    if s.export:
        report = export_packed(run_dir, Path(run_dir) / EXPORT_DIR)
        lines.append(f"export   {report['path']}: quantised layers {report['quantised_fp32_bytes']:,} B fp32 -> "
                     f"{report['quantised_packed_bytes']:,} B packed ({report['quantised_ratio']:.1f}x smaller); "
                     f"whole model {report['model_fp32_bytes']:,} B fp32 -> file {report['file_bytes']:,} B")
    return lines


# ----- packed export ----------------------------------------------------------------------------------------------
def export_packed(source: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Pack the ternary model of an STE run (a run folder or a checkpoint) into `<out_dir>/ternary.safetensors`
    (+ its JSON sidecar and the run's tokenizer/); returns the size report, also written to the sidecar."""
    from groundthink.loading import LoadError, load
    from groundthink.training.checkpoint import save_checkpoint

    run = load(source)
    if settings_from_config(run.config) is None:
        raise LoadError(f"{source}: not a stage=ste run (its config says stage={run.config.get('stage')!r}); only "
                        f"an STE run's ternary model can be packed")
    model = run.model
    quantised = ternary_layers(model)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    quantised_fp32 = quantised_packed = 0
    for name, m in quantised.items():
        codes, scale = ternary_codes(m.weight, m.scale)
        tensors[f"{name}.packed"] = pack_ternary(codes)
        tensors[f"{name}.scale"] = scale.float().contiguous()
        layers[name] = {"shape": list(m.weight.shape), "bias": m.bias is not None}
        quantised_fp32 += m.weight.numel() * 4
        quantised_packed += tensors[f"{name}.packed"].numel() + tensors[f"{name}.scale"].numel() * 4
    skip = {f"{name}.weight" for name in quantised}
    for key, value in model.state_dict().items():
        if key not in skip:
            tensors[key] = value.detach().contiguous()
    s = settings_from_config(run.config)
    model_fp32 = sum(t.numel() * 4 for t in model.state_dict().values())
    out_dir = Path(out_dir)
    source_record = {"checkpoint": str(run.checkpoint), "step": run.step, "run_id": run.run_id,
                     "checkpoint_sha256": run.checkpoint_sha256}
    meta = {"packed_format": PACKED_FORMAT, "packed_version": 1, "model": run.model_config.to_dict(),
            "config": run.config, "ste": asdict(s), "layers": layers, "source": source_record, "step": run.step,
            "run_id": run.run_id}
    report = {"quantised_layers": len(layers), "quantised_fp32_bytes": quantised_fp32,
              "quantised_packed_bytes": quantised_packed,
              "quantised_ratio": quantised_fp32 / max(1, quantised_packed), "model_fp32_bytes": model_fp32}
    path = save_checkpoint(out_dir, EXPORT_NAME, tensors, {**meta, "sizes": report})
    report.update(path=str(path), file_bytes=path.stat().st_size)
    (out_dir / "sizes.json").write_text(json.dumps(report, indent=1) + "\n")
    if run.run_dir is not None and (run.run_dir / "tokenizer").is_dir():
        shutil.copytree(run.run_dir / "tokenizer", out_dir / "tokenizer", dirs_exist_ok=True)
    return report


def load_packed(path: str | Path, *, device: str | torch.device | None = None) -> nn.Module:
    """The model of a packed export (`export/ternary.safetensors` or its folder), in eval mode: a HybridLM whose
    quantised layers are PackedTernaryLinear. Raises LoadError for a file that is not a verified packed export."""
    from groundthink.loading import LoadError
    from groundthink.training.checkpoint import CheckpointError, load_checkpoint

    path = Path(path)
    if path.is_dir():
        path = path / f"{EXPORT_NAME}.safetensors"
    if not path.exists():
        raise LoadError(f"{path} does not exist; pass a packed export (<STE run>/export/ternary.safetensors, "
                        f"written by stage=ste or groundthink.quant.export_packed)")
    try:
        tensors, meta = load_checkpoint(path)
    except CheckpointError as exc:
        raise LoadError(str(exc)) from None
    if meta.get("packed_format") != PACKED_FORMAT:
        raise LoadError(f"{path} is not a packed ternary export (no packed_format={PACKED_FORMAT!r} in its "
                        f"sidecar); load a training checkpoint with groundthink.load instead")
    return packed_model(tensors, meta, path, device=device)


def packed_model(tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: Path, *,
                 device: str | torch.device | None = None) -> nn.Module:
    """The eval-mode model of a verified packed export's tensors and sidecar meta (load_packed, groundthink.load)."""
    from groundthink.loading import LoadError
    from groundthink.models import HybridLM, ModelConfig

    tensors = dict(tensors)
    s = SteSettings(**meta["ste"])
    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.device("meta"):
        model = HybridLM(ModelConfig.from_dict(meta["model"]), device=device)
    state: dict[str, torch.Tensor] = {}
    for name, info in meta["layers"].items():
        out_f, in_f = info["shape"]
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        with torch.device("meta"):
            setattr(owner, attr, PackedTernaryLinear(out_f, in_f, scale=s.scale, activation_bits=s.activation_bits,
                                                     bias=info["bias"]))
        try:
            state[f"{name}.codes"] = unpack_ternary(tensors.pop(f"{name}.packed"), (out_f, in_f))
            state[f"{name}.scale"] = tensors.pop(f"{name}.scale")
        except (KeyError, ValueError) as exc:
            raise LoadError(f"{path}: layer {name}: {exc}") from None
    state.update(tensors)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise LoadError(f"{path}: its tensors do not fit the model its sidecar describes ({exc})") from None
    return model.to(device).eval()
