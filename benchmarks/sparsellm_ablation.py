"""SparseLLM ablation on the bundled SmolLM2-135M: several runs, one after the other, on the same calibration tokens.

Results of the development runs: `benchmarks/results/sparsellm_ablation_cpu-2c.md`. The foundation benchmark's
`baselines.py --variant LABEL METHOD KWARGS_JSON` records such variants with the full protocol (JSON, machine,
memory); this script is the quick version that prints one line per run.

    python benchmarks/sparsellm_ablation.py "sparsegpt:0.7;sparsellm:0.7:{\"iterations\":0}" 20 --num-samples 16 --seq-len 256

Each spec is `method:sparsity[:method_kwargs JSON]` (sparsity as a fraction, or `2-4` for 2:4); specs are separated
by ";". The second argument is the number of 512-token held-out wiki-offline windows evaluated. The environment
variables NS, SL and THREADS of the first version still set the defaults of --num-samples, --seq-len and --threads.
"""

import argparse
import json
import logging
import os
import time

import torch

from optimum_sparse import PruningConfig, SparsePruner, evaluate_perplexity, load_model_and_tokenizer
from optimum_sparse.data import get_calibration_ids

logger = logging.getLogger("benchmarks.sparsellm_ablation")


def parse_spec(spec: str) -> tuple[str, float, str, dict]:
    """`"sparsellm:0.7:{...}"` -> `("sparsellm", 0.7, "unstructured", {...})`; `"sparsegpt:2-4"` -> 2:4 at 0.5."""
    method, sparsity, *rest = spec.split(":", 2)
    kwargs = json.loads(rest[0]) if rest else {}
    if "-" in sparsity:
        return method, 0.5, sparsity.replace("-", ":"), kwargs
    return method, float(sparsity), "unstructured", kwargs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("specs", help='Runs: "method:sparsity[:kwargs JSON]" separated by ";".')
    parser.add_argument("windows", type=int, nargs="?", default=30, help="Held-out 512-token windows evaluated.")
    parser.add_argument("--num-samples", type=int, default=int(os.environ.get("NS", 16)), help="Calibration windows.")
    parser.add_argument("--seq-len", type=int, default=int(os.environ.get("SL", 256)), help="Tokens per window.")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", 1)), help="torch threads.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("optimum_sparse").setLevel(logging.WARNING)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    runs = [parse_spec(s) for s in args.specs.split(";")]
    model, tokenizer = load_model_and_tokenizer("smollm2-135m", dtype="float32")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = get_calibration_ids("wiki-offline", tokenizer, args.num_samples, args.seq_len, 0)

    def evaluate():
        return evaluate_perplexity(model, tokenizer, "wiki-offline", 512, max_windows=args.windows, progress=False)

    logger.info("dense: ppl %.3f", evaluate())
    for spec, (method, sparsity, structure, kwargs) in zip(args.specs.split(";"), runs):
        model.load_state_dict(state)
        pruner = SparsePruner(PruningConfig(method=method, sparsity=sparsity, structure=structure,
                                            num_samples=args.num_samples, seq_len=args.seq_len, method_kwargs=kwargs))
        started = time.time()
        pruner.apply(model, dataset=ids, progress=False)
        seconds = time.time() - started
        errors = [(b.get("ffn_error_sparsegpt"), b.get("ffn_error")) for b in pruner.report.blocks]
        shown = [(round(a, 4), round(b, 4)) for a, b in errors[::10]] if errors and errors[0][0] is not None else ""
        logger.info("%s: ppl %.3f, prune %.1fs, FFN error (SparseGPT -> this) blocks 0/10/20: %s",
                    spec, evaluate(), seconds, shown)


if __name__ == "__main__":
    main()
