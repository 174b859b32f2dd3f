"""`optimum-sparse` command line: `prune`, `eval`, `demo`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional, Sequence

from ..config import CLI_FIELDS, parse_structure
from ..errors import OptimumSparseError, OutputPathError
from ..serialization.destination import check_output_dir
from ..utils import show_progress

__all__ = ["main", "build_parser"]

logger = logging.getLogger("optimum_sparse.cli")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Modules with `add_parser(subparsers)` (registering a subcommand whose parser sets `func=run`) and `run(args) -> int`.
from . import eval as _accuracy  # noqa: E402
from . import push as _push  # noqa: E402

_EXTRA_COMMANDS: list = [_push]
from . import finetune as _finetune  # noqa: E402

_EXTRA_COMMANDS.append(_finetune)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hub id, local folder, or alias 'smollm2-135m' (bundled GGUF).")
    parser.add_argument("--dtype", default="auto", help="Model dtype: auto, float32, bfloat16, float16.")
    parser.add_argument("--device-map", default=None,
                        help="accelerate device_map for loading: 'auto', 'cpu', or a JSON dict of module -> device/'disk'.")
    parser.add_argument("--offload-folder", default=None, help="Where accelerate offloads blocks sent to 'disk'.")


def _add_eval_args(parser: argparse.ArgumentParser, default_windows: Optional[int]) -> None:
    parser.add_argument("--eval-dataset", default="wiki-offline", help="Evaluation source (its held-out split).")
    parser.add_argument("--eval-seq-len", type=int, default=512, help="Perplexity window length.")
    parser.add_argument("--eval-windows", type=int, default=default_windows, help="At most this many windows.")


def build_parser() -> argparse.ArgumentParser:
    from ..methods import available_methods

    from ..version import __version__

    parser = argparse.ArgumentParser(prog="optimum-sparse", description="Post-training pruning of causal LMs.")
    parser.add_argument("--version", action="version", version=f"optimum-sparse {__version__}")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                        help="Logging level (default: %(default)s).")
    parser.add_argument("--no-progress", action="store_true",
                        help="No progress bars (also: TQDM_DISABLE=1 or HF_HUB_DISABLE_PROGRESS_BARS=1).")
    sub = parser.add_subparsers(dest="command", required=True)

    prune = sub.add_parser("prune", help="Prune a model and save it.", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                           description="Prunes a causal LM block by block and saves it (--output) and/or pushes it "
                                       "(--push-to-hub). The output folder is checked before the model is loaded.")
    _add_model_args(prune)
    prune.add_argument("--method", default="sparsegpt", choices=available_methods(), help="Pruning method.")
    prune.add_argument("--sparsity", type=float, default=0.5,
                       help="Fraction of the pruned layers' weights set to zero, in [0, 1) (N:M: leave it, N/M is used).")
    prune.add_argument("--structure", default="unstructured",
                       help="'unstructured', N:M (e.g. 2:4), or structured: 'channels', 'heads', 'channels+heads' "
                            "(with --method structprune, flap, wanda-structured or magnitude-structured), 'experts' "
                            "(with --method expert-removal: --sparsity is the fraction of experts removed per block).")
    prune.add_argument("--multiple-of", type=int, default=8,
                       help="Structured pruning: kept MLP channels per layer are a multiple of this (64/128 for GPUs).")
    prune.add_argument("--dataset", default="wiki-offline", help="Calibration source (name, .txt/.jsonl path).")
    prune.add_argument("--num-samples", type=int, default=128, help="Calibration sequences.")
    prune.add_argument("--seq-len", type=int, default=2048, help="Tokens per calibration sequence.")
    prune.add_argument("--seed", type=int, default=0, help="Seed of the calibration window sampling.")
    prune.add_argument("--batch-size", type=int, default=8, help="Calibration sequences per forward pass.")
    prune.add_argument("--device", default=None, help="Device for statistics and solves (cuda, cpu).")
    prune.add_argument("--targets", nargs="+", default=["Linear", "Conv1D"],
                       help="Modules to prune (class names, name suffixes, or 're:' regexes).")
    prune.add_argument("--ignore", nargs="*", default=[], help="Modules to skip (class, name suffix, 're:' regex).")
    prune.add_argument("--damping", type=float, default=0.01, help="Relative Hessian damping.")
    prune.add_argument("--block-size", type=int, default=128, help="Column block size of the OBS solver.")
    prune.add_argument("--uniform-shapes", action="store_true",
                       help="Structured pruning: same head/channel counts in every block (stock config, no remote code).")
    prune.add_argument("--true-sequential", action="store_true",
                       help="Recollect statistics after each linear group (q/k/v, o, gate/up, down) is pruned.")
    prune.add_argument("--method-kwargs", default="{}", help="JSON dict of method-specific parameters.")
    prune.add_argument("--allocation", default="uniform", choices=["uniform", "owl", "search"],
                       help="Layer-wise sparsity allocation (docs/allocation.md); structured methods: 'uniform' (their "
                            "own rule, --method-kwargs allocation) or 'search' (kept heads/channels searched).")
    prune.add_argument("--allocation-kwargs", default="{}", help="JSON dict of allocator parameters (OWL M/lambda, "
                       "search settings such as state_dir; structured search: budget 'params' or 'latency').")
    prune.add_argument("--layer-sparsity", default=None,
                       help="Per-layer sparsity override: a JSON dict {module: sparsity} or the path of a JSON file "
                            "(N:M structures: multiples of 1/M, e.g. 0.75 = 3:4 under 2:4).")
    prune.add_argument("--expert-statistics", default="routed", choices=["routed", "pooled"],
                       help="MoE: per-expert statistics from the routed tokens (routing-weighted) or all tokens.")
    prune.add_argument("--min-expert-tokens", type=int, default=None,
                       help="MoE: experts with fewer routed tokens get --expert-fallback (default: the input width).")
    prune.add_argument("--expert-fallback", default="mean-hessian", choices=["mean-hessian", "damping", "magnitude"],
                       help="MoE: statistics of under-calibrated experts (docs/moe.md).")
    prune.add_argument("--config", default=None, help="A pruning_config.json to start from (flags override).")
    prune.add_argument("--output", default=None,
                       help="Folder to save the pruned model in (checked before loading: writable, not a file).")
    prune.add_argument("--overwrite", action="store_true", help="Replace a model already in --output.")
    prune.add_argument("--checkpoint-dir", default=None, help="Save the run's state after every block (resumable).")
    prune.add_argument("--resume", action="store_true", help="Continue the run checkpointed in --checkpoint-dir.")
    prune.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                       help="Push the pruned model (with its card) to this Hub repository (HF_TOKEN, HF_ENDPOINT).")
    prune.add_argument("--eval", action="store_true", help="Print dense vs pruned perplexity.")
    _add_eval_args(prune, default_windows=None)
    _accuracy.add_accuracy_args(prune, "--eval-tasks")

    ev = sub.add_parser("eval", help="Perplexity of a model on held-out text; accuracy on lm-eval tasks (--tasks).",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_args(ev)
    _add_eval_args(ev, default_windows=None)
    _accuracy.add_eval_command_args(ev)

    demo = sub.add_parser("demo", help="Prune the bundled SmolLM2-135M on bundled Wikipedia text; print a table.",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt", "sparsellm"])
    demo.add_argument("--sparsity", type=float, default=0.6)
    demo.add_argument("--structure", default="unstructured")
    demo.add_argument("--num-samples", type=int, default=16)
    demo.add_argument("--seq-len", type=int, default=512)
    demo.add_argument("--eval-windows", type=int, default=20)
    demo.add_argument("--eval-items", type=int, default=50,
                      help="wiki_offline_mc items for the accuracy column (0: no accuracy; needs optimum-sparse[eval]).")

    for module in _EXTRA_COMMANDS:  # subcommands living in their own files (push, finetune, ...)
        module.add_parser(sub)
    return parser


def _disable_progress_bars() -> None:
    """--no-progress: our bars (through `show_progress`), huggingface_hub's and transformers' bars off."""
    import os

    os.environ["TQDM_DISABLE"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as hf_logging

        disable_progress_bars()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _format_table(rows: list[tuple[str, ...]], header: tuple = ("model", "sparsity", "perplexity", "prune time (s)")) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _load(args):
    from ..models import load_model_and_tokenizer

    device_map = getattr(args, "device_map", None)
    if device_map and device_map.lstrip().startswith("{"):
        device_map = json.loads(device_map)
    kwargs = {"device_map": device_map} if device_map else {}
    if getattr(args, "offload_folder", None):
        kwargs["offload_folder"] = args.offload_folder
    return load_model_and_tokenizer(args.model, dtype=getattr(args, "dtype", "auto"), **kwargs)


def _json_or_path(value: Optional[str]):
    """A JSON object given inline (`'{...}'`), else the string itself (a path, read by `PruningConfig`)."""
    return json.loads(value) if value is not None and value.lstrip().startswith("{") else value


def _given_prune_fields(args) -> set:
    """The config fields whose flags were typed (a flag set to its default still overrides `--config`); without the
    command line (a hand-made namespace), the fields that differ from the defaults."""
    argv = getattr(args, "argv", None)
    parser = build_parser()
    if argv is None:
        defaults = vars(parser.parse_args(["prune", "--model", "x"]))
        return {k for k in CLI_FIELDS if getattr(args, k) != defaults.get(k)}
    prune = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["prune"]
    for action in prune._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) & set(CLI_FIELDS)


def prune_config(args):
    """The `PruningConfig` of `optimum-sparse prune`: one flag per field; with `--config`, the file's values under
    every flag that was typed (at its default too)."""
    from ..config import PruningConfig

    overrides = {name: getattr(args, name) for name in CLI_FIELDS}  # one flag per PruningConfig field
    for name in ("method_kwargs", "allocation_kwargs"):
        overrides[name] = json.loads(overrides[name])
    overrides["layer_sparsity"] = _json_or_path(overrides["layer_sparsity"])
    if args.config:
        base = PruningConfig.from_pretrained(args.config).to_dict()
        given = _given_prune_fields(args)
        base.update({k: v for k, v in overrides.items() if k in given})
        if "structure" in given and "sparsity" not in given:
            base.pop("sparsity", None)  # a new structure: the file's sparsity (its N/M) is not a choice of the user
        return PruningConfig.from_dict(base)
    return PruningConfig(**overrides)


def _cmd_prune(args) -> int:
    from ..eval import evaluate_perplexity
    from ..pruner import SparsePruner

    config = prune_config(args)
    pruner = SparsePruner(config)  # validated before the (slow) model load
    if args.output:
        check_output_dir(args.output, overwrite=args.overwrite)  # before hours of work, not after
    elif not args.push_to_hub and not args.eval and not args.tasks:
        raise OutputPathError("Nowhere to put the pruned model: give --output DIR and/or --push-to-hub REPO_ID (or "
                              "--eval / --eval-tasks to only measure perplexity / accuracy).")
    else:
        logger.warning("No --output: the pruned model is %s.", "pushed from a temporary folder" if args.push_to_hub
                       else "discarded after the evaluation")
    _accuracy.precheck(args)
    model, tokenizer = _load(args)
    dense_acc = _accuracy.measure(model, tokenizer, args)
    rows = []
    evaluate = lambda: evaluate_perplexity(model, tokenizer, args.eval_dataset, args.eval_seq_len,  # noqa: E731
                                           max_windows=args.eval_windows)
    dense = evaluate() if args.eval else None
    if args.eval:
        rows.append(("dense", "0%", f"{dense:.3f}", "-"))
    pruner.apply(model, tokenizer=tokenizer, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                 progress=show_progress())
    seconds = pruner.report.seconds  # the figure of the log line, the record and the card
    label = config.structure if config.nm else f"{config.sparsity:.0%}"
    if pruner.structured_summary:
        s = pruner.structured_summary
        print(f"Removed {s['achieved_prunable_fraction']:.2%} of the prunable parameters (target {config.sparsity:.2%}), "
              f"{s['achieved_model_fraction']:.2%} of the model: {s['model_params_before']:,} -> "
              f"{s['model_params_after']:,} parameters ({s['format']} config).")
    if args.eval:
        pruned = evaluate()
        pruner.record_perplexity(dense, pruned, args.eval_dataset, args.eval_seq_len, args.eval_windows)
        rows.append((config.method, label, f"{pruned:.3f}", f"{seconds:.1f}"))
        print(_format_table(rows))
    pruned_acc = _accuracy.measure(model, tokenizer, args)
    if pruned_acc is not None:
        pruner.record_accuracy(dense_acc, pruned_acc)
        print(_accuracy.format_accuracy_table(dense_acc, pruned_acc))
    from ..models import MODEL_ALIASES
    from ..hub.push import HubPushError, push_folder

    card = {"base_model": None if args.model.lower() in MODEL_ALIASES else args.model, "repo_id": args.push_to_hub,
            "model_arg": args.model if args.model.lower() in MODEL_ALIASES else None}  # never a local path
    if args.output:
        pruner.save_pretrained(model, args.output, tokenizer=tokenizer, card_kwargs=card, overwrite=args.overwrite)
    if args.push_to_hub:
        try:
            info = (push_folder(args.output, args.push_to_hub) if args.output else
                    pruner.push_to_hub(model, args.push_to_hub, tokenizer=tokenizer, card_kwargs=card))
        except HubPushError as err:
            logger.error("%s", err)
            return 1
        print(f"Pushed to {info.commit_url}")
    return 0


def _cmd_eval(args) -> int:
    from ..eval import evaluate_perplexity

    _accuracy.precheck(args)
    model, tokenizer = _load(args)
    if not args.no_perplexity:
        ppl = evaluate_perplexity(model, tokenizer, args.eval_dataset, args.eval_seq_len, max_windows=args.eval_windows)
        print(f"perplexity ({args.eval_dataset}, {args.eval_seq_len}-token windows): {ppl:.3f}")
    _accuracy.run_eval_accuracy(args, model, tokenizer, lambda name: _load(argparse.Namespace(**{**vars(args), "model": name})))
    return 0


def _cmd_demo(args) -> int:
    from ..config import PruningConfig
    from ..eval import evaluate_perplexity
    from ..models import load_model_and_tokenizer
    from ..pruner import SparsePruner

    sparsity = {} if parse_structure(args.structure) else {"sparsity": args.sparsity}  # N:M: its own N/M
    configs = [PruningConfig(method=m, structure=args.structure, num_samples=args.num_samples, seq_len=args.seq_len,
                             **sparsity) for m in args.methods]
    accuracy = _accuracy.demo_accuracy(args.eval_items)  # None: not measured (the reason is logged)
    model, tokenizer = load_model_and_tokenizer("smollm2-135m", dtype="float32")
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate = lambda: evaluate_perplexity(model, tokenizer, "wiki-offline", 512, max_windows=args.eval_windows)  # noqa: E731
    measure = (lambda: (accuracy(model, tokenizer),)) if accuracy else tuple  # noqa: E731
    rows = [("SmolLM2-135M dense", "0%", f"{evaluate():.3f}", *measure(), "-")]
    for config in configs:
        model.load_state_dict(dense_state)
        pruner = SparsePruner(config)
        pruner.apply(model, tokenizer=tokenizer, progress=show_progress())
        seconds = pruner.report.seconds
        label = config.structure if config.nm else f"{config.sparsity:.0%}"
        rows.append((config.method, label, f"{evaluate():.3f}", *measure(), f"{seconds:.1f}"))
    header = ("model", "sparsity", "perplexity", *(["wiki_offline_mc acc"] if accuracy else []), "prune time (s)")
    print(f"\nPerplexity on held-out Wikipedia text ({args.eval_windows} x 512-token windows; "
          f"calibration {args.num_samples} x {args.seq_len} tokens)"
          + (f"; accuracy on the first {args.eval_items} items of wiki_offline_mc (held-out articles, 4 choices, "
             "chance 0.25; ± standard error)" if accuracy else "; accuracy not measured (see the log)") + ":\n")
    print(_format_table(rows, header))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.no_progress:
        _disable_progress_bars()
    commands = {"prune": _cmd_prune, "eval": _cmd_eval, "demo": _cmd_demo}
    try:
        return commands[args.command](args) if args.command in commands else args.func(args)
    except (ValueError, FileNotFoundError, TypeError, ImportError, ConnectionError, OptimumSparseError) as err:
        logger.error("%s", err)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
