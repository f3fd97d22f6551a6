"""One tiny run trained through the real `groundthink-train` CLI, shared by the test modules that need a trained
model (generation, serving, data generation). It is trained once per pytest session: the run folder lives under
the session's base temp directory and is reused when a second module asks for it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TRAIN = ["debug=fast", "logger=csv", "trainer.num_threads=1", "name=tiny"]


def trained_tiny_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.getbasetemp() / "trained_tiny"
    runs = root / "outputs" / "tiny"
    if not (runs.is_dir() and any((p / "checkpoints" / "last.safetensors").exists() for p in runs.iterdir())):
        root.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", HF_DATASETS_OFFLINE="1",
                   GROUNDTHINK_OUTPUT_ROOT=str(root / "outputs"))
        proc = subprocess.run([sys.executable, "-m", "groundthink.train", *TRAIN], cwd=root, env=env,
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise AssertionError(f"training the tiny run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    (run,) = [p for p in runs.iterdir() if (p / "checkpoints" / "last.safetensors").exists()]
    return run
