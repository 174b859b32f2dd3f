"""1 vs N processes: the same SparseGPT run on SmolLM2-135M launched with torchrun (gloo on CPU, NCCL on GPU).

    python benchmarks/distributed.py --processes 1 2 --num-samples 16 --seq-len 256
    # -> benchmarks/results/distributed_<tag>.json

For each process count the driver launches `torchrun --nproc-per-node N` on this file (`--worker`); every rank records
its prune time, CPU time and peak resident memory, rank 0 the perplexity and a digest of the pruned weights, and the
driver checks that every run pruned the same weights (masks identical, values within float tolerance).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import REPO_ROOT, PeakMemory, command_line, default_tag, git_info, machine_info, write_json  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--method", default="sparsegpt")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-windows", type=int, default=20)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # output folder, set by the driver
    p.add_argument("--tag", default=None)
    p.add_argument("--output", default=None)
    return p


def worker(args) -> None:
    import torch.distributed as dist

    from optimum_sparse import PruningConfig, SparsePruner, evaluate_perplexity, load_model_and_tokenizer

    torch.set_num_threads(1)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    model, tokenizer = load_model_and_tokenizer("smollm2-135m", dtype="float32")
    config = PruningConfig(method=args.method, sparsity=args.sparsity, num_samples=args.num_samples,
                           seq_len=args.seq_len)
    ids = SparsePruner(config).prepare_calibration(model, tokenizer)
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    with PeakMemory() as memory:
        SparsePruner(config).apply(model, dataset=ids, progress=False)
    out = {"rank": rank, "prune_seconds": round(time.perf_counter() - t0, 1),
           "prune_cpu_seconds": round(time.process_time() - c0, 1), "memory": memory.to_dict(),
           "windows_on_this_rank": len(range(rank, ids.shape[0], dist.get_world_size()))}
    if rank == 0:
        out["perplexity"] = evaluate_perplexity(model, tokenizer, "wiki-offline", 512, max_windows=args.max_windows,
                                                progress=False)
        torch.save({k: v for k, v in model.state_dict().items() if k.endswith("proj.weight")},
                   os.path.join(args.worker, "weights.pt"))
    with open(os.path.join(args.worker, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    runs, reference = [], None
    for n in args.processes:
        folder = tempfile.mkdtemp(prefix=f"dist{n}-")
        cmd = ["torchrun", "--standalone", f"--nproc-per-node={n}", os.path.abspath(__file__), "--worker", folder,
               "--method", args.method, "--sparsity", str(args.sparsity), "--num-samples", str(args.num_samples),
               "--seq-len", str(args.seq_len), "--max-windows", str(args.max_windows)]
        started = time.perf_counter()
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        ranks = [json.load(open(os.path.join(folder, f"rank{r}.json"))) for r in range(n)]
        weights = torch.load(os.path.join(folder, "weights.pt"))
        run = {"processes": n, "wall_seconds_incl_startup": round(time.perf_counter() - started, 1), "ranks": ranks,
               "perplexity": ranks[0]["perplexity"]}
        if reference is None:
            reference = weights
        else:
            run["weights_equal_to_first_run"] = all(torch.equal(weights[k], reference[k]) for k in reference)
            run["masks_equal_to_first_run"] = all(torch.equal(weights[k] == 0, reference[k] == 0) for k in reference)
            run["mask_agreement_with_first_run"] = (sum(int(((weights[k] == 0) == (reference[k] == 0)).sum())
                                                        for k in reference) / sum(v.numel() for v in reference.values()))
            run["max_abs_weight_difference_to_first_run"] = max(float((weights[k] - reference[k]).abs().max())
                                                                 for k in reference)
        logging.info("%d process(es): prune %s s, peak RSS %s MiB, ppl %.3f", n,
                     [r["prune_seconds"] for r in ranks], [r["memory"]["peak_rss_mib"] for r in ranks],
                     run["perplexity"])
        runs.append(run)
    results = {"benchmark": "distributed", "command": command_line(), "git": git_info(), "machine": machine_info(),
               "settings": {"model": "smollm2-135m", "method": args.method, "sparsity": args.sparsity,
                            "num_samples": args.num_samples, "seq_len": args.seq_len, "eval_windows": args.max_windows,
                            "threads_per_process": 1},
               "runs": runs}
    output = args.output or os.path.join(REPO_ROOT, "benchmarks", "results", f"distributed_{args.tag or default_tag()}.json")
    write_json(output, results)
    print(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
