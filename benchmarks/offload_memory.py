"""Peak memory of pruning a model larger than the memory it may use: a random Llama written to disk, its blocks
disk-offloaded by accelerate, pruned one onloaded block at a time.

    python benchmarks/offload_memory.py --hidden 1536 --intermediate 4096 --layers 20 --method wanda
    # -> benchmarks/results/offload_memory_<tag>.json

The model is generated shard by shard (one block's tensors in memory at a time), saved as safetensors, and loaded with
`device_map` = embeddings/norm/lm_head on the CPU, every decoder block on "disk". The report compares the pruning
run's peak resident memory with the model's size and with one block's size.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import REPO_ROOT, PeakMemory, command_line, default_tag, git_info, machine_info, write_json  # noqa: E402

logger = logging.getLogger("benchmarks.offload_memory")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--method", default="wanda")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workdir", default=None, help="Where the random checkpoint and offload folder go (default: tmp).")
    p.add_argument("--tag", default=None)
    p.add_argument("--output", default=None)
    return p


def write_random_checkpoint(folder: str, config) -> int:
    """Writes a random-weight checkpoint one block per shard; returns its size in bytes."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    shards, index = {}, {}
    for name, param in skeleton.state_dict().items():
        key = name.split(".layers.")[1].split(".")[0] if ".layers." in name else "rest"
        shards.setdefault(key, []).append((name, param.shape))
    generator = torch.Generator().manual_seed(0)
    total = 0
    for key, entries in shards.items():
        file = f"model-{key}.safetensors"
        tensors = {}
        for name, shape in entries:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape)
            else:
                tensors[name] = torch.randn(shape, generator=generator) * 0.02
            index[name] = file
        save_file(tensors, os.path.join(folder, file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": index}, f)
    config.save_pretrained(folder)
    return total


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, LlamaConfig

    from optimum_sparse import PruningConfig, SparsePruner

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                         tie_word_embeddings=False)
    workdir = args.workdir or tempfile.mkdtemp(prefix="offload-bench-")
    checkpoint, offload = os.path.join(workdir, "model"), os.path.join(workdir, "offload")
    os.makedirs(checkpoint, exist_ok=True)
    started = time.perf_counter()
    model_bytes = write_random_checkpoint(checkpoint, config)
    logger.info("Random checkpoint: %.2f GiB in %.0fs", model_bytes / 2**30, time.perf_counter() - started)
    block_params = 4 * args.hidden * args.hidden + 3 * args.hidden * args.intermediate
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "disk" for i in range(args.layers)}}

    with PeakMemory() as load_memory:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, device_map=device_map,
                                                     offload_folder=offload)
    ids = torch.randint(0, args.vocab, (args.num_samples, args.seq_len), generator=torch.Generator().manual_seed(1))
    pruner = SparsePruner(PruningConfig(method=args.method, sparsity=args.sparsity, num_samples=args.num_samples,
                                        seq_len=args.seq_len, batch_size=1))
    t0, c0 = time.perf_counter(), time.process_time()
    with PeakMemory() as prune_memory:
        pruner.apply(model, dataset=ids)
    prune_seconds, prune_cpu = time.perf_counter() - t0, time.process_time() - c0
    layer = model.model.layers[args.layers - 1].mlp.down_proj
    stored = layer._hf_hook.weights_map["weight"]
    sparsity_last = float((stored == 0).float().mean())

    results = {
        "benchmark": "offload_memory",
        "command": command_line(),
        "git": git_info(),
        "machine": machine_info(),
        "model": {"config": {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                               "num_attention_heads", "vocab_size")},
                  "dtype": "float32", "checkpoint_gib": round(model_bytes / 2**30, 3),
                  "one_block_mib": round(block_params * 4 / 2**20, 1),
                  "cpu_resident_parts_mib": round(2 * args.vocab * args.hidden * 4 / 2**20, 1),
                  "device_map": "embed_tokens, norm, lm_head: cpu; every decoder block: disk"},
        "calibration": {"num_samples": args.num_samples, "seq_len": args.seq_len, "random_ids": True,
                        "activations_mib": round(args.num_samples * args.seq_len * args.hidden * 4 / 2**20, 1)},
        "method": args.method, "sparsity": args.sparsity,
        "load_memory": load_memory.to_dict(),
        "prune_memory": prune_memory.to_dict(),
        "prune_seconds": round(prune_seconds, 1), "prune_cpu_seconds": round(prune_cpu, 1),
        "stored_sparsity_of_last_down_proj": sparsity_last,
        "peak_over_model_size": round(prune_memory.peak / model_bytes, 3),
    }
    output = args.output or os.path.join(REPO_ROOT, "benchmarks", "results",
                                         f"offload_memory_{args.tag or default_tag()}.json")
    write_json(output, results)
    print(json.dumps({k: results[k] for k in ("model", "prune_memory", "prune_seconds", "peak_over_model_size")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
