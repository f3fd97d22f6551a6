"""Friendlier command-line errors: name the unknown config key and the closest valid ones.

Hydra already refuses an unknown key; this runs only after such a failure, composes the config with the same
group choices, and prints which override keys do not exist together with the nearest valid keys.
"""

from __future__ import annotations

import difflib
import sys

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue


def _all_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for k in cfg.keys():
        full = f"{prefix}{k}"
        keys.append(full)
        node = cfg._get_node(k)
        if isinstance(node, DictConfig):
            keys.extend(_all_keys(node, f"{full}."))
    return keys


def unknown_override_keys(
    overrides: list[str], config_dir: str, config_name: str = "config"
) -> list[tuple[str, list[str]]]:
    """[(unknown key, closest valid keys)] for the key=value overrides that name no existing config key."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    try:
        # Only key=value overrides: options such as --config-dir PATH or -cn NAME are not overrides.
        parsed = parser.parse_overrides([o for o in overrides if "=" in o and not o.startswith("-")])
    except Exception:  # noqa: BLE001 - a syntax error is reported by Hydra itself
        return []
    group_choices, value_keys = [], []
    for o in parsed:
        key = o.key_or_group
        if o.is_add() or o.is_force_add() or o.is_delete() or key.startswith("hydra"):
            continue
        if "." in key:
            value_keys.append(key)
        else:
            first = o.value()
            if isinstance(first, list):
                first = first[0] if first else None
            elif not isinstance(first, (str, int, float, bool)) and first is not None:
                first = next(iter(o.sweep_iterator()), None) if o.is_sweep_override() else None
            group_choices.append(f"{key}={first}")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            try:
                cfg = compose(config_name=config_name, overrides=group_choices)
            except Exception:  # noqa: BLE001 - a group choice itself is wrong; Hydra said which
                cfg = compose(config_name=config_name)
    finally:
        GlobalHydra.instance().clear()
    valid = _all_keys(cfg)
    unknown = []
    for key in value_keys:
        if not _has_key(cfg, key):
            unknown.append((key, difflib.get_close_matches(key, valid, n=3, cutoff=0.6)))
    return unknown


_ABSENT = object()


def _has_key(cfg: DictConfig, key: str) -> bool:
    """Whether the dotted key exists in cfg, including a required key whose value is still ??? (data.path of
    data=file): a missing value is not a missing key."""
    try:
        return OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True) is not _ABSENT
    except MissingMandatoryValue:
        return True


def explain_override_errors(argv: list[str], config_dir: str) -> None:
    try:
        unknown = unknown_override_keys(argv, config_dir)
    except Exception:  # noqa: BLE001 - hints are best effort; Hydra's own message was already printed
        return
    for key, suggestions in unknown:
        hint = f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""
        print(f"Unknown config key '{key}'.{hint} (To add a new key on purpose, use +{key}=...)", file=sys.stderr)
