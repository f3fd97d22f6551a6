"""Hydra search-path plugin: puts GroundThink's sweeps/ folder on the config search path of groundthink-train, so
`groundthink-train -m -cn ablation_matrix` finds sweeps/ablation_matrix.yaml (a primary config, which Hydra looks
up before any `hydra.searchpath` in a config file could apply). Hydra discovers it through the `hydra_plugins`
namespace package."""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

REPO = Path(__file__).resolve().parents[2]
CONF, SWEEPS = REPO / "conf", REPO / "sweeps"


class GroundThinkSweepsSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        # Only for the app whose primary configs live in GroundThink's conf/ (other Hydra apps are left alone).
        mains = [e.path for e in search_path.get_path() if e.provider == "main" and e.path]
        if any(Path(p.removeprefix("file://")).resolve() == CONF for p in mains):
            search_path.append(provider="groundthink-sweeps", path=f"file://{SWEEPS}")
