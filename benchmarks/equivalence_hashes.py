"""Bit-equality hashes of fixed tiny runs, to compare two commits (issue 20: "results bit for bit unchanged").

Run from a checkout's root: `OMP_NUM_THREADS=1 python3 benchmarks/equivalence_hashes.py --out FILE`. Prints (and writes)
`{case: sha256}` of the pruned weights (plus ADMM state/metrics for ELSA, the recorded settings for the search):
two ELSA runs through `SparsePruner`, two plain-loop ADMM optimizer runs (fused-expert slices with ELSA-L states;
N:M with an exponential λ schedule), and a structured search (StructPrune, channels+heads, 30%). One thread.
"""

import argparse
import hashlib
import json
import os
import sys

sys.path.insert(0, os.getcwd())

import torch  # noqa: E402

torch.set_num_threads(1)

from optimum_sparse import PruningConfig, SparsePruner  # noqa: E402
from tests.helpers import make_ids, make_model  # noqa: E402
from tests.methods import test_elsa_equivalence as elsa  # noqa: E402


def structured_search() -> str:
    model = make_model("llama")
    config = PruningConfig(method="structprune", sparsity=0.3, structure="channels+heads", num_samples=8, seq_len=16,
                           batch_size=4, allocation="search",
                           allocation_kwargs=dict(generations=2, rounds=1, offspring=4, survivors=2, levels=1))
    pruner = SparsePruner(config)
    pruner.apply(model, dataset=make_ids(8, 16), progress=False)
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().float().contiguous().numpy().tobytes())
    info = {k: v for k, v in pruner.report.allocation["info"].items() if k not in ("seconds", "disk_bytes", "history")}
    h.update(json.dumps(info, sort_keys=True, default=str).encode())
    return h.hexdigest()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON file to write")
    args = parser.parse_args()
    slices = dict(sparsities=[0.5, 0.6, 0.55], interval=2, penalty=0.1, low_memory=True, projection="second_moment",
                  slices={"w2": {"sparsities": [0.5, 0.6, 0.55], "transposed": False}})
    nm = dict(sparsities=[0.5, 0.25], nm=(2, 4), interval=3, penalty=0.2, penalty_init=0.01,
              penalty_schedule="exponential", total_steps=9, alpha=1.5)
    out = {
        "elsa_llama_global_second_moment": elsa.run_pruner("llama", "unstructured", 0.7, budget="global",
                                                           projection="second_moment"),
        "elsa_gpt2_2:4_cosine": elsa.run_pruner("gpt2", "2:4", 0.5, penalty_init=0.01, penalty_schedule="cosine"),
        "admm_plain_loop_slices_low_memory": elsa.run_plain_loop(slices, [(8, 16), (16, 8), (3, 8, 16)], (1,)),
        "admm_plain_loop_nm_exponential": elsa.run_plain_loop(nm, [(8, 16), (16, 8)], (1,)),
        "structured_search_structprune": structured_search(),
    }
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
