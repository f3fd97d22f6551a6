"""Multi-process launches (issue 17): trainer=ddp_multinode / trainer=fsdp take devices and nodes from the launcher's
environment, every rank of one torchrun / SLURM launch names the same run folder, and a launch whose ranks could not
agree on one is refused before anything is created. (The torchrun run: tests/test_shard_training.py.)"""

from __future__ import annotations

import pytest

from groundthink import hydra_support
from groundthink.training.run import UserError
from groundthink.training.rundir import launch_key, launched_rank
from tests.test_configs import compose_with

LAUNCH_ENV = ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE", "SLURM_NTASKS",
              "SLURM_PROCID", "SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_NNODES", "SLURM_NTASKS_PER_NODE")


@pytest.fixture
def env(monkeypatch):
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("group", ["ddp_multinode", "fsdp"])
def test_devices_and_nodes_come_from_the_launcher(env, group):
    cfg = compose_with([f"trainer={group}"])
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == ("auto", 1)
    env.setenv("LOCAL_WORLD_SIZE", "4")
    env.setenv("GROUP_WORLD_SIZE", "2")
    cfg = compose_with([f"trainer={group}"])
    assert (str(cfg.trainer.devices), int(cfg.trainer.num_nodes)) == ("4", 2)
    env.delenv("LOCAL_WORLD_SIZE")
    env.delenv("GROUP_WORLD_SIZE")
    env.setenv("SLURM_NTASKS_PER_NODE", "8")
    env.setenv("SLURM_NNODES", "3")
    cfg = compose_with([f"trainer={group}", "trainer.num_nodes=5"])
    assert (str(cfg.trainer.devices), cfg.trainer.num_nodes) == ("8", 5)


def test_every_rank_of_a_launch_names_the_same_run_folder(env, tmp_path):
    assert launched_rank() == (0, 1)
    plain = hydra_support._run_dir_resolver("out", "x", None)
    env.setenv("TORCHELASTIC_RUN_ID", "3f2a")
    env.setenv("WORLD_SIZE", "2")
    folders = set()
    for rank in ("0", "1"):
        env.setenv("RANK", rank)
        folders.add(hydra_support._run_dir_resolver("out", "x", None))
    (folder,) = folders
    assert folder != plain and folder.startswith("out/x/torchrun_") and len(folder.rsplit("_", 1)[1]) == 8
    env.setenv("TORCHELASTIC_RUN_ID", "other")
    assert hydra_support._run_dir_resolver("out", "x", None) != folder
    assert hydra_support._run_dir_resolver("out", "x", "out/x/old") == "out/x/old"
    # rank 1 keeps no Hydra record of its own and logs to train_rank1.log
    args = hydra_support.prepare_argv([f"paths.output_root={tmp_path}"])
    assert "hydra.output_subdir=null" in args and "hydra.job.name=train_rank1" in args


def test_a_launch_without_a_shared_id_is_refused(env, tmp_path):
    env.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun without --standalone or --rdzv-id
    env.setenv("RANK", "0")
    env.setenv("WORLD_SIZE", "2")
    assert launch_key() is None
    with pytest.raises(UserError, match="--standalone"):
        hydra_support.prepare_argv([f"paths.output_root={tmp_path}"])
    assert hydra_support.prepare_argv([f"paths.output_root={tmp_path}", f"hydra.run.dir={tmp_path}/x/run"])


def test_slurm_tasks_share_the_job_and_step(env):
    env.setenv("SLURM_NTASKS", "4")
    env.setenv("SLURM_PROCID", "3")
    env.setenv("SLURM_JOB_ID", "777")
    env.setenv("SLURM_STEP_ID", "0")
    assert launched_rank() == (3, 4) and launch_key() == "slurm-777.0"
    assert hydra_support._run_dir_resolver("out", "x", None).startswith("out/x/slurm-777_")
