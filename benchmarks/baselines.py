"""Baselines benchmark: dense, magnitude, Wanda and SparseGPT on the bundled SmolLM2-135M.

For every method × setting (50%, 70%, 80%, 90% unstructured, 2:4, 4:8) it restores the dense weights, prunes
with `optimum_sparse.SparsePruner` on the same wiki-offline calibration windows, and records perplexity on
the held-out wiki-offline split (512-token windows), prune time, peak memory, the machine, the command line and
the git commit. Results go to `benchmarks/results/baselines_<tag>.json` (rewritten atomically after every run,
so an interrupted grid resumes with `--resume`), and a markdown table is printed.

    python benchmarks/baselines.py                                   # the full grid
    python benchmarks/baselines.py --methods sparsegpt --settings 50% --max-windows 20 --output /tmp/probe.json
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
from _common import (  # noqa: E402
    RESULTS_DIR, ModelBank, PeakMemory, calibration_ids, command_line, default_tag, evaluation_stream, git_info,
    loadavg, machine_info, parse_setting, perplexity, setting_label, timed, write_json,
)

logger = logging.getLogger("benchmarks.baselines")

METHODS = ["magnitude", "wanda", "sparsegpt"]
SETTINGS = ["50%", "70%", "80%", "90%", "2:4", "4:8"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="Model alias, folder or Hub id (float32).")
    p.add_argument("--methods", nargs="*", default=METHODS,
                   help=f"Methods to run (default: {' '.join(METHODS)}; none with `--variant`: only the variants).")
    p.add_argument("--settings", nargs="+", default=SETTINGS,
                   help=f"Sparsity settings: percentages or fractions (unstructured) and N:M (default: {' '.join(SETTINGS).replace('%', '%%')}).")
    p.add_argument("--variant", nargs=3, action="append", default=[], metavar=("LABEL", "METHOD", "KWARGS_JSON"),
                   help="An extra run per setting: METHOD with these method_kwargs, recorded under LABEL "
                        "(e.g. --variant alps+sparsegpt alps '{\"warm_start\": \"sparsegpt\"}'). Repeatable.")
    p.add_argument("--no-dense", action="store_true", help="Skip the dense reference run.")
    p.add_argument("--dataset", default="wiki-offline", help="Calibration and evaluation source.")
    p.add_argument("--num-samples", type=int, default=64, help="Calibration windows.")
    p.add_argument("--seq-len", type=int, default=512, help="Tokens per calibration window.")
    p.add_argument("--seed", type=int, default=0, help="Calibration sampling seed.")
    p.add_argument("--batch-size", type=int, default=8, help="Calibration windows per block forward.")
    p.add_argument("--eval-seq-len", type=int, default=512, help="Perplexity window length.")
    p.add_argument("--max-windows", type=int, default=None, help="Evaluate at most this many windows (recorded).")
    p.add_argument("--eval-batch-size", type=int, default=1, help="Windows per forward during evaluation.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda.")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice).")
    p.add_argument("--tag", default=None, help="Machine tag of the output file name (default: cpu-<cores>c or GPU name).")
    p.add_argument("--output", default=None, help="Output JSON (default: benchmarks/results/baselines_<tag>.json).")
    p.add_argument("--resume", action="store_true", help="Keep runs already in the output file with the same settings.")
    return p


def sparsity_of_blocks(model) -> float:
    """Fraction of exact zeros over every linear weight inside the decoder blocks (measured, not reported)."""
    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / total if total else 0.0


def _mean_layer_error(report) -> float | None:
    """Mean relative reconstruction error `‖ΔW X‖² / ‖W X‖²` over the pruned layers (None when not measured)."""
    errors = [r.relative_error for r in (report.layers if report is not None else []) if r.relative_error is not None]
    return sum(errors) / len(errors) if errors else None


def markdown_table(results: dict) -> str:
    """Perplexity / prune time / peak RSS for every run, one row per setting, one column group per method."""
    runs = results["runs"]
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    methods += sorted({r["method"] for r in runs} - set(methods) - {"dense"})
    labels = []
    for r in runs:
        if r["method"] != "dense" and r["setting"] not in labels:
            labels.append(r["setting"])
    by_key = {(r["method"], r["setting"]): r for r in runs}
    dense = by_key.get(("dense", "dense"))
    head = "| setting | " + " | ".join(f"{m} ppl" for m in methods) + " | " + " | ".join(f"{m} prune s" for m in methods)
    head += " | " + " | ".join(f"{m} peak RSS MiB" for m in methods) + " |"
    lines = [head, "|" + "---|" * (1 + 3 * len(methods))]
    if dense:
        cells = [f"{dense['perplexity']:.2f}"] * len(methods) + ["–"] * len(methods) + ["–"] * len(methods)
        lines.append("| dense | " + " | ".join(cells) + " |")
    for label in labels:
        row = [by_key.get((m, label)) for m in methods]
        ppl = [f"{r['perplexity']:.2f}" if r else "" for r in row]
        sec = [f"{r['prune_seconds']:.1f}" if r else "" for r in row]
        mem = [f"{r['memory']['peak_rss_mib']:.0f}" if r else "" for r in row]
        lines.append(f"| {label} | " + " | ".join(ppl + sec + mem) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("optimum_sparse").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    from optimum_sparse import PruningConfig, SparsePruner

    variants = {label: (method, json.loads(kwargs)) for label, method, kwargs in args.variant}
    unknown = sorted((set(args.methods) | {method for method, _ in variants.values()}) - set(METHODS))
    if unknown:
        from optimum_sparse.methods import available_methods

        missing = sorted(set(unknown) - set(available_methods()))
        if missing:
            raise SystemExit(f"Unknown methods {missing}; available: {available_methods()}")
    settings = [parse_setting(s) for s in args.settings]
    tag = args.tag or default_tag(args.device)
    output = args.output or os.path.join(RESULTS_DIR, f"baselines_{tag}.json")
    started_all = time.perf_counter()

    logger.info("Loading %s ...", args.model)
    bank = ModelBank(args.model, args.device)
    tokenizer = bank.tokenizer
    with timed() as t_tok:
        calib = calibration_ids(tokenizer, args.num_samples, args.seq_len, args.seed, args.dataset)
        stream = evaluation_stream(tokenizer, args.dataset)
    available = stream.numel() // args.eval_seq_len
    windows = available if args.max_windows is None else min(available, args.max_windows)
    logger.info("Model loaded in %.1fs; calibration %s; evaluation %d of %d windows of %d tokens.",
                bank.load_seconds, tuple(calib.shape), windows, available, args.eval_seq_len)

    settings_record = {
        "model": args.model,
        "dtype": "float32",
        "device": args.device,
        "calibration": {"dataset": args.dataset, "split": "calibration", "num_samples": args.num_samples,
                        "seq_len": args.seq_len, "seed": args.seed, "batch_size": args.batch_size,
                        "tokens": int(calib.numel())},
        "evaluation": {"dataset": args.dataset, "split": "evaluation", "seq_len": args.eval_seq_len,
                       "windows": windows, "windows_available": available, "max_windows": args.max_windows,
                       "tokens_predicted": windows * (args.eval_seq_len - 1), "batch_size": args.eval_batch_size},
        "pruning_defaults": {"damping": 0.01, "block_size": 128, "true_sequential": False},
    }
    results = {
        "benchmark": "baselines",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "git": git_info(),
        "machine": machine_info(args.device),
        "settings": settings_record,
        "timing_notes": ("prune_seconds: wall time of SparsePruner.apply on pre-tokenized calibration ids (model "
                         "weights restored beforehand, tokenization excluded); eval_seconds: perplexity pass."),
        "model_load_seconds": round(bank.load_seconds, 2),
        "tokenize_seconds": round(t_tok["wall"], 2),
        "runs": [],
    }
    if args.resume and os.path.isfile(output):
        with open(output, encoding="utf-8") as f:
            previous = json.load(f)
        if previous.get("settings") == settings_record:
            results["runs"] = previous.get("runs", [])
            results["created"] = previous.get("created", results["created"])
            results["resumed_commands"] = previous.get("resumed_commands", []) + [previous.get("command")]
            logger.info("Resuming: %d runs kept from %s.", len(results["runs"]), output)
        else:
            logger.warning("Not resuming: %s was made with other settings.", output)
    done = {(r["method"], r["setting"]) for r in results["runs"]}

    plan = [] if args.no_dense else [("dense", "unstructured", 0.0)]
    plan += [(m, structure, sparsity) for structure, sparsity in settings for m in [*args.methods, *variants]]
    for method, structure, sparsity in plan:
        label = "dense" if method == "dense" else setting_label(structure, sparsity)
        if (method, label) in done:
            logger.info("skip %s %s (already in %s)", method, label, os.path.basename(output))
            continue
        model = bank.fresh()
        load_before = loadavg()
        report = None
        with PeakMemory(args.device) as mem, timed() as t_prune:
            if method != "dense":
                name, kwargs = variants.get(method, (method, {}))
                config = PruningConfig(method=name, sparsity=sparsity if structure == "unstructured" else 0.5,
                                       structure=structure, dataset=args.dataset, num_samples=args.num_samples,
                                       seq_len=args.seq_len, seed=args.seed, batch_size=args.batch_size,
                                       device=args.device, method_kwargs=kwargs)
                pruner = SparsePruner(config)
                pruner.apply(model, dataset=calib, progress=False)
                report = pruner.report
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        with timed() as t_eval:
            ppl = perplexity(model, stream, args.eval_seq_len, windows, args.eval_batch_size)
        run = {
            "method": method,
            **({"base_method": variants[method][0], "method_kwargs": variants[method][1]} if method in variants else {}),
            "setting": label,
            "structure": structure,
            "target_sparsity": sparsity,
            "measured_sparsity": round(sparsity_of_blocks(model), 6),
            "perplexity": ppl,
            "prune_seconds": round(t_prune["wall"], 2) if method != "dense" else 0.0,
            "prune_cpu_seconds": round(t_prune["cpu"], 2) if method != "dense" else 0.0,
            "engine_seconds": round(report.seconds, 2) if report is not None else None,
            "mean_layer_error": _mean_layer_error(report),
            "eval_seconds": round(t_eval["wall"], 2),
            "memory": mem.to_dict() if method != "dense" else None,
            "memory_method": mem.method,
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
        }
        results["runs"].append(run)
        results["total_seconds"] = round(time.perf_counter() - started_all, 1)
        write_json(output, results)
        logger.info("%-9s %-5s ppl %9.3f  prune %6.1fs  eval %6.1fs  peak RSS %s MiB", method, label, ppl,
                    run["prune_seconds"], run["eval_seconds"],
                    run["memory"]["peak_rss_mib"] if run["memory"] else "-")
    print(markdown_table(results))
    print(f"\nWrote {output} ({len(results['runs'])} runs, {time.perf_counter() - started_all:.0f}s this invocation).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
