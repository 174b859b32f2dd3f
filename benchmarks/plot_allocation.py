"""Plot the per-block sparsity each allocation found in an allocation benchmark JSON.

    python benchmarks/plot_allocation.py benchmarks/results/allocation_cpu-2c.json
    # -> docs/img/allocation_blocks.png: one panel per (method, setting), one line per allocation, perplexity in the legend
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import REPO_ROOT  # noqa: E402


def plot(results: dict, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels: dict[tuple, list] = {}
    for run in results["runs"]:
        panels.setdefault((run["method"], run["setting"]), []).append(run)
    fig = Figure(figsize=(5.5 * min(len(panels), 2), 3.6 * ((len(panels) + 1) // 2)))
    FigureCanvasAgg(fig)
    for i, ((method, setting), runs) in enumerate(sorted(panels.items())):
        ax = fig.add_subplot((len(panels) + 1) // 2, min(len(panels), 2), i + 1)
        target = float(setting.rstrip("%")) / 100
        for run in runs:
            per_block = run.get("per_block") or {}
            values = list(per_block.values()) if per_block else None
            label = f"{run['allocation']} (ppl {run['perplexity']:.4g})"
            if values is None:
                ax.axhline(100 * target, color="#7f7f7f", linestyle="--", label=label)
            else:
                ax.plot(range(len(values)), [100 * v for v in values], marker=".", label=label)
        ax.set_title(f"{method} {setting}")
        ax.set_xlabel("block")
        ax.set_ylabel("block sparsity (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="allocation benchmark JSON")
    parser.add_argument("--output", default=os.path.join(REPO_ROOT, "docs", "img", "allocation_blocks.png"))
    args = parser.parse_args(argv)
    plot(json.load(open(args.results)), args.output)


if __name__ == "__main__":
    main()
