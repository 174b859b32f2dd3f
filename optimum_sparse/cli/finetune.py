"""`optimum-sparse finetune --model PRUNED --output OUT`: LoRA fine-tuning of a pruned model, merged back sparse.

Loads a pruned model (a folder saved by `optimum-sparse prune --output` / `SparsePruner.save_pretrained`, or any
model whose pruned weights are zeros), wraps it with a peft LoRA adapter whose updates are masked by the pruned
weights (`mask_lora_updates`), trains it on the calibration split of `--dataset`, merges it with
`merge_and_unload_sparse` and saves the still-sparse model to `--output`, with the pruning record carried over, the
model card given a "LoRA fine-tuning" section and `lora_finetune.json` (settings, losses, perplexities).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import tempfile
import time
from typing import Any, Optional

__all__ = ["add_parser", "run", "FINETUNE_RECORD_NAME", "card_section"]

logger = logging.getLogger("optimum_sparse.cli")

FINETUNE_RECORD_NAME = "lora_finetune.json"
_COPIED_FILES = ("pruning_config.json", "sparsity_config.json", "pruning_report.json", "sparsity_plot.png")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "finetune", help="LoRA fine-tune a pruned model and merge it back, keeping every pruned weight at zero.",
        description="Fine-tunes a pruned model with LoRA (updates masked by the pruned weights), merges the adapter "
                    "as (W + ΔW) ⊙ M and saves a model exactly as sparse as its input.",
    )
    parser.add_argument("--model", required=True, help="Pruned model: a folder saved by `optimum-sparse prune`, or a Hub id.")
    parser.add_argument("--output", required=True, help="Folder for the merged, still-sparse model.")
    parser.add_argument("--dtype", default="float32", help="Model dtype for training: float32 (default), bfloat16.")
    parser.add_argument("--dataset", default="wiki-offline",
                        help="Training text: its calibration split (wiki-offline, a .txt/.jsonl path, a datasets name).")
    parser.add_argument("--steps", type=int, default=300, help="Optimizer steps.")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256, help="Tokens per training sequence.")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=None, help="Linear warm-up steps (default 5%% of steps).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--target-modules", nargs="+", default=None,
                        help="Modules LoRA adapts (default: every pruned linear, e.g. q/k/v/o/gate/up/down_proj).")
    parser.add_argument("--no-mask-training", action="store_true",
                        help="Train a plain LoRA update and only mask at merge time (the merged model then differs "
                             "from the adapter model).")
    parser.add_argument("--save-adapter", default=None, help="Also save the trained adapter (peft format) here.")
    parser.add_argument("--eval", action="store_true", help="Print perplexity after pruning and after fine-tuning.")
    parser.add_argument("--eval-every", type=int, default=None, help="Also evaluate every N steps (with --eval).")
    parser.add_argument("--eval-dataset", default="wiki-offline", help="Evaluation source (its held-out split).")
    parser.add_argument("--eval-seq-len", type=int, default=512, help="Perplexity window length.")
    parser.add_argument("--eval-windows", type=int, default=20, help="At most this many windows.")
    parser.set_defaults(func=run)
    return parser


def _pruning_record(folder: str) -> Any:
    """The pruning record of a saved pruned folder: serialization's `PruningReport` or the sidecar's dict."""
    if not os.path.isdir(folder):
        return None
    try:
        from ..serialization import load_pruning_record
    except ImportError:  # pragma: no cover - serialization ships with the package
        load_pruning_record = None
    if load_pruning_record is not None:
        try:
            return load_pruning_record(folder, load_masks=False)
        except (ValueError, OSError) as err:
            logger.info("No optimum-sparse pruning record in %s (%s); masks come from the zeros.", folder, err)
            return None
    sidecar = os.path.join(folder, "sparsity_config.json")
    return sidecar if os.path.isfile(sidecar) else None


def card_section(info: dict) -> str:
    """The "LoRA fine-tuning" section appended to the model card."""
    lora, train, ppl = info["lora"], info["training"], info.get("perplexity") or {}
    lines = [
        "", "## LoRA fine-tuning (sparsity kept)", "",
        "After pruning, this model was fine-tuned with a LoRA adapter (peft) whose update was masked by the pruned "
        "weights (`optimum_sparse.mask_lora_updates`), and the adapter was merged back with "
        "`optimum_sparse.merge_and_unload_sparse`, which writes `(W + ΔW) ⊙ M`: every pruned weight is still exactly "
        f"zero (sparsity of the pruned layers after the merge: {100 * info['sparsity_after_merge']:.2f}%).", "",
        "| setting | value |", "|---|---|",
        f"| LoRA | r={lora['r']}, alpha={lora['lora_alpha']:g}, dropout={lora['lora_dropout']:g}, "
        f"targets {', '.join(lora['target_modules'])} |",
        f"| masked during training | {'yes' if info['masked_training'] else 'no (masked at merge only)'} |",
        f"| data | {train['dataset']} ({train.get('split', 'calibration split')}), {train['steps']} steps x "
        f"{train['batch_size']} x "
        f"{train['seq_len']} tokens |",
        f"| optimizer | AdamW, lr {train['learning_rate']:g}, warm-up then cosine decay, seed {train['seed']} |",
        f"| training time | {train['seconds']:.0f} s |",
    ]
    if ppl.get("finetuned") is not None:
        held_out = "held-out text" if ppl.get("held_out", True) else "text"
        lines += ["", f"Perplexity on {ppl['dataset']} {held_out} ({ppl['windows']} x {ppl['seq_len']}-token windows):",
                  "", "| model | perplexity |", "|---|---|"]
        if ppl.get("dense") is not None:
            lines.append(f"| dense (from the pruning record) | {ppl['dense']:.3f} |")
        if ppl.get("pruned") is not None:
            lines.append(f"| pruned | {ppl['pruned']:.3f} |")
        lines.append(f"| pruned + LoRA, merged | {ppl['finetuned']:.3f} |")
    if info.get("command"):
        lines += ["", "Reproduce:", "", "```bash", info["command"], "```"]
    return "\n".join(lines) + "\n"


def _fallback_card(info: dict) -> str:
    return ("---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags:\n- optimum-sparse\n- pruned\n"
            "- sparse\n- lora\n- peft\n---\n\n# Pruned model, LoRA fine-tuned\n")


def _save(model, tokenizer, record: Any, source: str, output: str, info: dict) -> None:
    """Saves the merged model with its record and card, atomically (temporary sibling folder, then swap)."""
    try:
        from ..report import PruningReport
        from ..serialization import atomic_directory, save_pruned_model
    except ImportError:  # pragma: no cover
        PruningReport = atomic_directory = save_pruned_model = None
    if atomic_directory is not None and isinstance(record, PruningReport):
        with atomic_directory(output) as tmp:
            try:
                save_pruned_model(model, tmp, record, tokenizer=tokenizer, card_kwargs={"extra_tags": ["lora", "peft"]})
            except TypeError:  # an older card builder without extra tags
                save_pruned_model(model, tmp, record, tokenizer=tokenizer)
            _finish_folder(tmp, None, info)
        return
    # No optimum-sparse record: plain save, pruning files copied from the input folder, a simple card.
    output = os.path.abspath(output)
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(output)}.tmp-")
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name in _COPIED_FILES:
            if os.path.isdir(source) and os.path.isfile(os.path.join(source, name)):
                shutil.copy2(os.path.join(source, name), os.path.join(tmp, name))
        readme = os.path.join(source, "README.md") if os.path.isdir(source) else None
        _finish_folder(tmp, readme if readme and os.path.isfile(readme) else None, info)
        if os.path.isdir(output):
            aside = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(output)}.old-")
            os.rmdir(aside)
            os.rename(output, aside)
            os.rename(tmp, output)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _finish_folder(folder: str, source_readme: Optional[str], info: dict) -> None:
    readme = os.path.join(folder, "README.md")
    if source_readme is not None:
        shutil.copy2(source_readme, readme)
    if not os.path.isfile(readme):
        with open(readme, "w", encoding="utf-8") as f:
            f.write(_fallback_card(info))
    with open(readme, encoding="utf-8") as f:
        content = f.read().rstrip("\n")
    with open(readme, "w", encoding="utf-8") as f:
        f.write(content + "\n" + card_section(info))
    with open(os.path.join(folder, FINETUNE_RECORD_NAME), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, sort_keys=True, allow_nan=False)
        f.write("\n")


def _command(args) -> str:
    """The command line that reproduces this run (every training setting explicit)."""
    parts = ["optimum-sparse", "finetune", "--model", args.model, "--output", args.output, "--dtype", args.dtype,
             "--dataset", str(args.dataset), "--steps", args.steps, "--batch-size", args.batch_size,
             "--seq-len", args.seq_len, "--learning-rate", args.learning_rate, "--seed", args.seed,
             "--lora-r", args.lora_r, "--lora-alpha", args.lora_alpha, "--lora-dropout", args.lora_dropout]
    if args.warmup_steps is not None:
        parts += ["--warmup-steps", args.warmup_steps]
    if args.target_modules:
        parts += ["--target-modules", *args.target_modules]
    if args.no_mask_training:
        parts.append("--no-mask-training")
    if args.eval:
        parts += ["--eval", "--eval-dataset", args.eval_dataset, "--eval-seq-len", args.eval_seq_len,
                  "--eval-windows", args.eval_windows]
        if args.eval_every:
            parts += ["--eval-every", args.eval_every]
    return " ".join(shlex.quote(str(p)) for p in parts)


def run(args) -> int:
    import torch
    from peft import LoraConfig, get_peft_model

    from ..eval import evaluate_perplexity
    from ..integrations import finetune, mask_lora_updates, merge_and_unload_sparse, recover_masks
    from ..integrations.masks import NotPrunedError
    from ..models import load_model_and_tokenizer

    if args.steps < 1 or args.batch_size < 1 or args.seq_len < 1 or args.lora_r < 1:
        raise ValueError("--steps, --batch-size, --seq-len and --lora-r must be positive integers.")
    if os.path.abspath(args.output) == os.path.abspath(args.model):
        raise ValueError("--output must differ from --model (the pruned input is kept).")
    record = _pruning_record(args.model)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype)
    masks = recover_masks(model, record=record)
    if not masks:
        raise NotPrunedError(f"{args.model} holds no pruned linear layer (no layer with >= 5% exact zeros); prune it "
                             "first with `optimum-sparse prune ... --output FOLDER`.")
    targets = args.target_modules or sorted({name.rsplit(".", 1)[-1] for name in masks})
    peft_model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha,
                                                  lora_dropout=args.lora_dropout, target_modules=targets,
                                                  task_type="CAUSAL_LM"))
    if not args.no_mask_training:
        mask_lora_updates(peft_model, record=record)
    held_out = None
    if args.eval:  # tokenized once for every evaluation
        from ..data.calibration import load_texts, tokenize_texts

        held_out = tokenize_texts(load_texts(args.eval_dataset, "evaluation"), tokenizer)
        if args.eval_windows:
            held_out = held_out[: args.eval_windows * args.eval_seq_len]
    evaluate = lambda m: evaluate_perplexity(m, tokenizer, held_out, args.eval_seq_len,  # noqa: E731
                                             max_windows=args.eval_windows, progress=False)
    eval_every = args.eval_every or args.steps
    result = finetune(peft_model, args.dataset, tokenizer, steps=args.steps, batch_size=args.batch_size,
                      seq_len=args.seq_len, learning_rate=args.learning_rate, warmup_steps=args.warmup_steps,
                      seed=args.seed, eval_fn=evaluate if args.eval else None, eval_every=eval_every)
    if args.save_adapter:
        peft_model.save_pretrained(args.save_adapter)
    merged = merge_and_unload_sparse(peft_model, record=record)
    after = recover_masks(merged, record=record)
    zeros = sum(int((~m.keep).sum()) for m in after.values())
    total = sum(m.keep.numel() for m in after.values())
    ppl = None
    if args.eval:
        evals = result.evaluations
        dense = getattr(record, "perplexity", None) or {}
        ppl = {"dataset": args.eval_dataset, "seq_len": args.eval_seq_len, "windows": args.eval_windows,
               "held_out": not os.path.isfile(args.eval_dataset),
               "dense": dense.get("dense") if dense.get("dataset") == args.eval_dataset else None,
               "pruned": evals[0]["value"], "finetuned": evaluate(merged),
               "per_step": [{"step": e["step"], "perplexity": e["value"]} for e in evals]}
    info = {
        "base": args.model, "masked_training": not args.no_mask_training,
        "lora": {"r": args.lora_r, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
                 "target_modules": targets},
        "training": {"dataset": args.dataset, "steps": result.steps,
                     "split": "whole file" if os.path.isfile(args.dataset) else "calibration split",
                     "batch_size": args.batch_size, "seq_len": args.seq_len, "learning_rate": args.learning_rate,
                     "seed": args.seed, "seconds": result.seconds, "first_loss": result.losses[0],
                     "last_loss": result.losses[-1]},
        "sparsity_after_merge": zeros / total if total else 0.0,
        "perplexity": ppl,
        "command": _command(args),
        "torch": torch.__version__,
    }
    started = time.perf_counter()
    _save(merged, tokenizer, record, args.model, args.output, info)
    logger.info("Saved the fine-tuned sparse model to %s (%.1fs)", args.output, time.perf_counter() - started)
    if ppl is not None:
        rows = [("pruned", ppl["pruned"]), ("pruned + LoRA (merged)", ppl["finetuned"])]
        if ppl["dense"] is not None:
            rows.insert(0, ("dense (record)", ppl["dense"]))
        print("\n".join(f"{label:<24} perplexity {value:.3f}" for label, value in rows))
    print(f"sparsity of the pruned layers after the merge: {info['sparsity_after_merge']:.4f} "
          f"({len(after)} layers); saved to {args.output}")
    return 0
