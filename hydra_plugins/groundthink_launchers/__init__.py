"""GroundThink's sweep launchers as Hydra plugins (Hydra instantiates launchers only from `hydra_plugins`).

The behaviour lives in `groundthink.launchers`; these classes bind it to hydra-submitit-launcher's base classes.
Hydra imports this package at every start-up to discover plugins, so it stays light (submitit loads lazily).
"""

from __future__ import annotations

from typing import Any

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher as _SubmititLocal
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _SubmititSlurm
except ImportError:  # the `scale` extra is not installed: selecting the launcher says how to get it
    from hydra.plugins.launcher import Launcher

    class _Missing(Launcher):
        def __init__(self, **params: Any) -> None:
            raise ImportError(
                "hydra/launcher=local and hydra/launcher=slurm need hydra-submitit-launcher and submitit: "
                "pip install -e '.[scale]'"
            )

        def setup(self, **kwargs: Any) -> None:  # pragma: no cover - never reached
            raise NotImplementedError

        def launch(self, job_overrides, initial_job_idx):  # pragma: no cover - never reached
            raise NotImplementedError

    LocalLauncher = SlurmLauncher = _Missing
else:
    from groundthink.launchers import LocalSweepLauncher, SlurmSweepLauncher

    class LocalLauncher(LocalSweepLauncher, _SubmititLocal):
        """`hydra/launcher=local`: see groundthink.launchers.LocalSweepLauncher."""

    class SlurmLauncher(SlurmSweepLauncher, _SubmititSlurm):
        """`hydra/launcher=slurm`: see groundthink.launchers.SlurmSweepLauncher."""

__all__ = ["LocalLauncher", "SlurmLauncher"]
