"""Equivalence check of the redesign (issue 20): the same prunings before and after a refactor must give the same
weights, bit for bit.

Prunes the bundled SmolLM2-135M (float32, CPU) with SparseGPT 70%, SparseLLM 70% and StructPrune 30% on a small
fixed calibration (wiki-offline, 16 x 256 tokens, seed 0 by default), and writes per run the held-out perplexity
(16 windows of 256 tokens) and a sha256 over the pruned state_dict (names, shapes, dtypes and raw bytes in name
order). Run it at the base commit and at the end of a refactor with the same command; equal hashes mean equal
weights.

    OMP_NUM_THREADS=1 python benchmarks/equivalence.py --threads 1 --output benchmarks/results/equivalence_base.json
    OMP_NUM_THREADS=1 python benchmarks/equivalence.py --threads 1 --output benchmarks/results/equivalence_after.json
    python benchmarks/equivalence.py --compare benchmarks/results/equivalence_base.json benchmarks/results/equivalence_after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from datetime import datetime, timezone

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's optimum_sparse
from _common import (  # noqa: E402
    RESULTS_DIR, calibration_ids, command_line, evaluation_stream, git_info, loadavg, machine_info, perplexity,
    write_json,
)

logger = logging.getLogger("benchmarks.equivalence")

RUNS = [
    ("sparsegpt", "unstructured", 0.7),
    ("sparsellm", "unstructured", 0.7),
    ("structprune", "channels+heads", 0.3),
]


def state_digest(model: torch.nn.Module) -> str:
    """sha256 over (name, shape, dtype, bytes) of every state_dict entry, in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def compare(a_path: str, b_path: str, output: str = None, labels: tuple = ("before", "after")) -> int:
    """Prints (and with `output` writes) per method whether the two runs' state hashes are equal."""
    with open(a_path, encoding="utf-8") as f:
        a = {r["method"]: r for r in json.load(f)["runs"]}
    with open(b_path, encoding="utf-8") as f:
        b = {r["method"]: r for r in json.load(f)["runs"]}
    rows = []
    for method in sorted(set(a) | set(b)):
        ra, rb = a.get(method), b.get(method)
        # a method run on one side only is "not run" (equal: None), neither equal nor different
        equal = None if ra is None or rb is None else ra["state_sha256"] == rb["state_sha256"]
        rows.append({"method": method, "equal": equal,
                     "state_sha256": {labels[0]: ra and ra["state_sha256"], labels[1]: rb and rb["state_sha256"]},
                     "perplexity": {labels[0]: ra and ra["perplexity"], labels[1]: rb and rb["perplexity"]}})
        status = {True: "equal", False: "DIFFERENT", None: "not run on both sides"}[equal]
        print(f"{method:12s} {status}  ppl {rows[-1]['perplexity']}")
    if output:
        write_json(output, {"benchmark": "equivalence-compare", "command": command_line(),
                            "files": {labels[0]: a_path, labels[1]: b_path}, "runs": rows})
    compared = [r for r in rows if r["equal"] is not None]
    return 0 if compared and all(r["equal"] for r in compared) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", nargs="+", default=[m for m, _, _ in RUNS])
    p.add_argument("--output", default=os.path.join(RESULTS_DIR, "equivalence.json"))
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="Compare two result files and exit.")
    p.add_argument("--labels", nargs=2, default=("before", "after"), help="Names of the two sides in --compare "
                   "(e.g. the commits whose trees made them).")
    p.add_argument("--compare-output", default=None, help="With --compare: also write the comparison as JSON.")
    p.add_argument("--source-commit", default=None,
                   help="The commit whose tree runs (recorded; for runs from an exported copy without .git).")
    args = p.parse_args(argv)
    if args.compare:
        return compare(*args.compare, output=args.compare_output, labels=tuple(args.labels))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("optimum_sparse").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    from optimum_sparse import PruningConfig, SparsePruner
    from optimum_sparse.models import load_model_and_tokenizer

    results = {
        "benchmark": "equivalence",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "git": git_info(),
        "source_commit": args.source_commit,
        "machine": {**machine_info("cpu"), "label": "cpu-2c, shared load"},
        "settings": {"model": args.model, "dtype": "float32", "calibration": {
            "dataset": "wiki-offline", "num_samples": args.num_samples, "seq_len": args.seq_len, "seed": args.seed},
            "evaluation": {"dataset": "wiki-offline", "split": "evaluation", "seq_len": args.eval_seq_len,
                           "windows": args.max_windows}},
        "runs": [],
    }
    for method, structure, sparsity in RUNS:
        if method not in args.methods:
            continue
        model, tokenizer = load_model_and_tokenizer(args.model, dtype=torch.float32)
        model.eval()
        calib = calibration_ids(tokenizer, args.num_samples, args.seq_len, args.seed)
        stream = evaluation_stream(tokenizer)
        config = PruningConfig(method=method, sparsity=sparsity, structure=structure, num_samples=args.num_samples,
                               seq_len=args.seq_len, seed=args.seed, device="cpu")
        started = time.perf_counter()
        SparsePruner(config).apply(model, dataset=calib, progress=False)
        prune_seconds = time.perf_counter() - started
        run = {"method": method, "structure": structure, "sparsity": sparsity, "state_sha256": state_digest(model),
               "perplexity": perplexity(model, stream, args.eval_seq_len, args.max_windows),
               "prune_seconds": round(prune_seconds, 2), "loadavg_after": loadavg()}
        logger.info("%s: ppl %.4f sha256 %s (%.0fs)", method, run["perplexity"], run["state_sha256"][:16], prune_seconds)
        results["runs"].append(run)
        write_json(args.output, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
