"""Cost of pruning a mixture-of-experts model per expert: time, peak memory, and what the report measures.

    python benchmarks/moe_cost.py --threads 1      # -> benchmarks/results/moe_cost_<tag>.json

A random Qwen3-MoE-shaped model (no MoE checkpoint can be fetched here; the perplexity benchmark on an upcycled
SmolLM2 is separate work) is pruned with each method, per-expert ("routed") and pooled statistics.
Every figure is measured: wall and CPU time, peak resident memory (VmHWM), the sparsity counted on the weights over
every target matrix and per expert (min/max), the share of the model's parameters pruned, the spread of routed tokens
per expert, and the relative error of the final hidden states against the dense model on held-out random tokens (a
reconstruction proxy on a random model, not a quality claim).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    RESULTS_DIR, PeakMemory, command_line, configure, default_tag, git_info, loadavg, machine_info, timed, write_json,
)

logger = logging.getLogger("benchmarks.moe_cost")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--moe-intermediate", type=int, default=256)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--runs", nargs="*", default=["magnitude:routed", "wanda:routed", "sparsegpt:routed",
                                                   "sparsegpt:pooled", "sparsellm:routed", "sparsellm:pooled",
                                                   "sparsegpt:routed:1", "sparsellm:routed:1"],
                   help="method:statistics[:min_expert_tokens] (default threshold: the hidden size)")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tag", default=None)
    p.add_argument("--output", default=None)
    return p


def build_model(args):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen3_moe", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        moe_intermediate_size=args.moe_intermediate, num_experts=args.experts, num_experts_per_tok=args.top_k,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4, head_dim=args.hidden // 8,
        max_position_embeddings=2 * args.seq_len)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@torch.no_grad()
def final_hidden(model, ids):
    return torch.cat([model(ids[i:i + 4], output_hidden_states=True).hidden_states[-1] for i in range(0, len(ids), 4)])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    configure(args.threads)
    from optimum_sparse import PruningConfig, SparsePruner

    generator = torch.Generator().manual_seed(0)
    calib = torch.randint(0, args.vocab, (args.num_samples, args.seq_len), generator=generator)
    held_out = torch.randint(0, args.vocab, (8, args.seq_len), generator=generator)
    dense = build_model(args)
    reference = final_hidden(dense, held_out)
    results = []
    for run in args.runs:
        method, statistics, *rest = run.split(":")
        min_tokens = int(rest[0]) if rest else None
        model = build_model(args)
        config = PruningConfig(method=method, sparsity=args.sparsity, num_samples=args.num_samples,
                               seq_len=args.seq_len, batch_size=4, expert_statistics=statistics,
                               min_expert_tokens=min_tokens)
        pruner = SparsePruner(config)
        with PeakMemory() as memory, timed() as clock:
            pruner.apply(model, dataset=calib, progress=False)
        error = float((final_hidden(model, held_out) - reference).norm() / reference.norm())
        experts = [r for r in pruner.report.layers if ".experts." in r.name]
        tokens = [r.extra["routed_tokens"] for r in experts if "routed_tokens" in r.extra]
        inventory = pruner.report.inventory
        row = {
            "method": method, "expert_statistics": statistics, "min_expert_tokens": min_tokens, "sparsity": args.sparsity,
            "seconds_wall": round(clock["wall"], 2), "seconds_cpu": round(clock["cpu"], 2), **memory.to_dict(),
            "measured_sparsity": inventory["sparsity"], "pruned_share": inventory["pruned_share"],
            "expert_matrices": len(experts),
            "expert_sparsity_min": min(r.extra["measured_sparsity"] for r in experts),
            "expert_sparsity_max": max(r.extra["measured_sparsity"] for r in experts),
            "routed_tokens_min": min(tokens) if tokens else None, "routed_tokens_max": max(tokens) if tokens else None,
            "fallbacks": sum("fallback" in r.extra for r in experts),
            "solvers": sorted({r.extra.get("solver", method) for r in experts}),
            "skipped_reasons": inventory["skipped_reasons"],
            "final_hidden_relative_error": error,
        }
        logger.info("%s", row)
        results.append(row)
    out = args.output or os.path.join(RESULTS_DIR, f"moe_cost_{args.tag or default_tag()}.json")
    write_json(out, {"command": command_line(), "machine": machine_info(), "git": git_info(), "loadavg": loadavg(),
                     "model": {k: getattr(args, k) for k in ("hidden", "moe_intermediate", "experts", "top_k",
                                                             "layers", "vocab")},
                     "calibration": {"num_samples": args.num_samples, "seq_len": args.seq_len, "tokens": "random"},
                     "runs": results})
    for r in results:
        print(f"{r['method']:>10} {r['expert_statistics']:>7} {str(r['min_expert_tokens']):>4}  {r['seconds_wall']:7.1f} s  "
              f"+{r['peak_rss_increase_mib']:7.1f} MiB  sparsity {r['measured_sparsity']:.4f}  "
              f"share {r['pruned_share']:.3f}  error {r['final_hidden_relative_error']:.4f}")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
