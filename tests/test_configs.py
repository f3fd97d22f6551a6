"""Every config in conf/ and sweeps/ composes and instantiates a model; the schema refuses wrong types and unknown
keys; every setting a config can hold is read by the code that runs; every registered mixer has its YAML."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

from groundthink import schema
from groundthink.hydra_support import Job, register_resolvers
from groundthink.mixers import MIXERS
from groundthink.models import HybridLM, ModelConfig
from groundthink.models.presets import PRESETS, count_params, preset
from tests.conftest import REPO, run_cli

CONF = REPO / "conf"
SWEEPS = REPO / "sweeps"
# Options that need a value the user must give (marked ??? in their schema).
REQUIRED = {"data=file": ["data.path=x.txt"], "data=hub": ["data.hub_name=some/dataset"],
            "data=chat": ["data.path=x.jsonl"], "stage=sft": ["data.path=x.jsonl"],
            "experiment=sft_control_vs_treatment": ["data.path=x.jsonl"]}
# The groups of groundthink-train's root config (other entry points have their own primary configs in conf/).
GROUPS = ["model", "mixer", "tokenizer", "data", "optim", "trainer", "logger", "callbacks", "diagnostics", "paths",
          "stage", "experiment", "gate", "debug"]


def options(group: str) -> list[str]:
    files = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    return sorted(set(files) | set(PRESETS)) if group == "model" else files


def compose_with(overrides: list[str], config_name: str = "config"):
    register_resolvers()
    schema.register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


ALL_OPTIONS = [(g, o) for g in GROUPS for o in options(g)]


@pytest.mark.parametrize("group,option", ALL_OPTIONS, ids=[f"{g}={o}" for g, o in ALL_OPTIONS])
def test_every_option_composes_and_resolves(group, option):
    choice = f"{group}={option}"
    cfg = compose_with([choice, *REQUIRED.get(choice, [])])
    cfg_plain = OmegaConf.to_container(cfg, resolve=False)
    del cfg_plain["hydra"]
    resolved = OmegaConf.create(cfg_plain)
    OmegaConf.resolve(resolved)
    assert not OmegaConf.missing_keys(resolved), OmegaConf.missing_keys(resolved)
    with torch.device("meta"):
        model = HybridLM(ModelConfig.from_dict(OmegaConf.to_container(resolved.model, resolve=True)))
    assert model.num_params() > 0


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_model_presets_compose_to_the_python_presets(name):
    cfg = compose_with([f"model={name}"])
    assert ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True)) == preset(name)


def _refusal(overrides: list[str]) -> str:
    """The message of the composition error, with every exception it was raised from (as Hydra prints them)."""
    with pytest.raises(Exception) as info:
        compose_with(overrides)
    chain, exc = [], info.value
    while exc is not None:
        chain.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(chain)


def test_the_schema_refuses_wrong_types_and_unknown_keys_while_composing():
    message = _refusal(["trainer.max_steps=abc"])
    assert "'abc'" in message and "Integer" in message and "trainer.max_steps" in message, message
    assert "alpah" in _refusal(["model.alpah=0.5"])
    message = _refusal(["model.mixers.rwkv6.n_head=8"])
    assert "n_head" in message and "RWKV6Config" in message, message
    cfg = compose_with(["model.mixers.rwkv6.n_heads=8", "model.d_model=128"])
    assert ModelConfig.from_dict(OmegaConf.to_container(cfg.model)).mixers["rwkv6"].n_heads == 8


def test_every_registered_mixer_has_its_yaml_and_letter():
    assert sorted(p.stem for p in (CONF / "mixer").glob("*.yaml")) == sorted(MIXERS)
    for name, mixer in MIXERS.items():
        cfg = compose_with([f"mixer={name}"])
        assert cfg.model.pattern == mixer.letter


def test_param_matched_mix_cells_are_within_5_percent_of_the_base():
    """The generated mix cells (sweeps/param_matched.py) change the RWKV : Mamba : attention mix at a fixed budget."""
    cells = sorted(p.stem for p in (CONF / "model").glob("mix_*.yaml"))
    assert len(cells) >= 6, cells
    base = count_params(preset("8m"))
    patterns = set()
    for name in cells:
        cfg = ModelConfig.from_dict(OmegaConf.to_container(compose_with([f"model={name}"]).model, resolve=True))
        n = count_params(cfg)
        assert abs(n / base - 1) <= 0.05, f"{name}: {n:,} parameters vs 8m's {base:,} ({100 * (n / base - 1):+.2f}%)"
        patterns.add((cfg.pattern, tuple(cfg.attn_layers or ())))
    assert len(patterns) == len(cells), "two mix cells describe the same architecture"


@pytest.mark.parametrize("sweep", sorted(p.stem for p in SWEEPS.glob("*.yaml")))
def test_every_sweep_composes_through_the_cli(sweep, tmp_path):
    proc = run_cli(tmp_path, "groundthink.train", "-cn", sweep, "--cfg", "all", timeout=120)
    cfg = OmegaConf.create(proc.stdout)
    params = cfg.hydra.sweeper.params
    assert params, f"sweeps/{sweep}.yaml sweeps nothing"
    if "optuna" not in str(cfg.hydra.sweeper.get("_target_", "")):
        # grids sweep seeds as an axis; an Optuna study searches hyper-parameters at one seed instead
        assert "seed" in params, f"sweeps/{sweep}.yaml must sweep seeds"
    for key in params:
        if key != "seed" and not key.startswith("+") and key not in cfg.hydra.runtime.choices:  # a key, or a group
            assert OmegaConf.select(cfg, key, default="__missing__") != "__missing__", f"{key} is not a config key"


# ----- every key is read ----------------------------------------------------------------------------------------
def _settings_classes() -> list[type]:
    from groundthink.data.sources import DATA_SOURCES, TokenizerSettings
    from groundthink.training import diagnostics, settings

    classes = [ModelConfig, TokenizerSettings, *(m.Config for m in MIXERS.values()),
               *(s.Settings for s in DATA_SOURCES.values())]
    classes += [c for c in vars(settings).values() if dataclasses.is_dataclass(c) and c.__module__ == settings.__name__]
    classes += [c for c in vars(diagnostics).values() if dataclasses.is_dataclass(c)
                and c.__module__ == diagnostics.__name__]
    return list(dict.fromkeys(classes))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::groundthink.training.diagnostics.DiagnosticWarning")
def test_every_config_key_is_read(tmp_path, monkeypatch):
    """Train for two steps in process from the composed default config (with attention and GLA layers, so every mixer's
    settings are used) and record every field of every settings dataclass that code reads, leaving out reads by
    the dataclass machinery itself (asdict, eq, repr) and by OmegaConf. A key nobody reads fails the test."""
    from groundthink import train

    read: set[tuple[str, str]] = set()
    ignored_files = ("dataclasses.py", "omegaconf", "<string>")

    def recording(cls):
        names = {f.name for f in dataclasses.fields(cls)}
        original = cls.__getattribute__

        def __getattribute__(self, name):
            if name in names and not sys._getframe(1).f_code.co_filename.endswith(ignored_files) \
                    and "omegaconf" not in sys._getframe(1).f_code.co_filename:
                read.add((cls.__name__, name))
            return original(self, name)

        return __getattribute__

    classes = _settings_classes()
    for cls in classes:
        monkeypatch.setattr(cls, "__getattribute__", recording(cls))
    cfg = compose_with(["debug=fast", "model.pattern=HAG", "model.n_layers=3", "trainer.max_steps=2",
                        "trainer.num_threads=1", "callbacks.progress_bar=false", "logger.wandb.mode=offline",
                        "diagnostics=full",
                        "diagnostics.grad_norms.every_n_steps=1", "diagnostics.state.every_n_steps=1",
                        "diagnostics.entropy.every_n_steps=1"])
    hydra_cfg = cfg.hydra
    with open_dict(cfg):
        del cfg["hydra"]
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    train.train(cfg, Job(run_dir=run_dir, multirun=False, overrides=[], group="test", started=0.0))
    missing = sorted(f"{cls.__name__}.{f.name}" for cls in classes for f in dataclasses.fields(cls)
                     if (cls.__name__, f.name) not in read and not _unused_by_design(cls, f.name))
    assert not missing, f"config keys that no code reads: {missing}"
    # The top-level keys are read by the entry point; paths.output_root by Hydra's run-folder pattern.
    assert "paths.output_root" in str(OmegaConf.to_container(hydra_cfg.run, resolve=False))


def _unused_by_design(cls: type, field: str) -> bool:
    """Keys this one run cannot read: the other data sources' settings (each read by its source, as
    tests/test_data.py's source tests exercise), and paths.output_root (read by Hydra's run-folder pattern)."""
    from groundthink.data.sources import DATA_SOURCES, TextDataSettings
    from groundthink.training.settings import PathSettings

    other_sources = {s.Settings for s in DATA_SOURCES.values()} - {TextDataSettings}
    if cls is PathSettings:
        return True
    return cls in other_sources
