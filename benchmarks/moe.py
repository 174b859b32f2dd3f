"""MoE benchmark: the bundled SmolLM2-135M sparsely upcycled into a Mixtral (E experts, top-k), then pruned.

1. `dense`: the SmolLM2-135M perplexity; `upcycled`: the Mixtral built by `optimum_sparse.upcycle.upcycle_to_mixtral`
   (every FFN copied into E experts, routers = centred spherical k-means centroids of the block's FFN inputs on the
   calibration windows), with its tokens per expert: it must match the dense perplexity (within 1%).
2. `<method>-<setting>-<stats>`: SparseGPT / SparseLLM at 50%, 70%, 2:4 with per-expert statistics from the routed
   tokens (`expert_statistics="routed"`) or pooled over all tokens (`"pooled"`); the weights' own zeros are counted
   (attention linears, every expert's projections; routers excluded).
3. `experts-<fraction>-<criterion>`: whole-expert removal (`structure="experts"`) of 25% / 50% of each block's experts.

Every run restores the upcycled weights, prunes with `SparsePruner` on the same wiki-offline calibration windows and
records perplexity on the held-out split (`--max-windows` windows of `--eval-seq-len` tokens), prune time and peak
memory. Results go to `benchmarks/results/moe_<tag>.json`, rewritten atomically after each run; `--resume` keeps the
runs already there with the same settings.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/moe.py --threads 1 --resume
    python benchmarks/moe.py --runs dense upcycled experts-25%-contribution --max-windows 4 --output /tmp/moe.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import sys
import time
from datetime import datetime, timezone

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    RESULTS_DIR, PeakMemory, add_upcycled_moe_args, calibration_ids, command_line, default_tag, evaluation_stream, git_info, loadavg,
    machine_info, parse_setting, perplexity, timed, write_json, REPO_ROOT,
)

sys.path.insert(0, REPO_ROOT)  # this checkout's package (the one `git` in the result names), not another install

logger = logging.getLogger("benchmarks.moe")

# SparseGPT first, SparseLLM last (slowest): a grid cut short keeps the cheaper comparisons
# (on the fresh upcycled model the experts are equal copies, so removing some is lossless; after a routed pruning run
# they differ, and the removal criteria are compared there)
RUNS = (["dense", "upcycled", "experts-25%-contribution", "sparsegpt-50%-routed"]
        + [f"experts-50%-{c}@sparsegpt-50%-routed" for c in ("contribution", "frequency")]
        + [f"sparsegpt-{s}-{stats}" for s in ("50%", "2:4", "70%") for stats in ("pooled", "routed")
           if (s, stats) != ("50%", "routed")]
        + ["experts-50%-contribution"]
        + [f"sparsellm-{s}-{stats}" for s in ("50%", "2:4", "70%") for stats in ("routed", "pooled")])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_upcycled_moe_args(p)
    p.add_argument("--runs", nargs="+", default=RUNS, help="Runs, in order (default: the whole grid).")
    p.add_argument("--output", default=None, help="Output JSON (default benchmarks/results/moe_<tag>.json).")
    p.add_argument("--resume", action="store_true", help="Keep runs already in the output with the same settings.")
    return p


def weight_sparsity(model) -> dict:
    """Zeros counted on the weights: attention/dense linears and every expert projection of the decoder blocks
    (routers excluded, they are never pruned), and each part on its own."""
    from optimum_sparse.engine.architectures import find_blocks

    parts = {"experts": [0, 0], "linears": [0, 0]}
    for block in find_blocks(model):
        for name, param in block.named_parameters():
            if name.endswith(("gate.weight", "router.weight")) or param.dim() < 2:
                continue
            key = "experts" if param.dim() == 3 else "linears"
            parts[key][0] += int((param == 0).sum())
            parts[key][1] += param.numel()
    total = [sum(v[0] for v in parts.values()), sum(v[1] for v in parts.values())]
    out = {k: (z / n if n else None) for k, (z, n) in parts.items()}
    out["all"] = total[0] / total[1] if total[1] else None
    out["params_counted"] = total[1]
    return out


def parse_run(label: str) -> dict:
    """`dense`, `upcycled`, `<method>-<setting>-<routed|pooled>`, `experts-<fraction>-<criterion>`, or an expert removal
    applied after a pruning run: `experts-<fraction>-<criterion>@<method>-<setting>-<stats>`."""
    if label in ("dense", "upcycled"):
        return {"kind": label}
    if "@" in label:
        removal, _, base = label.partition("@")
        run = parse_run(removal)
        if run["kind"] != "experts" or parse_run(base)["kind"] != "prune":
            raise ValueError(f"Run {label!r}: expected experts-<fraction>-<criterion>@<pruning run>.")
        return {**run, "after": base}
    head, setting, tail = label.split("-", 2) if label.count("-") >= 2 else (label, "", "")
    if head == "experts":
        return {"kind": "experts", "sparsity": parse_setting(setting)[1], "criterion": tail}
    structure, sparsity = parse_setting(setting)
    if tail not in ("routed", "pooled"):
        raise ValueError(f"Run {label!r}: statistics must be 'routed' or 'pooled'.")
    return {"kind": "prune", "method": head, "structure": structure, "sparsity": sparsity, "statistics": tail}


def pruning_config(run: dict, args):
    from optimum_sparse import PruningConfig

    common = dict(num_samples=args.num_samples, seq_len=args.seq_len, seed=args.seed, batch_size=args.batch_size)
    if run["kind"] == "experts":
        return PruningConfig(method="expert-removal", structure="experts", sparsity=run["sparsity"],
                             method_kwargs={"criterion": run["criterion"]}, **common)
    fields = {f.name for f in dataclasses.fields(PruningConfig)}
    if "expert_statistics" not in fields:
        raise RuntimeError("This checkout cannot prune fused experts (no PruningConfig.expert_statistics): merge "
                           "the MoE engine first.")
    return PruningConfig(method=run["method"], sparsity=run["sparsity"], structure=run["structure"],
                         expert_statistics=run["statistics"], **common)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from _common import configure

    configure(args.threads)
    from optimum_sparse import SparsePruner
    from optimum_sparse.models import load_model_and_tokenizer
    from optimum_sparse.upcycle import upcycle_to_mixtral

    tag = args.tag or default_tag("cpu")
    output = args.output or os.path.join(RESULTS_DIR, f"moe_{tag}.json")
    runs_requested = [(label, parse_run(label)) for label in args.runs]
    settings = {"model": args.model, "upcycle": {"num_experts": args.experts, "top_k": args.top_k, "seed": args.seed},
                "calibration": {"dataset": "wiki-offline", "split": "calibration", "num_samples": args.num_samples,
                                "seq_len": args.seq_len, "seed": args.seed, "batch_size": args.batch_size},
                "evaluation": {"dataset": "wiki-offline", "split": "evaluation", "seq_len": args.eval_seq_len,
                               "max_windows": args.max_windows}}
    result = {"benchmark": "moe", "command": command_line(), "git": git_info(), "machine": machine_info("cpu"),
              "settings": settings, "runs": []}
    if args.resume and os.path.isfile(output):
        with open(output, encoding="utf-8") as f:
            previous = json.load(f)
        earlier = copy.deepcopy(previous.get("settings") or {})
        (earlier.get("evaluation") or {}).pop("windows", None)  # derived from max_windows, added below
        if earlier == settings:
            result["runs"] = previous["runs"]
            result["earlier_commands"] = previous.get("earlier_commands", []) + [previous.get("command")]
        else:
            logger.warning("Settings differ from %s: starting a new result file.", output)
    done = {r["label"] for r in result["runs"]}
    result["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")

    started = time.perf_counter()
    dense, tokenizer = load_model_and_tokenizer(args.model, dtype=torch.float32)
    dense.eval()
    result["model_load_seconds"] = round(time.perf_counter() - started, 1)
    calib = calibration_ids(tokenizer, args.num_samples, args.seq_len, args.seed)
    stream = evaluation_stream(tokenizer)
    windows = min(args.max_windows, (stream.numel() - 1) // args.eval_seq_len) if args.max_windows else None
    settings["evaluation"]["windows"] = windows

    def record(entry: dict) -> None:
        entry["loadavg_after"] = loadavg()
        result["runs"] = [r for r in result["runs"] if r["label"] != entry["label"]] + [entry]
        write_json(output, result)
        logger.info("%s: %s", entry["label"], {k: entry[k] for k in ("perplexity", "prune_seconds") if k in entry})

    if "dense" in dict(runs_requested) and "dense" not in done:
        with timed() as t:
            ppl = perplexity(dense, stream, args.eval_seq_len, windows)
        record({"label": "dense", "perplexity": ppl, "eval_seconds": round(t["wall"], 1), "params":
                sum(p.numel() for p in dense.parameters())})
    with timed() as t:
        moe, info = upcycle_to_mixtral(dense, calib, num_experts=args.experts, top_k=args.top_k, seed=args.seed,
                                       batch_size=args.batch_size)
    upcycle_seconds = round(t["wall"], 1)
    del dense
    moe_state = {k: v.detach().clone() for k, v in moe.state_dict().items()}
    if "upcycled" in dict(runs_requested) and "upcycled" not in done:
        with timed() as t:
            ppl = perplexity(moe, stream, args.eval_seq_len, windows)
        dense_ppl = next((r["perplexity"] for r in result["runs"] if r["label"] == "dense"), None)
        counts = info["tokens_per_expert"]
        shares = [[c / sum(block) for c in block] for block in counts]
        record({"label": "upcycled", "perplexity": ppl, "eval_seconds": round(t["wall"], 1),
                "upcycle_seconds": upcycle_seconds, "rule": info["rule"],
                "relative_to_dense": (ppl / dense_ppl - 1) if dense_ppl else None,
                "tokens_per_expert": counts, "min_share": min(min(s) for s in shares),
                "max_share": max(max(s) for s in shares), "params": sum(p.numel() for p in moe.parameters())})

    def run_one(label: str, run: dict, base_state: dict, base_ppl=None) -> None:
        try:
            config = pruning_config(run, args)
        except RuntimeError as err:
            logger.error("%s skipped: %s", label, err)
            return
        moe.load_state_dict(base_state)
        model = copy.deepcopy(moe) if run["kind"] == "experts" else moe
        pruner = SparsePruner(config)
        before = loadavg()
        with PeakMemory("cpu") as memory, timed() as t:
            pruner.apply(model, dataset=calib, progress=False)
        entry = {"label": label, **run, "prune_seconds": round(t["wall"], 1), "prune_cpu_seconds": round(t["cpu"], 1),
                 "memory": memory.to_dict(), "memory_method": memory.method, "loadavg_before": before,
                 "weight_sparsity": weight_sparsity(model)}
        if run["kind"] == "experts":
            summary = pruner.structured_summary
            entry.update({"experts_after": summary["experts_after"], "params": summary["model_params_after"],
                          "removed_model_fraction": summary["achieved_model_fraction"],
                          "removed_experts": list(summary["removed_experts"].values())})
        else:
            entry["report_mean_sparsity"] = pruner.report.mean_sparsity
        with timed() as e:
            entry["perplexity"] = perplexity(model, stream, args.eval_seq_len, windows)
        entry["eval_seconds"] = round(e["wall"], 1)
        if base_ppl is not None:
            entry["base_perplexity"] = base_ppl
        record(entry)
        del model, pruner

    after = {}  # pruning run -> the expert removals to apply to its pruned model
    for label, run in runs_requested:
        if run.get("after") and label not in done:
            after.setdefault(run["after"], []).append((label, run))
    for label, run in runs_requested:
        if run["kind"] in ("dense", "upcycled") or run.get("after") or (label in done and label not in after):
            continue
        if label not in done:
            run_one(label, run, moe_state)
        if label in after:  # experts made different by the pruning: removal is no longer lossless
            if label in done:  # an earlier process pruned it: prune again to get its weights
                run_one(label, run, moe_state)
            pruned_state = {k: v.detach().clone() for k, v in moe.state_dict().items()}
            base_ppl = next(r["perplexity"] for r in result["runs"] if r["label"] == label)
            for removal_label, removal in after[label]:
                run_one(removal_label, removal, pruned_state, base_ppl)
            del pruned_state
    print(table(result))
    return 0


def table(result: dict) -> str:
    lines = ["| run | perplexity | prune s | peak RSS MiB | zeros (all / experts) |", "|---|---:|---:|---:|---:|"]
    for r in result["runs"]:
        ws = r.get("weight_sparsity") or {}
        zeros = f"{ws['all']:.3f} / {ws['experts']:.3f}" if ws.get("experts") is not None else ""
        peak = (r.get("memory") or {}).get("peak_rss_mib", "")
        lines.append(f"| {r['label']} | {r['perplexity']:.3f} | {r.get('prune_seconds', '')} | {peak} | {zeros} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
