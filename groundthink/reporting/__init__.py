"""Comparing runs: `groundthink-compare` (compare.py) turns run folders or a multirun sweep into a table
with seed statistics (report.md, cells.csv, runs.csv) and plots. runs.py reads run folders, cells.py groups
runs into cells and computes the statistics and the baseline rule, plots.py draws the PNGs, wandb_runs.py
reads a W&B group.
"""

from groundthink.reporting.cells import Cell, apply_baseline, find_baseline, group_cells
from groundthink.reporting.runs import CompareError, Run, discover_runs, load_runs, read_metrics_csv

__all__ = ["Cell", "CompareError", "Run", "apply_baseline", "discover_runs", "find_baseline", "group_cells",
           "load_runs", "read_metrics_csv"]
