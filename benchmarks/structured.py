"""Structured pruning benchmark: StructPrune vs FLAP vs Wanda-structured on the bundled SmolLM2-135M.

For every method × ratio (fraction of the prunable block parameters removed) it copies the dense model, prunes
with `optimum_sparse.SparsePruner` (heads and/or MLP channels removed, linears shrunk) on the same wiki-offline
calibration windows, and records: perplexity on the held-out wiki-offline split, parameter counts (prunable and
whole model), the achieved fractions, prune time, and the measured speed of the smaller model against the dense one
(median forward latency at batch 1 and tokens/s at batch 8, `--speed-seq-len` tokens, KV cache off, same threads).
Results go to `benchmarks/results/structured_<tag>.json` (rewritten after every run; `--resume` skips finished
runs) and a markdown table is printed.

    python benchmarks/structured.py --threads 1 --num-samples 16 --seq-len 512 --max-windows 32
    python benchmarks/structured.py --methods structprune --ratios 30% --max-windows 8 --output /tmp/probe.json

Layer-wise allocation rows (`--allocations`): `method` is the method's own rule (StructPrune: softmax; FLAP:
threshold; Wanda-/magnitude-structured: uniform; or what `--method-kwargs` sets), `uniform` forces the uniform rule,
`search` runs the Týr-style structured search (`PruningConfig.allocation="search"`, settings from `--search-kwargs`;
a `state_dir` there gets one sub-folder per method and ratio, so an interrupted search resumes):

    python benchmarks/structured.py --methods structprune --ratios 30% 50% --allocations uniform method search \
        --search-kwargs '{"generations": 12, "offspring": 8, "survivors": 2, "search_samples": 4}' --resume
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import statistics
import sys
import time
from datetime import datetime, timezone

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's optimum_sparse
from _common import (  # noqa: E402
    RESULTS_DIR, calibration_ids, command_line, default_tag, evaluation_stream, git_info, loadavg,
    machine_info, parse_setting, perplexity, timed, write_json,
)

logger = logging.getLogger("benchmarks.structured")

METHODS = ["wanda-structured", "flap", "structprune"]
RATIOS = ["10%", "20%", "30%", "50%"]
ALLOCATIONS = ["method", "uniform", "search"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="Model alias, folder or Hub id (float32).")
    p.add_argument("--methods", nargs="+", default=METHODS, help=f"Structured methods (default: {' '.join(METHODS)}).")
    p.add_argument("--ratios", nargs="+", default=RATIOS, help=f"Fractions of prunable parameters (default: {' '.join(RATIOS).replace('%', '%%')}).")
    p.add_argument("--structure", default="channels+heads", choices=["channels", "heads", "channels+heads"])
    p.add_argument("--multiple-of", type=int, default=8, help="Kept MLP channels per layer are a multiple of this.")
    p.add_argument("--method-kwargs", default="{}", help="JSON dict of method kwargs applied to every method that takes them.")
    p.add_argument("--allocations", nargs="+", default=["method"], choices=ALLOCATIONS,
                   help="Layer-wise allocations: the method's own rule, uniform, and/or the structured search.")
    p.add_argument("--search-kwargs", default="{}", help="JSON allocation_kwargs of the search (docs/structured.md).")
    p.add_argument("--dataset", default="wiki-offline", help="Calibration and evaluation source.")
    p.add_argument("--num-samples", type=int, default=16, help="Calibration windows.")
    p.add_argument("--seq-len", type=int, default=512, help="Tokens per calibration window.")
    p.add_argument("--seed", type=int, default=0, help="Calibration sampling seed.")
    p.add_argument("--batch-size", type=int, default=8, help="Calibration windows per block forward.")
    p.add_argument("--eval-seq-len", type=int, default=512, help="Perplexity window length.")
    p.add_argument("--max-windows", type=int, default=32, help="Evaluate at most this many windows.")
    p.add_argument("--speed-seq-len", type=int, default=256, help="Tokens per sequence of the speed measurement.")
    p.add_argument("--speed-repeats", type=int, default=5, help="Timed forwards per speed measurement (median).")
    p.add_argument("--no-speed", action="store_true", help="Skip latency/throughput.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda.")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice).")
    p.add_argument("--tag", default=None, help="Machine tag of the output file name.")
    p.add_argument("--output", default=None, help="Output JSON (default: benchmarks/results/structured_<tag>.json).")
    p.add_argument("--resume", action="store_true", help="Keep runs already in the output file with the same settings.")
    return p


def block_params(model) -> int:
    return sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
               for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name)


def model_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@torch.inference_mode()
def measure_speed(model, vocab: int, seq_len: int, repeats: int, device: str) -> dict:
    """Median wall time of a full forward (logits included, no KV cache) at batch 1 and batch 8."""
    out = {}
    generator = torch.Generator().manual_seed(0)
    for batch in (1, 8):
        ids = torch.randint(0, vocab, (batch, seq_len), generator=generator).to(device)
        model(input_ids=ids, use_cache=False)  # warm-up
        times = []
        for _ in range(repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        out[f"batch{batch}"] = {"median_seconds": median, "tokens_per_second": batch * seq_len / median,
                                "all_seconds": [round(t, 5) for t in times]}
    return out


def markdown_table(results: dict) -> str:
    runs = results["runs"]
    dense = next((r for r in runs if r["method"] == "dense"), None)
    lines = ["| method | ratio | allocation | achieved (prunable) | achieved (model) | params | ppl | latency b1 ms | "
             "speed-up b1 | tok/s b8 | speed-up b8 | prune s |", "|" + "---|" * 12]
    for r in runs:
        speed = r.get("speed") or {}
        b1, b8 = speed.get("batch1"), speed.get("batch8")
        lines.append("| " + " | ".join([
            r["method"], r["setting"], r.get("allocation_label", "–"),
            f"{100 * r['achieved_prunable_fraction']:.1f}%", f"{100 * r['achieved_model_fraction']:.1f}%",
            f"{r['model_params'] / 1e6:.1f}M", f"{r['perplexity']:.2f}",
            f"{1000 * b1['median_seconds']:.0f}" if b1 else "–", f"{r.get('speedup_batch1', 1.0):.2f}×" if b1 else "–",
            f"{b8['tokens_per_second']:.0f}" if b8 else "–", f"{r.get('speedup_batch8', 1.0):.2f}×" if b8 else "–",
            f"{r['prune_seconds']:.0f}" if r["method"] != "dense" else "–",
        ]) + " |")
    if dense is None:
        lines.append("(no dense run)")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    from optimum_sparse import PruningConfig, SparsePruner
    from optimum_sparse.methods import get_method_class

    method_kwargs = json.loads(args.method_kwargs)
    ratios = [parse_setting(r)[1] for r in args.ratios]
    tag = args.tag or default_tag(args.device)
    output = args.output or os.path.join(RESULTS_DIR, f"structured_{tag}.json")
    started_all = time.perf_counter()
    from optimum_sparse.models import load_model_and_tokenizer

    dense_model, tokenizer = load_model_and_tokenizer(args.model, dtype=torch.float32)  # one copy (memory)
    dense_model.eval().to(args.device)
    calib = calibration_ids(tokenizer, args.num_samples, args.seq_len, args.seed, args.dataset)
    stream = evaluation_stream(tokenizer, args.dataset)
    available = stream.numel() // args.eval_seq_len
    windows = min(available, args.max_windows) if args.max_windows else available
    settings = {
        "model": args.model, "dtype": "float32", "device": args.device, "threads": torch.get_num_threads(),
        "structure": args.structure, "multiple_of": args.multiple_of, "method_kwargs": method_kwargs,
        "calibration": {"dataset": args.dataset, "split": "calibration", "num_samples": args.num_samples,
                        "seq_len": args.seq_len, "seed": args.seed, "batch_size": args.batch_size},
        "evaluation": {"dataset": args.dataset, "split": "evaluation", "seq_len": args.eval_seq_len,
                       "windows": windows, "windows_available": available},
        "speed": None if args.no_speed else {"seq_len": args.speed_seq_len, "repeats": args.speed_repeats,
                                             "batches": [1, 8], "what": "full forward incl. lm_head, use_cache=False"},
    }
    results = {"benchmark": "structured", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "command": command_line(), "git": git_info(), "machine": machine_info(args.device),
               "settings": settings, "runs": []}
    if args.resume and os.path.isfile(output):
        with open(output, encoding="utf-8") as f:
            previous = json.load(f)
        if previous.get("settings") == settings:
            results["runs"] = previous["runs"]
            results["resumed_commands"] = previous.get("resumed_commands", []) + [previous.get("command")]
    search_kwargs = json.loads(args.search_kwargs)
    done = {(r["method"], r["setting"], r.get("allocation", "method")) for r in results["runs"]}
    vocab = dense_model.config.vocab_size
    plan = [("dense", 0.0, "method")] + [(m, r, a) for r in ratios for m in args.methods for a in args.allocations]
    dense_run = next((r for r in results["runs"] if r["method"] == "dense"), None)
    for method, ratio, allocation in plan:
        label = "dense" if method == "dense" else f"{round(100 * ratio)}%"
        allowed = get_method_class(method).allowed_kwargs if method != "dense" else ()
        kwargs = {k: v for k, v in method_kwargs.items() if k in allowed}
        rule = kwargs.get("allocation", get_method_class(method).default_allocation) if method != "dense" else "-"
        if (method, label, allocation) in done or (allocation == "method" and rule == "uniform" and "uniform" in
                                                   args.allocations and method != "dense"):
            continue  # already measured (or the method's own rule is the uniform row)
        model = copy.deepcopy(dense_model) if method != "dense" else dense_model
        summary, prune_seconds, pruner = None, 0.0, None
        if method != "dense":
            extra = {}
            if allocation == "uniform":
                kwargs["allocation"] = rule = "uniform"
            elif allocation == "search":
                extra = {"allocation": "search", "allocation_kwargs": dict(search_kwargs)}
                if search_kwargs.get("state_dir"):  # one resumable state per run
                    extra["allocation_kwargs"]["state_dir"] = os.path.join(search_kwargs["state_dir"], f"{method}_{label[:-1]}")
                rule = f"search(init={search_kwargs.get('init', 'uniform')})"
            config = PruningConfig(method=method, sparsity=ratio, structure=args.structure, dataset=args.dataset,
                                   num_samples=args.num_samples, seq_len=args.seq_len, seed=args.seed,
                                   batch_size=args.batch_size, device=args.device, multiple_of=args.multiple_of,
                                   method_kwargs=kwargs, **extra)
            with timed() as t_prune:
                pruner = SparsePruner(config)
                pruner.apply(model, dataset=calib, progress=False)
            summary, prune_seconds = pruner.structured_summary, t_prune["wall"]
        with timed() as t_eval:
            ppl = perplexity(model, stream, args.eval_seq_len, windows)
        speed = None if args.no_speed else measure_speed(model, vocab, args.speed_seq_len, args.speed_repeats, args.device)
        run = {
            "method": method, "setting": label, "target": ratio,
            "achieved_prunable_fraction": summary["achieved_prunable_fraction"] if summary else 0.0,
            "achieved_model_fraction": summary["achieved_model_fraction"] if summary else 0.0,
            "model_params": model_params(model), "block_linear_params": block_params(model),
            "perplexity": ppl, "prune_seconds": round(prune_seconds, 2), "eval_seconds": round(t_eval["wall"], 2),
            "speed": speed, "loadavg_after": loadavg(),
            "layers": summary["layers"] if summary else None, "format": summary["format"] if summary else None,
            "allocation": allocation, "allocation_label": rule, "method_kwargs": kwargs,
        }
        alloc = pruner.allocation if pruner is not None else None
        if alloc is not None:  # kept fraction per module; for the search its settings, history, time and disk
            info = alloc.info
            run["kept_fraction"] = info["structured"]["kept_fraction"]
            if allocation == "search":
                run.update(search_kwargs={k: v for k, v in info.items() if k not in ("history", "structured")},
                           search_history=info["history"], search_seconds=info["seconds"],
                           search_disk_bytes=info["disk_bytes"], search_final_fitness=info["final_fitness"],
                           search_start_kept_groups=info["structured"]["start_kept_groups"])
        if method == "dense":
            dense_run = run
        elif speed and dense_run and dense_run.get("speed"):
            run["speedup_batch1"] = dense_run["speed"]["batch1"]["median_seconds"] / speed["batch1"]["median_seconds"]
            run["speedup_batch8"] = speed["batch8"]["tokens_per_second"] / dense_run["speed"]["batch8"]["tokens_per_second"]
        results["runs"].append(run)
        results["total_seconds"] = round(time.perf_counter() - started_all, 1)
        write_json(output, results)
        logger.info("%-17s %-5s %-22s ppl %8.3f params %.1fM prune %.0fs speed-up b1 %s b8 %s", method, label, rule, ppl,
                    run["model_params"] / 1e6, prune_seconds, run.get("speedup_batch1"), run.get("speedup_batch8"))
        if method != "dense":
            del model, pruner
        gc.collect()
    print(markdown_table(results))
    print(f"\nWrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
