"""Plot and tabulate an accuracy JSON: `wiki_offline_mc` accuracy (± stderr) against held-out perplexity (log x).

    python benchmarks/plot_accuracy.py benchmarks/results/accuracy_cpu-2c.json
    # -> docs/img/accuracy_vs_ppl.png and benchmarks/results/accuracy_cpu-2c.md (also printed)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import REPO_ROOT  # noqa: E402
from plot import COLORS  # noqa: E402

COLORS = {**COLORS, "dense": "#000000", "flap": "#8c564b", "structprune": "#e377c2"}
MARKERS = {"50%": "o", "70%": "^", "2:4": "s", "30%": "P", "dense": "*"}


def table(results: dict) -> str:
    """One row per run: perplexity, acc ± stderr, acc_norm ± stderr, shares of dense kept, prune time."""
    task = results["settings"]["accuracy"]["tasks"][0]
    lines = [f"| method | setting | perplexity | {task} acc | acc_norm | share of dense acc | share of dense acc_norm | prune s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results["runs"]:
        m = r["accuracy"][task]
        share = lambda k: f"{m[k]:.1%}" if k in m else "–"  # noqa: E731
        lines.append(f"| {r['method']} | {r['setting']} | {r['perplexity']:.2f} | {m['acc']:.3f} ± {m['acc_stderr']:.3f} "
                     f"| {m['acc_norm']:.3f} ± {m['acc_norm_stderr']:.3f} | {share('acc_share_of_dense')} "
                     f"| {share('acc_norm_share_of_dense')} | {r['prune_seconds']:.0f} |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    task = results["settings"]["accuracy"]["tasks"][0]
    fig = Figure(figsize=(7.5, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for r in results["runs"]:
        m = r["accuracy"][task]
        ax.errorbar(r["perplexity"], m["acc"], yerr=m["acc_stderr"], fmt=MARKERS.get(r["setting"], "o"),
                    color=COLORS.get(r["method"], "#17becf"), capsize=3, markersize=8,
                    label=f"{r['method']} {r['setting']}" if r["method"] != "dense" else "dense")
    ax.axhline(0.25, color="grey", linestyle=":", linewidth=1, label="chance (0.25)")
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks([10, 20, 50, 100, 200, 500, 1000])
    ax.set_xlabel("held-out wiki-offline perplexity (log scale, lower is better)")
    ax.set_ylabel(f"{task} accuracy (± stderr)")
    s = results["settings"]
    items = f"{s['accuracy']['limit']:g}" if s["accuracy"]["limit"] else "all"
    ax.set_title(f"SmolLM2-135M: accuracy ({items} items) vs perplexity "
                 f"({s['perplexity']['windows']}×{s['perplexity']['seq_len']} tokens)", fontsize=9)
    ax.legend(fontsize=7, ncol=3, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, format="png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="accuracy_<tag>.json")
    p.add_argument("--plot", default=os.path.join(REPO_ROOT, "docs", "img", "accuracy_vs_ppl.png"))
    args = p.parse_args(argv)
    with open(args.results, encoding="utf-8") as f:
        results = json.load(f)
    text = table(results)
    with open(os.path.splitext(args.results)[0] + ".md", "w", encoding="utf-8") as f:
        f.write(f"Command: `{results['command']}`\n\n{text}\n")
    plot(results, args.plot)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
