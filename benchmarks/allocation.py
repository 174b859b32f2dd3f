"""Allocation benchmark: uniform vs OWL vs search (Týr-style) on the bundled SmolLM2-135M.

For every method × sparsity × allocation it restores the dense weights, prunes with `SparsePruner` on the same
wiki-offline calibration windows, and records perplexity on the held-out wiki-offline split, the prune time (the
allocation included), the per-block allocation, and for the search its disk use, history and time. Results go to
`benchmarks/results/allocation_<tag>.json` (rewritten after every run; `--resume` keeps finished runs).

    python benchmarks/allocation.py --methods wanda --settings 70% --allocations uniform owl --threads 1
    python benchmarks/allocation.py --methods wanda --settings 70% --allocations search \
        --search-kwargs '{"generations": 10, "offspring": 8, "survivors": 2, "search_samples": 4}' --resume
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from datetime import datetime, timezone

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's optimum_sparse
from _common import (  # noqa: E402
    RESULTS_DIR, ModelBank, PeakMemory, calibration_ids, command_line, configure, default_tag, evaluation_stream, git_info,
    loadavg, machine_info, parse_setting, perplexity, setting_label, timed, write_json,
)

logger = logging.getLogger("benchmarks.allocation")

ALLOCATIONS = ["uniform", "owl", "search"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="Model alias, folder or Hub id (float32).")
    p.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"], help="Local pruning methods.")
    p.add_argument("--settings", nargs="+", default=["70%", "80%"], help="Unstructured sparsities.")
    p.add_argument("--allocations", nargs="+", default=ALLOCATIONS, choices=ALLOCATIONS)
    p.add_argument("--owl-kwargs", default="{}", help="JSON allocation_kwargs for OWL (default: M=5, lambda=0.08).")
    p.add_argument("--search-kwargs", default="{}", help="JSON allocation_kwargs for the search.")
    p.add_argument("--dataset", default="wiki-offline", help="Calibration and evaluation source.")
    p.add_argument("--num-samples", type=int, default=16, help="Calibration windows.")
    p.add_argument("--seq-len", type=int, default=512, help="Tokens per calibration window.")
    p.add_argument("--seed", type=int, default=0, help="Calibration sampling seed.")
    p.add_argument("--batch-size", type=int, default=8, help="Calibration windows per block forward.")
    p.add_argument("--eval-seq-len", type=int, default=512, help="Perplexity window length.")
    p.add_argument("--max-windows", type=int, default=32, help="Evaluate at most this many windows (recorded).")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda.")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice).")
    p.add_argument("--tag", default=None, help="Machine tag of the output file name.")
    p.add_argument("--output", default=None, help="Output JSON (default: benchmarks/results/allocation_<tag>.json).")
    p.add_argument("--resume", action="store_true", help="Keep runs already in the output file.")
    return p


def markdown_table(runs: list) -> str:
    lines = ["| method | sparsity | allocation | perplexity | prune s | block sparsity min–max | search disk MB |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        blocks = r.get("per_block") or {}
        spread = f"{100 * min(blocks.values()):.1f}–{100 * max(blocks.values()):.1f}%" if blocks else "uniform"
        disk = f"{r['search_disk_bytes'] / 1e6:.1f}" if r.get("search_disk_bytes") is not None else "–"
        lines.append(f"| {r['method']} | {r['setting']} | {r['allocation']} | {r['perplexity']:.3f} | "
                     f"{r['prune_seconds']:.0f} | {spread} | {disk} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    configure(args.threads)
    from optimum_sparse import PruningConfig, SparsePruner

    kwargs_for = {"uniform": {}, "owl": json.loads(args.owl_kwargs), "search": json.loads(args.search_kwargs)}
    tag = args.tag or default_tag(args.device)
    output = args.output or os.path.join(RESULTS_DIR, f"allocation_{tag}.json")
    bank = ModelBank(args.model, args.device)
    calib = calibration_ids(bank.tokenizer, args.num_samples, args.seq_len, args.seed, args.dataset)
    stream = evaluation_stream(bank.tokenizer, args.dataset)
    windows = min(stream.numel() // args.eval_seq_len, args.max_windows)
    results = {"benchmark": "allocation", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "command": command_line(), "git": git_info(), "machine": machine_info(args.device),
               "settings": {"model": args.model, "dtype": "float32", "device": args.device, "threads": args.threads,
                            "calibration": {"dataset": args.dataset, "num_samples": args.num_samples,
                                            "seq_len": args.seq_len, "seed": args.seed, "batch_size": args.batch_size},
                            "evaluation": {"dataset": args.dataset, "split": "evaluation",
                                           "seq_len": args.eval_seq_len, "windows": windows}},
               "runs": []}
    if args.resume and os.path.isfile(output):
        with open(output, encoding="utf-8") as f:
            previous = json.load(f)
        results["runs"] = previous.get("runs", [])
        results["previous_commands"] = previous.get("previous_commands", []) + [previous.get("command")]
    done = {(r["method"], r["setting"], r["allocation"]) for r in results["runs"]}
    def name(allocation: str) -> str:  # a search from OWL's distribution is its own row
        init = kwargs_for[allocation].get("init", "uniform") if allocation == "search" else "uniform"
        return allocation if init == "uniform" else f"{allocation}(init={init})"

    for structure, sparsity in (parse_setting(s) for s in args.settings):
        label = setting_label(structure, sparsity)
        for method in args.methods:
            for allocation in args.allocations:
                if (method, label, name(allocation)) in done:
                    continue
                model = bank.fresh()
                config = PruningConfig(method=method, sparsity=sparsity, num_samples=args.num_samples,
                                       seq_len=args.seq_len, seed=args.seed, batch_size=args.batch_size,
                                       device=args.device, allocation=allocation,
                                       allocation_kwargs=kwargs_for[allocation])
                pruner = SparsePruner(config)
                load_before = loadavg()
                with PeakMemory(args.device) as mem, timed() as t_prune:
                    pruner.apply(model, dataset=calib, progress=False)
                with timed() as t_eval:
                    ppl = perplexity(model, stream, args.eval_seq_len, windows)
                alloc = pruner.allocation
                info = alloc.info if alloc is not None else {}
                run = {"method": method, "setting": label, "allocation": name(allocation), "perplexity": ppl,
                       "allocation_kwargs": kwargs_for[allocation], "prune_seconds": round(t_prune["wall"], 1),
                       "prune_cpu_seconds": round(t_prune["cpu"], 1), "eval_seconds": round(t_eval["wall"], 1),
                       "memory": mem.to_dict(), "loadavg_before": load_before, "loadavg_after": loadavg(),
                       "mean_sparsity": pruner.report.mean_sparsity,
                       "per_block": alloc.per_block() if alloc is not None else None,
                       "pruned_params": alloc.pruned_params if alloc is not None else None,
                       "target_params": alloc.target_params if alloc is not None else None,
                       "search_seconds": info.get("seconds"), "search_disk_bytes": info.get("disk_bytes"),
                       "search_history": info.get("history"),
                       "owl_outlier_ratio": info.get("outlier_ratio")}
                results["runs"].append(run)
                write_json(output, results)
                logger.info("%s %s %s: ppl %.3f, prune %.0fs", method, label, allocation, ppl, run["prune_seconds"])
    print(markdown_table(results["runs"]))
    print(f"\nWrote {output}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
