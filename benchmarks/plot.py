"""Plot and tabulate a baselines JSON: perplexity vs sparsity per method (log y) and markdown tables.

    python benchmarks/plot.py benchmarks/results/baselines_cpu-2c.json
    # -> docs/img/baselines_ppl.png and benchmarks/results/baselines_cpu-2c.md (also printed)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import REPO_ROOT  # noqa: E402

METHOD_ORDER = ["magnitude", "wanda", "sparsegpt", "alps", "sparsellm"]
COLORS = {"magnitude": "#7f7f7f", "wanda": "#1f77b4", "sparsegpt": "#d62728", "alps": "#2ca02c", "sparsellm": "#9467bd"}
NM_MARKERS = {"2:4": "s", "4:8": "D"}


def _methods(runs: list) -> list:
    found = [m for m in METHOD_ORDER if any(r["method"] == m for r in runs)]
    return found + sorted({r["method"] for r in runs} - set(found) - {"dense"})


def _settings(runs: list) -> list:
    unstructured = sorted({r["setting"] for r in runs if r["structure"] == "unstructured" and r["method"] != "dense"},
                          key=lambda s: float(s.rstrip("%")))
    nm = sorted({r["setting"] for r in runs if r["structure"] != "unstructured"}, key=lambda s: int(s.split(":")[1]))
    return unstructured + nm


def tables(results: dict) -> str:
    """Two markdown tables: perplexity per setting × method, then prune time and peak memory."""
    runs = results["runs"]
    methods, settings = _methods(runs), _settings(runs)
    by = {(r["method"], r["setting"]): r for r in runs}
    dense = by.get(("dense", "dense"))
    out = ["| sparsity | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    if dense:
        out.append("| dense (0%) | " + " | ".join(f"{dense['perplexity']:.2f}" for _ in methods) + " |")
    for s in settings:
        out.append(f"| {s} | " + " | ".join(f"{by[(m, s)]['perplexity']:.2f}" if (m, s) in by else "–"
                                           for m in methods) + " |")
    out += ["", "| sparsity | " + " | ".join(f"{m} prune s" for m in methods) + " | "
            + " | ".join(f"{m} peak RSS MiB (+Δ)" for m in methods) + " |",
            "|---|" + "---:|" * (2 * len(methods))]
    for s in settings:
        cells = [f"{by[(m, s)]['prune_seconds']:.1f}" if (m, s) in by else "–" for m in methods]
        for m in methods:
            r = by.get((m, s))
            cells.append(f"{r['memory']['peak_rss_mib']:.0f} (+{r['memory']['peak_rss_increase_mib']:.0f})" if r else "–")
        out.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    methods = _methods(runs)
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    dense = next((r for r in runs if r["method"] == "dense"), None)
    if dense:
        ax.axhline(dense["perplexity"], color="black", linestyle="--", linewidth=1,
                   label=f"dense ({dense['perplexity']:.2f})")
    offsets = {m: (i - (len(methods) - 1) / 2) * 0.008 for i, m in enumerate(methods)}
    for m in methods:
        color = COLORS.get(m)
        pts = sorted((r["target_sparsity"], r["perplexity"]) for r in runs
                     if r["method"] == m and r["structure"] == "unstructured")
        if pts:
            ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], marker="o", color=color, label=f"{m} (unstructured)")
        for r in runs:
            if r["method"] == m and r["structure"] != "unstructured":
                ax.scatter([r["target_sparsity"] * 100 + offsets[m] * 100], [r["perplexity"]], color=color,
                           marker=NM_MARKERS.get(r["structure"], "^"), facecolors="none", s=55, linewidths=1.5)
    for structure, marker in NM_MARKERS.items():
        if any(r["structure"] == structure for r in runs):
            ax.scatter([], [], marker=marker, facecolors="none", edgecolors="black", label=f"{structure} (at 50%)")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity of the decoder-block linears (%)")
    ax.set_ylabel("perplexity (log scale)")
    s = results["settings"]
    cal, ev = s["calibration"], s["evaluation"]
    ax.set_title(f"SmolLM2-135M on held-out wiki-offline ({ev['windows']}×{ev['seq_len']} tokens); "
                 f"calibration {cal['num_samples']}×{cal['seq_len']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="A baselines_<tag>.json file.")
    p.add_argument("--plot", default=os.path.join(REPO_ROOT, "docs", "img", "baselines_ppl.png"))
    p.add_argument("--table", default=None, help="Markdown output (default: beside the JSON, .md).")
    args = p.parse_args(argv)
    with open(args.results, encoding="utf-8") as f:
        results = json.load(f)
    plot(results, args.plot)
    text = tables(results)
    table_path = args.table or os.path.splitext(args.results)[0] + ".md"
    with open(table_path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(text)
    print(f"\nWrote {args.plot} and {table_path}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
