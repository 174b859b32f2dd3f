"""Accuracy benchmark: `wiki_offline_mc` accuracy (lm-eval) beside held-out perplexity on the bundled SmolLM2-135M.

For every run (dense, then `METHOD:SETTING` specs in the order given: unstructured percentages, N:M, or structured
ratios for `structprune`/`flap`, which remove heads and MLP channels) it restores the dense weights (a copy for
structured runs), prunes with `optimum_sparse.SparsePruner` on the same wiki-offline calibration windows, and records
held-out perplexity (512-token windows) and `wiki_offline_mc` accuracy (acc and acc_norm with their stderr, the share
of dense kept), prune time, the machine, the command and the commit. Results go to
`benchmarks/results/accuracy_<tag>.json`, rewritten after every run; `--resume` skips finished runs.

    python benchmarks/accuracy.py --threads 1 --num-samples 32 --limit 200 --max-windows 32 --resume
    python benchmarks/accuracy.py --runs wanda:50% --limit 20 --max-windows 4 --output /tmp/probe.json
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
from datetime import datetime, timezone

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's optimum_sparse
from _common import (  # noqa: E402
    RESULTS_DIR, ModelBank, calibration_ids, command_line, configure, default_tag, evaluation_stream, git_info,
    loadavg, machine_info, parse_setting, perplexity, resume_from, setting_label, timed, write_json,
)
from plot_accuracy import table as markdown_table  # noqa: E402

logger = logging.getLogger("benchmarks.accuracy")

STRUCTURED = ("structprune", "flap")
# Cheap runs first, SparseLLM/ALPS last, so that an interrupted grid still compares methods.
RUNS = ["wanda:50%", "wanda:70%", "wanda:2:4", "sparsegpt:50%", "sparsegpt:70%", "sparsegpt:2:4",
        "flap:30%", "structprune:30%", "alps:50%", "alps:70%", "alps:2:4",
        "sparsellm:50%", "sparsellm:70%", "sparsellm:2:4"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="Model alias, folder or Hub id (float32).")
    p.add_argument("--runs", nargs="*", default=RUNS, help="METHOD:SETTING specs, run in this order (default: the grid).")
    p.add_argument("--tasks", default="wiki_offline_mc", help="lm-eval tasks (comma-separated).")
    p.add_argument("--limit", type=float, default=None, help="Items per task (default: all).")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--eval-batch-size", type=int, default=16, help="Sequences per forward in lm-eval.")
    p.add_argument("--num-samples", type=int, default=64, help="Calibration windows.")
    p.add_argument("--seq-len", type=int, default=512, help="Tokens per calibration window.")
    p.add_argument("--seed", type=int, default=0, help="Calibration sampling seed.")
    p.add_argument("--batch-size", type=int, default=8, help="Calibration windows per block forward.")
    p.add_argument("--eval-seq-len", type=int, default=512, help="Perplexity window length.")
    p.add_argument("--max-windows", type=int, default=None, help="Perplexity on at most this many windows.")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice).")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tag", default=None, help="Machine tag of the output file name (default: cpu-<cores>c or GPU name).")
    p.add_argument("--output", default=None, help="Output JSON (default: benchmarks/results/accuracy_<tag>.json).")
    p.add_argument("--resume", action="store_true", help="Keep runs already in the output file with the same settings.")
    return p


def parse_run(spec: str) -> tuple[str, str, float]:
    """`"wanda:2:4"` -> `("wanda", "2:4", 0.5)`; `"flap:30%"` -> `("flap", "channels+heads", 0.3)`."""
    method, _, setting = spec.partition(":")
    if not setting:
        raise SystemExit(f"Run spec {spec!r} is not METHOD:SETTING.")
    structure, sparsity = parse_setting(setting)
    if method in STRUCTURED:
        if structure != "unstructured":
            raise SystemExit(f"{method} takes a ratio, not {setting!r}.")
        structure = "channels+heads"
    return method, structure, sparsity


def label_of(method: str, structure: str, sparsity: float) -> str:
    return setting_label("unstructured" if structure == "channels+heads" else structure, sparsity)


def accuracy_row(results, dense_metrics) -> dict:
    """Per task: metrics, and the share of dense acc / acc_norm kept."""
    out = {}
    for task, metrics in results.metrics.items():
        row = dict(metrics)
        for key in ("acc", "acc_norm"):
            dense = (dense_metrics or {}).get(task, {}).get(key)
            if dense and key in metrics:
                row[f"{key}_share_of_dense"] = metrics[key] / dense
        out[task] = row
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    configure(args.threads)
    from optimum_sparse import PruningConfig, SparsePruner
    from optimum_sparse.eval.accuracy import resolve_tasks, run_tasks

    runs = [parse_run(s) for s in args.runs]
    tasks = resolve_tasks(args.tasks)
    tag = args.tag or default_tag(args.device)
    output = args.output or os.path.join(RESULTS_DIR, f"accuracy_{tag}.json")
    started_all = time.perf_counter()
    bank = ModelBank(args.model, args.device)
    tokenizer = bank.tokenizer
    calib = calibration_ids(tokenizer, args.num_samples, args.seq_len, args.seed)
    stream = evaluation_stream(tokenizer)
    available = stream.numel() // args.eval_seq_len
    windows = available if args.max_windows is None else min(available, args.max_windows)
    import lm_eval

    settings = {
        "model": args.model, "dtype": "float32", "device": args.device, "threads": args.threads,
        "calibration": {"dataset": "wiki-offline", "split": "calibration", "num_samples": args.num_samples,
                        "seq_len": args.seq_len, "seed": args.seed, "batch_size": args.batch_size},
        "perplexity": {"dataset": "wiki-offline", "split": "evaluation", "seq_len": args.eval_seq_len,
                       "windows": windows, "windows_available": available},
        "accuracy": {"tasks": tasks, "limit": args.limit, "num_fewshot": args.num_fewshot,
                     "batch_size": args.eval_batch_size, "lm_eval": lm_eval.__version__},
        "structured": {"structure": "channels+heads", "multiple_of": 8},
    }
    results = {"benchmark": "accuracy", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "command": command_line(), "git": git_info(), "machine": machine_info(args.device),
               "settings": settings, "runs": []}
    if args.resume:
        resume_from(output, results, logger)
    done = {(r["method"], r["setting"]): r for r in results["runs"]}
    dense = done.get(("dense", "dense"))

    for method, structure, sparsity in [("dense", "unstructured", 0.0), *runs]:
        label = "dense" if method == "dense" else label_of(method, structure, sparsity)
        if (method, label) in done:
            logger.info("skip %s %s (already in %s)", method, label, os.path.basename(output))
            continue
        model = bank.fresh()
        if structure == "channels+heads":
            model = copy.deepcopy(model)
        with timed() as t_prune:
            if method != "dense":
                config = PruningConfig(
                    method=method, sparsity=sparsity,
                    structure=structure, num_samples=args.num_samples, seq_len=args.seq_len, seed=args.seed,
                    batch_size=args.batch_size, device=args.device,
                    **({"multiple_of": 8} if structure == "channels+heads" else {}))
                SparsePruner(config).apply(model, dataset=calib, progress=False)
        with timed() as t_ppl:
            ppl = perplexity(model, stream, args.eval_seq_len, windows)
        acc = run_tasks(model, tokenizer, tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                        batch_size=args.eval_batch_size)
        run = {
            "method": method, "setting": label, "structure": structure, "target": sparsity,
            "perplexity": ppl,
            "accuracy": accuracy_row(acc, dense["accuracy_raw"] if dense else None),
            "accuracy_raw": acc.metrics, "task_versions": acc.versions, "items": acc.samples,
            "prune_seconds": round(t_prune["wall"], 2), "prune_cpu_seconds": round(t_prune["cpu"], 2),
            "perplexity_seconds": round(t_ppl["wall"], 2), "accuracy_seconds": acc.seconds,
            "loadavg_after": loadavg(),
        }
        if method == "dense":
            dense = run
        del model
        results["runs"].append(run)
        results["total_seconds"] = round(time.perf_counter() - started_all, 1)
        write_json(output, results)
        m = run["accuracy"][tasks[0]]
        logger.info("%-11s %-5s ppl %9.3f  %s acc %.3f ± %.3f  prune %6.1fs", method, label, ppl, tasks[0],
                    m["acc"], m["acc_stderr"], run["prune_seconds"])
    print(markdown_table(results))
    print(f"\nWrote {output} ({len(results['runs'])} runs, {time.perf_counter() - started_all:.0f}s this invocation).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
