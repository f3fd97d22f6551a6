"""Accuracy vs distance per init from the passkey_init sweep's groundthink-eval results (mean and range over seeds).

    python experiments/passkey-init/plot.py outputs/passkey_init-multirun/<sweep folder> experiments/passkey-init

Reads each job's eval/passkey/passkey.csv and its .hydra/overrides.yaml; writes passkey_vs_distance.png and
passkey_vs_distance.csv (one row per init and distance: digit and whole-key accuracy, mean / min / max over seeds).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import yaml


def main(sweep: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table: dict[str, dict[int, list[tuple[float, float]]]] = {}
    for job in sorted(p for p in sweep.iterdir() if (p / "eval" / "passkey" / "passkey.csv").exists()):
        overrides = dict(o.split("=", 1) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))
        for row in csv.DictReader(open(job / "eval" / "passkey" / "passkey.csv")):
            table.setdefault(overrides["model.init"], {}).setdefault(int(row["distance"]), []).append(
                (float(row["accuracy"]), float(row["key_accuracy"])))
    rows = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for init, by_distance in sorted(table.items()):
        xs = sorted(by_distance)
        for which, style in ((0, "-"), (1, "--")):
            mean = [sum(v[which] for v in by_distance[d]) / len(by_distance[d]) for d in xs]
            low = [min(v[which] for v in by_distance[d]) for d in xs]
            high = [max(v[which] for v in by_distance[d]) for d in xs]
            label = f"{init}, {'digit' if which == 0 else 'whole key'}"
            (line,) = ax.plot(xs, mean, style, marker="o", label=label)
            ax.fill_between(xs, low, high, alpha=0.15, color=line.get_color())
        for d in xs:
            digit, key = zip(*by_distance[d])
            rows.append({"init": init, "distance": d, "seeds": len(digit),
                         "digit_acc_mean": sum(digit) / len(digit), "digit_acc_min": min(digit),
                         "digit_acc_max": max(digit), "key_acc_mean": sum(key) / len(key)})
    ax.axvline(32, color="grey", linestyle=":", label="TBPTT segment (32)")
    ax.axhline(0.1, color="grey", linestyle="--", linewidth=0.8, label="chance (digit)")
    ax.set_xscale("log")
    ax.set_xlabel("distance between key and query (tokens, log scale)")
    ax.set_ylabel("accuracy (mean, band = min..max over seeds)")
    ax.set_title("token-level passkey, tiny hybrid, carried state")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "passkey_vs_distance.png", dpi=110, bbox_inches="tight")
    with open(out / "passkey_vs_distance.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out / 'passkey_vs_distance.png'} and passkey_vs_distance.csv")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
