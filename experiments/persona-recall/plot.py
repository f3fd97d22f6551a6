"""Persona accuracy vs distance from groundthink-eval's persona results of several runs, one line per label.

    python experiments/persona-recall/plot.py experiments/persona-recall "H trained=<run>" "H trained=<run 2>" \
        "H untrained=<run 3>" ...

Each argument is LABEL=RUN (a run folder evaluated with `eval=persona`); runs sharing a label are averaged (the band
is their min..max). Writes persona_vs_distance.png and persona_vs_distance.csv (one row per label and distance).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path


def main(out: Path, pairs: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table: dict[str, dict[int, list[tuple[float, float]]]] = {}
    chance = None
    for pair in pairs:
        label, run = pair.split("=", 1)
        for row in csv.DictReader(open(Path(run) / "eval" / "persona" / "persona.csv")):
            table.setdefault(label, {}).setdefault(int(row["distance"]), []).append(
                (float(row["accuracy"]), float(row["mean_tokens_since_persona"])))
            chance = float(row["chance"])
    rows = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, by_distance in table.items():
        ds = sorted(by_distance)
        xs = [max(1.0, sum(t for _, t in by_distance[d]) / len(by_distance[d])) for d in ds]
        accs = [[a for a, _ in by_distance[d]] for d in ds]
        mean = [sum(a) / len(a) for a in accs]
        style = "--" if "untrained" in label else "-"
        (line,) = ax.plot(xs, mean, style, marker="o", label=label)
        ax.fill_between(xs, [min(a) for a in accs], [max(a) for a in accs], alpha=0.15, color=line.get_color())
        for d, x, a in zip(ds, xs, accs):
            rows.append({"label": label, "distance": d, "mean_tokens_since_persona": round(x, 1), "runs": len(a),
                         "acc_mean": sum(a) / len(a), "acc_min": min(a), "acc_max": max(a)})
    ax.axvline(512, color="grey", linestyle=":", label="attention window (512)")
    ax.axhline(chance, color="grey", linestyle="--", linewidth=0.8, label=f"chance ({chance:g})")
    ax.set_xscale("log")
    ax.set_xlabel("tokens between the persona turn and the question (log scale)")
    ax.set_ylabel("accuracy (mean, band = min..max over seeds)")
    ax.set_title("persona probe after data=persona training (small, 2000 steps)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "persona_vs_distance.png", dpi=110, bbox_inches="tight")
    with open(out / "persona_vs_distance.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out / 'persona_vs_distance.png'} and persona_vs_distance.csv")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
