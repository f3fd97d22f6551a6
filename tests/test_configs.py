"""Every config in conf/ and sweeps/ composes, and every model config instantiates a model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from groundthink.models import HybridLM, ModelConfig
from groundthink.models.presets import PRESETS, count_params
from groundthink.train import register_resolvers

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
SWEEPS = REPO / "sweeps"
# Options that need a value the user must give (marked ??? in the yaml).
REQUIRED = {"data=file": ["data.path=x.txt"], "data=hub": ["data.hub_name=some/dataset"]}
# Groups of the other entry points' primary configs (conf/datagen.yaml: backend, pipeline, prompts) are composed by
# those apps' own tests (tests/test_datagen_units.py).
OTHER_APPS = ("backend", "pipeline", "prompts")
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "local", *OTHER_APPS))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_with(overrides: list[str], config_name: str = "config"):
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    GlobalHydra.instance().clear()
    return cfg


ALL_OPTIONS = [(g, o) for g in GROUPS for o in options(g) if not (g == "model" and o == "base")]


@pytest.mark.parametrize("group,option", ALL_OPTIONS, ids=[f"{g}={o}" for g, o in ALL_OPTIONS])
def test_every_option_composes_and_resolves(group, option):
    choice = f"{group}={option}"
    cfg = compose_with([choice, *REQUIRED.get(choice, [])])
    cfg_plain = OmegaConf.to_container(cfg, resolve=False)
    del cfg_plain["hydra"]
    resolved = OmegaConf.create(cfg_plain)
    OmegaConf.resolve(resolved)
    assert not OmegaConf.missing_keys(resolved), OmegaConf.missing_keys(resolved)
    fields = OmegaConf.to_container(resolved.model, resolve=True)
    with torch.device("meta"):
        model = HybridLM(ModelConfig(**fields))
    assert model.num_params() > 0


MIX_CELLS = sorted(p.stem for p in (CONF / "model").glob("mix_*.yaml"))


@pytest.mark.parametrize(
    "name", sorted(p.stem for p in (CONF / "model").glob("*.yaml") if p.stem != "base" and p.stem not in MIX_CELLS)
)
def test_model_yaml_matches_python_preset(name):
    cfg = compose_with([f"model={name}"])
    fields = OmegaConf.to_container(cfg.model, resolve=True)
    assert name in PRESETS, f"conf/model/{name}.yaml has no preset in groundthink.models.presets.PRESETS"
    assert ModelConfig(**fields) == ModelConfig(**PRESETS[name])


def test_param_matched_mix_cells_are_within_5_percent_of_the_base():
    """The generated mix cells (sweeps/param_matched.py) change the RWKV : Mamba : attention mix at a fixed budget."""
    assert len(MIX_CELLS) >= 6, MIX_CELLS
    base = count_params(ModelConfig(**PRESETS["8m"]))
    patterns = set()
    for name in MIX_CELLS:
        cfg = ModelConfig(**OmegaConf.to_container(compose_with([f"model={name}"]).model, resolve=True))
        n = count_params(cfg)
        assert abs(n / base - 1) <= 0.05, f"{name}: {n:,} parameters vs 8m's {base:,} ({100 * (n / base - 1):+.2f}%)"
        patterns.add((cfg.pattern, tuple(cfg.attn_layers or ())))
    assert len(patterns) == len(MIX_CELLS), "two mix cells describe the same architecture"


@pytest.mark.parametrize("sweep", sorted(p.stem for p in SWEEPS.glob("*.yaml")))
def test_every_sweep_composes_through_the_cli(sweep):
    proc = subprocess.run(
        [sys.executable, "-m", "groundthink.train", "-cn", sweep, "--cfg", "all"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = OmegaConf.create(proc.stdout)
    params = cfg.hydra.sweeper.params
    assert params, f"sweeps/{sweep}.yaml sweeps nothing"
    if "optuna" not in str(cfg.hydra.sweeper.get("_target_", "")):
        # grids sweep seeds as an axis; an Optuna study searches hyper-parameters at one seed instead
        assert "seed" in params, f"sweeps/{sweep}.yaml must sweep seeds"
    for key in params:
        if key != "seed" and not key.startswith("+"):
            assert OmegaConf.select(cfg, key, default="__missing__") != "__missing__", f"{key} is not a config key"
