"""Expert-channel pruning benchmark: the bundled SmolLM2-135M sparsely upcycled into a Mixtral (the same build as
`benchmarks/moe.py`: `optimum_sparse.upcycle.upcycle_to_mixtral`, every FFN copied into E experts, k-means routers),
then `structure="expert-channels"` at 25% / 50% of every expert's channels with the `wanda` and `fluctuation`
criteria. The upcycled experts start as equal copies, but each sees different tokens, so each keeps its own channels.

Every run restores the upcycled weights, prunes with `SparsePruner` on the wiki-offline calibration windows and records
perplexity on the held-out split, prune time, peak memory and parameter counts measured on the pruned model. Results:
`benchmarks/results/moe_expert_channels_<tag>.json`, rewritten after each run.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/moe_expert_channels.py --threads 1
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
from _common import (  # noqa: E402
    RESULTS_DIR, PeakMemory, add_upcycled_moe_args, calibration_ids, command_line, default_tag, evaluation_stream, git_info, loadavg,
    machine_info, perplexity, timed, write_json, REPO_ROOT,
)

sys.path.insert(0, REPO_ROOT)

logger = logging.getLogger("benchmarks.moe_expert_channels")

RUNS = ["25%-wanda", "25%-fluctuation", "50%-wanda", "50%-fluctuation"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_upcycled_moe_args(p)
    p.add_argument("--runs", nargs="+", default=RUNS, help="<fraction>-<criterion> runs, in order.")
    p.add_argument("--output", default=None, help="Output JSON.")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from _common import configure

    configure(args.threads)
    from optimum_sparse import PruningConfig, SparsePruner
    from optimum_sparse.models import load_model_and_tokenizer
    from optimum_sparse.upcycle import upcycle_to_mixtral

    tag = args.tag or default_tag("cpu")
    output = args.output or os.path.join(RESULTS_DIR, f"moe_expert_channels_{tag}.json")
    result = {"benchmark": "moe_expert_channels", "command": command_line(), "git": git_info(),
              "machine": machine_info("cpu"), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "settings": {"model": args.model, "upcycle": {"num_experts": args.experts, "top_k": args.top_k,
                                                            "seed": args.seed},
                           "calibration": {"dataset": "wiki-offline", "num_samples": args.num_samples,
                                           "seq_len": args.seq_len, "seed": args.seed},
                           "evaluation": {"dataset": "wiki-offline", "split": "evaluation",
                                          "seq_len": args.eval_seq_len, "max_windows": args.max_windows}},
              "runs": []}
    dense, tokenizer = load_model_and_tokenizer(args.model, dtype=torch.float32)
    dense.eval()
    calib = calibration_ids(tokenizer, args.num_samples, args.seq_len, args.seed)
    stream = evaluation_stream(tokenizer)
    windows = min(args.max_windows, (stream.numel() - 1) // args.eval_seq_len) if args.max_windows else None
    with timed() as t:
        moe, info = upcycle_to_mixtral(dense, calib, num_experts=args.experts, top_k=args.top_k, seed=args.seed,
                                       batch_size=args.batch_size)
    del dense
    with timed() as e:
        base = perplexity(moe, stream, args.eval_seq_len, windows)
    result["runs"].append({"label": "upcycled", "perplexity": base, "upcycle_seconds": round(t["wall"], 1),
                           "eval_seconds": round(e["wall"], 1), "rule": info["rule"],
                           "params": sum(p.numel() for p in moe.parameters()),
                           "intermediate_size": moe.config.intermediate_size})
    write_json(output, result)
    logger.info("upcycled: perplexity %.3f", base)
    for label in args.runs:
        fraction, criterion = label.split("-", 1)
        config = PruningConfig(method="expert-channels", structure="expert-channels",
                               sparsity=float(fraction.rstrip("%")) / 100, num_samples=args.num_samples,
                               seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed,
                               method_kwargs={"criterion": criterion})
        model = copy.deepcopy(moe)
        pruner = SparsePruner(config)
        before = loadavg()
        with PeakMemory("cpu") as memory, timed() as t:
            pruner.apply(model, dataset=calib, progress=False)
        summary = pruner.structured_summary
        with timed() as e:
            ppl = perplexity(model, stream, args.eval_seq_len, windows)
        result["runs"].append({
            "label": label, "criterion": criterion, "sparsity": config.sparsity, "perplexity": ppl,
            "base_perplexity": base, "prune_seconds": round(t["wall"], 1), "prune_cpu_seconds": round(t["cpu"], 1),
            "eval_seconds": round(e["wall"], 1), "memory": memory.to_dict(), "memory_method": memory.method,
            "loadavg_before": before, "loadavg_after": loadavg(),
            "channels_before": summary["channels_before"], "channels_after": summary["channels_after"],
            "config_intermediate_size": model.config.intermediate_size,
            "params": sum(p.numel() for p in model.parameters()),  # measured on the pruned model
            "removed_model_fraction": summary["achieved_model_fraction"],
            "removed_expert_fraction": summary["achieved_prunable_fraction"],
            "magnitude_fallback": summary["magnitude_fallback"]})
        write_json(output, result)
        logger.info("%s: perplexity %.3f (%d -> %d channels, %.1f s)", label, ppl, summary["channels_before"],
                    summary["channels_after"], t["wall"])
        del model, pruner
    for run in result["runs"]:
        print(f"{run['label']:>18}  ppl {run['perplexity']:8.3f}  params {run['params']:>11,}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sys.exit(main())
