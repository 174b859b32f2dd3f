"""Prune with several processes: calibration windows split across ranks, statistics all-reduced.

    torchrun --nproc-per-node 2 examples/prune_distributed.py --model smollm2-135m --method sparsegpt --sparsity 0.5
    # or: accelerate launch --num_processes 2 examples/prune_distributed.py ...

Uses NCCL (one GPU per rank) when CUDA is available, else gloo on the CPU. Every rank prunes the same model and ends
with the same weights; rank 0 evaluates and saves.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch
import torch.distributed as dist

from optimum_sparse import PruningConfig, SparsePruner, evaluate_perplexity, load_model_and_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="sparsegpt")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=20)
    p.add_argument("--output", default=None)
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING)
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    model, tokenizer = load_model_and_tokenizer(args.model, dtype="float32")
    if cuda:
        model.to(torch.cuda.current_device())
    config = PruningConfig(method=args.method, sparsity=args.sparsity, num_samples=args.num_samples, seq_len=args.seq_len)
    SparsePruner(config).apply(model, tokenizer=tokenizer)  # each rank: num_samples / world_size windows
    if rank == 0:
        ppl = evaluate_perplexity(model, tokenizer, "wiki-offline", 512, max_windows=args.eval_windows)
        logging.getLogger(__name__).info("pruned perplexity %.3f with %d processes", ppl, dist.get_world_size())
        if args.output:
            model.save_pretrained(args.output)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
