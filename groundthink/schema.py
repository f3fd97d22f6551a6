"""Hydra structured configs for `groundthink-train`, made from the settings dataclasses (the one place defaults are
written), and registered in Hydra's ConfigStore. Only the entry points import this module.

- `groundthink_train`: the root schema that conf/config.yaml starts from: every group's type and defaults, so a
  YAML file holds only what differs, an unknown key or a wrong type (`trainer.max_steps=abc`) is refused while the
  config is composed, naming the key, the value and the type, before any run folder exists.
- `model/<preset>`: the model presets of groundthink.models.presets (`model=small`, `model=8m`, ...).
- `schema/data/<source>`: each registered data source's settings; `conf/data/<source>.yaml` starts from it.
- `groundthink_eval` and `schema/eval/<task>`: groundthink-eval's root and each evaluation task's settings
  (`conf/eval/<task>.yaml` starts from it).

The model schema is generated from ModelConfig with one typed field per registered mixer under `mixers`, so
`model.mixers.rwkv6.n_heads=8` is checked like any other field and a new mixer needs no edit here.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, make_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore

from groundthink.data.sources import DATA_SOURCES, TokenizerSettings
from groundthink.mixers import MIXERS
from groundthink.models.config import ModelConfig
from groundthink.models.presets import PRESETS, preset
from groundthink.quant.stage import SteSettings
from groundthink.training.settings import (
    CallbackSettings,
    DiagnosticsSettings,
    FaultSettings,
    LoggerSettings,
    OptimSettings,
    PathSettings,
    TrainerSettings,
)


def _model_schema() -> type:
    mixers = make_dataclass(
        "MixerSettings", [(name, cls.Config, field(default_factory=cls.Config)) for name, cls in MIXERS.items()]
    )
    hints = typing.get_type_hints(ModelConfig)
    fields = []
    for f in dataclasses.fields(ModelConfig):
        if f.name == "mixers":
            fields.append(("mixers", mixers, field(default_factory=mixers)))
        elif f.default_factory is not dataclasses.MISSING:
            fields.append((f.name, hints[f.name], field(default_factory=f.default_factory)))
        else:
            fields.append((f.name, hints[f.name], field(default=f.default)))
    return make_dataclass("ModelSchema", fields)


ModelSchema = _model_schema()


@dataclass
class TrainConfig:
    """The root of groundthink-train's config (conf/config.yaml lists the group choices on top of it)."""

    model: ModelSchema = field(default_factory=ModelSchema)  # type: ignore[valid-type]
    tokenizer: TokenizerSettings = field(default_factory=TokenizerSettings)
    data: Any = None  # the chosen source's settings (schema/data/<source>)
    optim: OptimSettings = field(default_factory=OptimSettings)
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    logger: LoggerSettings = field(default_factory=LoggerSettings)
    callbacks: CallbackSettings = field(default_factory=CallbackSettings)
    diagnostics: DiagnosticsSettings = field(default_factory=DiagnosticsSettings)
    paths: PathSettings = field(default_factory=PathSettings)
    gate: Any = None  # a gate run's criteria (conf/gate/*.yaml), checked by groundthink.gates
    # A short name for what this run is about: it names the folder under outputs/ and the W&B group.
    name: str = "default"
    seed: int = 1234
    tags: list[str] = field(default_factory=list)
    # Continue a run from its last good checkpoint: `resume=outputs/default/2026-11-24_07-00-00_1a2b3c4d`.
    resume: str | None = None
    # Start from another run's weights (fine-tuning): `init_from=<run folder or checkpoint>`; model shape and
    # vocabulary must match the parent's, the tokenizer is the parent's (groundthink/training/lineage.py).
    init_from: str | None = None
    # The training stage (conf/stage/: pretrain | sft | ste | rl), set by the stage group; all but pretrain require
    # init_from.
    stage: str = "pretrain"
    rl: Any = None  # stage=rl's settings (schema/rl, groundthink/rl/settings.py), set by conf/stage/rl.yaml
    faults: FaultSettings = field(default_factory=FaultSettings)
    ste: SteSettings = field(default_factory=SteSettings)  # stage=ste: the ternary layers (groundthink/quant)
    # Site settings from the git-ignored conf/local/default.yaml (e.g. `slurm:` defaults that
    # conf/hydra/launcher/slurm.yaml reads); absent on most machines.
    local: Any = None


@dataclass
class EvalSelection:
    """The `eval` group of groundthink-eval: a task or a suite (conf/eval/<name>.yaml) as {task: its settings}."""

    name: str = ""
    tasks: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalWandb:
    mode: str = "auto"  # auto | online | offline | disabled (auto: as groundthink-train, offline without network)


@dataclass
class EvalConfig:
    """The root of groundthink-eval's config (conf/evaluate.yaml)."""

    # A run folder (its newest checkpoint that verifies) or one checkpoint file.
    run: str = "???"
    eval: EvalSelection = field(default_factory=EvalSelection)
    device: str = "cpu"
    dtype: str | None = None  # e.g. bfloat16 (default: as saved)
    threads: int | None = None  # torch threads (null = torch's default)
    progress: bool = True  # tqdm bars on standard error for the long loops
    wandb: EvalWandb = field(default_factory=EvalWandb)


def preset_node(name: str) -> Any:
    """A model preset as a ModelSchema instance (every field, nested mixer settings included)."""
    values = dataclasses.asdict(preset(name))
    mixers = values.pop("mixers")
    node = ModelSchema(**values)
    node.mixers = type(node.mixers)(**{k: MIXERS[k].Config(**v) for k, v in mixers.items()})
    return node


def register() -> None:
    """Put the schema, the model presets and the data-source schemas into Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="groundthink_train", node=TrainConfig)
    for name in PRESETS:
        cs.store(group="model", name=name, node=preset_node(name))
    for name, source in DATA_SOURCES.items():
        cs.store(group="schema/data", name=name, node=source.Settings)
    from groundthink.rl.settings import RLSettings

    cs.store(group="schema/rl", name="default", node=RLSettings)
    from groundthink.evaluation.tasks import TASKS

    cs.store(name="groundthink_eval", node=EvalConfig)
    for name, task in TASKS.items():
        cs.store(group="schema/eval", name=name, node=task.Settings)
