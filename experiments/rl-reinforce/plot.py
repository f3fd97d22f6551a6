"""val/reward curves and a table of stage=rl runs: python experiments/rl-reinforce/plot.py OUT.png RUN [RUN ...]

Each RUN is a run folder (its metrics.csv and config.yaml); the label is the run's name and seed."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from groundthink.training.metrics_file import read_metrics_csv


def main(out: str, runs: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    print("| run | seed | val/reward at step 0 | 10 | 20 | 40 | last (step) | best | val/exact last |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in map(Path, runs):
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        metrics = read_metrics_csv(run / "metrics.csv")
        curve = dict(metrics["val/reward"])
        exact = dict(metrics["val/exact"])
        batch = cfg["rl"]["batch_size"]
        label = f"{cfg['name']} seed {cfg['seed']}"
        ax.plot([s * batch for s in curve], list(curve.values()), marker="o", label=label)
        last = max(curve)
        cells = [f"{curve[s]:.3f}" if s in curve else "" for s in (0, 10, 20, 40)]
        print(f"| {cfg['name']} | {cfg['seed']} | " + " | ".join(cells)
              + f" | {curve[last]:.3f} ({last}) | {max(curve.values()):.3f} | {exact[last]:.3f} |")
    ax.set_xlabel("training episodes")
    ax.set_ylabel("val/reward (greedy, 64 held-out prompts)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
