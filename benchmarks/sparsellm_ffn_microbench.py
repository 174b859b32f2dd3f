"""Times `solve_ffn` alone on one random SmolLM2-sized gated FFN (d=576, f=1536, SiLU), one thread.

    python benchmarks/sparsellm_ffn_microbench.py --tokens 16384 --iterations 1 --sparsity 0.7

Prints the CPU seconds of the solve and the FFN output error history; used for the per-change timings in
docs/sparsellm.md "Speed" (run it at two commits to compare).
"""

import argparse
import time

import torch
import torch.nn.functional as F

from optimum_sparse.methods.sparsegpt import sparsegpt_prune
from optimum_sparse.methods.sparsellm import FFNProblem, solve_ffn


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--iterations", type=int, default=1)
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--chunk-tokens", type=int, default=8192)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    d, f = 576, 1536
    x = torch.randn(args.tokens, d)
    w_gate, w_up, w_down = torch.randn(f, d) / 24, torch.randn(f, d) / 24, torch.randn(d, f) / 40
    problem = FFNProblem(list(torch.split(x, args.chunk_tokens)), None, torch.cat([w_gate, w_up]), None, w_down, None,
                         F.silu, True)

    def prune(weight, hessian):
        return sparsegpt_prune(weight, hessian, args.sparsity, None, 128, 0.01)

    start = time.process_time()
    result = solve_ffn(problem, prune, prune, torch.device("cpu"), iterations=args.iterations)
    seconds = time.process_time() - start
    print(f"solve_ffn: {seconds:.2f} CPU s; FFN error history {[round(e, 5) for e in result.history]} ({result.best})")


if __name__ == "__main__":
    main()
