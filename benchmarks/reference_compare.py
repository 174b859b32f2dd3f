"""Our SparseGPT and Wanda beside the authors' code, on the same model, calibration tokens and evaluation.

The reference repositories are NOT part of this project and are never copied into it: pass checkouts of
IST-DASLab/sparsegpt and locuslab/wanda on the command line (we keep ours in the git-ignored `.refs/`):

    python benchmarks/reference_compare.py --sparsegpt-repo .refs/sparsegpt --wanda-repo .refs/wanda

What is called of theirs (unchanged pruning math):
  * SparseGPT: `llama.llama_sequential(model, dataloader, dev)` from the sparsegpt repo (its `Catcher`, per-sample
    block forwards, `SparseGPT.add_batch` / `fasterprune` / `free` from `sparsegpt.py`), with the module-global
    `args` namespace that its `__main__` would build.
  * Wanda: `lib.prune.prune_wanda(args, model, tokenizer, device, prune_n, prune_m)` from the wanda repo (its
    `prepare_calibration_input` Catcher, `WrappedGPT.add_batch`, the |W|·sqrt(scaler_row) metric and per-row sort).

What is patched, and only for the duration of their call (see `reference_patches`):
  * `torch.cuda.synchronize` → no-op (`fasterprune` calls it unconditionally; a CPU build raises).
  * `LlamaDecoderLayer.forward` → computes the rotary `position_embeddings` from `position_ids` (or
    `arange(seq)`, which is what the model itself uses) when the caller passes none. Their loops call each block
    with only `attention_mask` (+ `position_ids` in Wanda), the signature of transformers 4.3x; modern Llama blocks
    require `position_embeddings`. `check_block_kwargs_patch` verifies that a block called their way returns
    exactly what it returns inside the model's own forward.
  * `lib.prune.get_loaders` → returns our calibration windows in their `(input, target)` format instead of
    downloading C4; `model.hf_device_map = {}` and `model.seqlen` are set as their `main.py` / loaders expect.
Everything runs on the CPU (`dev = cpu`), in one process, one after the other; prune times are the wall time
of their call and of `SparsePruner.apply` on the same pre-tokenized calibration tensor.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import logging
import os
import sys
import time
from argparse import Namespace
from datetime import datetime, timezone

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    RESULTS_DIR, ModelBank, PeakMemory, calibration_ids, command_line, default_tag, evaluation_stream, git_info,
    loadavg, machine_info, parse_setting, perplexity, setting_label, timed, write_json,
)

logger = logging.getLogger("benchmarks.reference_compare")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparsegpt-repo", default=None, help="Checkout of IST-DASLab/sparsegpt.")
    p.add_argument("--wanda-repo", default=None, help="Checkout of locuslab/wanda.")
    p.add_argument("--sparsegpt-commit", default=None, help="Commit of --sparsegpt-repo when it has no .git.")
    p.add_argument("--wanda-commit", default=None, help="Commit of --wanda-repo when it has no .git.")
    p.add_argument("--methods", nargs="+", default=["sparsegpt", "wanda"], choices=["sparsegpt", "wanda"])
    p.add_argument("--settings", nargs="+", default=["50%", "2:4"], help="e.g. 50%% 2:4 70%%")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="Our calibration batch size (theirs is 1 by design).")
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tag", default=None)
    p.add_argument("--output", default=None)
    return p


# ----- their code ------------------------------------------------------------------------------------------------
def _git_head(path: str) -> str | None:
    """HEAD of the checkout at `path`, or `None` when `path` is not the top of its own git repository (an archive)."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", *args], cwd=path, capture_output=True, text=True, check=False).stdout.strip()

    if os.path.realpath(git("rev-parse", "--show-toplevel") or "/nonexistent") != os.path.realpath(path):
        return None
    return git("rev-parse", "HEAD") or None


def import_sparsegpt(repo: str):
    """Imports `llama.py` (and through it `sparsegpt.py`, `modelutils.py`, `quant.py`) from their checkout."""
    sys.path.insert(0, os.path.abspath(repo))
    with contextlib.redirect_stdout(io.StringIO()):
        return importlib.import_module("llama")


def import_wanda(repo: str):
    """Imports `lib.prune` from their checkout."""
    sys.path.insert(0, os.path.abspath(repo))
    return importlib.import_module("lib.prune")


@contextlib.contextmanager
def reference_patches(model):
    """The device / block-signature shims their loops need on CPU with current transformers (nothing else)."""
    from transformers.models.llama import modeling_llama

    rotary = model.model.rotary_emb
    original_forward = modeling_llama.LlamaDecoderLayer.forward
    original_sync = torch.cuda.synchronize

    def forward(self, hidden_states, *args, position_embeddings=None, position_ids=None, **kwargs):
        if position_embeddings is None:
            if position_ids is None:
                position_ids = torch.arange(hidden_states.shape[1], device=hidden_states.device).unsqueeze(0)
            position_embeddings = rotary(hidden_states, position_ids=position_ids)
        return original_forward(self, hidden_states, *args, position_embeddings=position_embeddings,
                                position_ids=position_ids, **kwargs)

    modeling_llama.LlamaDecoderLayer.forward = forward
    torch.cuda.synchronize = lambda *a, **k: None
    had_map = hasattr(model, "hf_device_map")
    if not had_map:
        model.hf_device_map = {}
    try:
        yield
    finally:
        modeling_llama.LlamaDecoderLayer.forward = original_forward
        torch.cuda.synchronize = original_sync
        if not had_map:
            del model.hf_device_map


@torch.no_grad()
def check_block_kwargs_patch(model, ids: torch.Tensor) -> float:
    """Max |difference| between block 0 and 1 outputs called their way (patched) and inside the model's forward."""
    layers = model.model.layers
    seen = {}

    def hook(module, args, kwargs, output):
        seen.setdefault("in", args[0] if args else kwargs["hidden_states"])
        seen.setdefault("out", output[0] if isinstance(output, tuple) else output)
        seen.setdefault("mask", kwargs.get("attention_mask"))
        seen.setdefault("pos", kwargs.get("position_ids"))

    handle = layers[1].register_forward_hook(hook, with_kwargs=True)
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    with reference_patches(model):
        a = layers[1](seen["in"], attention_mask=seen["mask"])  # sparsegpt's call
        b = layers[1](seen["in"], attention_mask=seen["mask"], position_ids=seen["pos"])  # wanda's call
    a = a[0] if isinstance(a, tuple) else a
    b = b[0] if isinstance(b, tuple) else b
    return float(max((a - seen["out"]).abs().max(), (b - seen["out"]).abs().max()))


def run_reference_sparsegpt(module, model, calib: torch.Tensor, structure: str, sparsity: float) -> None:
    n, m = (int(x) for x in structure.split(":")) if structure != "unstructured" else (0, 0)
    module.args = Namespace(
        nsamples=calib.shape[0], sparsity=sparsity if not n else 0.0, prunen=n, prunem=m, blocksize=128,
        percdamp=0.01, wbits=16, minlayer=-1, maxlayer=1000, prune_only="", invert=False, true_sequential=False,
        gmp=False,
    )
    model.seqlen = calib.shape[1]
    dataloader = [(calib[i : i + 1], None) for i in range(calib.shape[0])]
    with reference_patches(model), contextlib.redirect_stdout(io.StringIO()):
        module.llama_sequential(model, dataloader, torch.device("cpu"))


def run_reference_wanda(module, model, tokenizer, calib: torch.Tensor, structure: str, sparsity: float, seed: int) -> None:
    n, m = (int(x) for x in structure.split(":")) if structure != "unstructured" else (0, 0)
    args = Namespace(nsamples=calib.shape[0], seed=seed, sparsity_ratio=sparsity, use_variant=False,
                     sparsity_type=structure)
    model.seqlen = calib.shape[1]
    dataloader = [(calib[i : i + 1], None) for i in range(calib.shape[0])]
    original_loaders = module.get_loaders
    module.get_loaders = lambda *a, **k: (dataloader, None)
    try:
        with reference_patches(model), contextlib.redirect_stdout(io.StringIO()):
            module.prune_wanda(args, model, tokenizer, device=torch.device("cpu"), prune_n=n, prune_m=m)
    finally:
        module.get_loaders = original_loaders


# ----- comparison --------------------------------------------------------------------------------------------------
def block_linears(model) -> dict:
    return {name: mod.weight.detach().clone() for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and ".layers." in name}


def compare_weights(ours: dict, theirs: dict) -> dict:
    """Mask agreement and weight differences between two pruned copies of the same model."""
    agree = total = zeros_ours = zeros_theirs = 0
    num = den = 0.0
    for name, w in ours.items():
        t = theirs[name]
        mo, mt = w == 0, t == 0
        agree += int((mo == mt).sum())
        total += w.numel()
        zeros_ours += int(mo.sum())
        zeros_theirs += int(mt.sum())
        num += float((w - t).pow(2).sum())
        den += float(t.pow(2).sum())
    return {"mask_agreement": agree / total, "sparsity_ours": zeros_ours / total, "sparsity_theirs": zeros_theirs / total,
            "relative_weight_difference": (num / den) ** 0.5}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("optimum_sparse").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    from optimum_sparse import PruningConfig, SparsePruner

    modules = {}
    if "sparsegpt" in args.methods:
        if not args.sparsegpt_repo:
            raise SystemExit("--sparsegpt-repo is required for method sparsegpt")
        modules["sparsegpt"] = import_sparsegpt(args.sparsegpt_repo)
    if "wanda" in args.methods:
        if not args.wanda_repo:
            raise SystemExit("--wanda-repo is required for method wanda")
        modules["wanda"] = import_wanda(args.wanda_repo)
    tag = args.tag or default_tag("cpu")
    output = args.output or os.path.join(RESULTS_DIR, f"reference_compare_{tag}.json")
    started_all = time.perf_counter()

    bank = ModelBank(args.model, "cpu")
    tokenizer = bank.tokenizer
    calib = calibration_ids(tokenizer, args.num_samples, args.seq_len, args.seed)
    stream = evaluation_stream(tokenizer)
    available = stream.numel() // args.eval_seq_len
    windows = available if args.max_windows is None else min(available, args.max_windows)
    patch_error = check_block_kwargs_patch(bank.fresh(), calib[:1])
    logger.info("Block called their way vs inside the model: max |diff| = %.3g", patch_error)

    results = {
        "benchmark": "reference_compare",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "git": git_info(),
        "machine": machine_info("cpu"),
        "references": {
            "sparsegpt": {"repo": "IST-DASLab/sparsegpt", "commit": args.sparsegpt_commit or _git_head(args.sparsegpt_repo),
                          "called": "llama.llama_sequential (SparseGPT.add_batch/fasterprune/free)"}
            if args.sparsegpt_repo else None,
            "wanda": {"repo": "locuslab/wanda", "commit": args.wanda_commit or _git_head(args.wanda_repo),
                      "called": "lib.prune.prune_wanda (prepare_calibration_input, WrappedGPT)"}
            if args.wanda_repo else None,
        },
        "patches": [
            "torch.cuda.synchronize -> no-op during their call",
            "LlamaDecoderLayer.forward computes position_embeddings from position_ids (or arange) when not given",
            "lib.prune.get_loaders returns our calibration windows (wanda); llama.args namespace set (sparsegpt)",
            "model.hf_device_map = {} and model.seqlen = seq_len during their call",
        ],
        "block_kwargs_patch_max_abs_diff": patch_error,
        "settings": {
            "model": args.model, "dtype": "float32", "device": "cpu",
            "calibration": {"dataset": "wiki-offline", "num_samples": args.num_samples, "seq_len": args.seq_len,
                            "seed": args.seed, "our_batch_size": args.batch_size, "their_batch_size": 1},
            "evaluation": {"dataset": "wiki-offline", "split": "evaluation", "seq_len": args.eval_seq_len,
                           "windows": windows, "windows_available": available, "max_windows": args.max_windows},
        },
        "model_load_seconds": round(bank.load_seconds, 2),
        "acceptance": {"perplexity_within": 0.03, "prune_time": "ours <= theirs"},
        "runs": [],
    }
    write_json(output, results)

    for setting_index, text in enumerate(args.settings):
        structure, sparsity = parse_setting(text)
        label = setting_label(structure, sparsity)
        for method in args.methods:
            order = ["theirs", "ours"] if setting_index % 2 == 0 else ["ours", "theirs"]
            entry = {"method": method, "setting": label, "order": order}
            weights = {}
            for who in order:
                model = bank.fresh()
                before = loadavg()
                with PeakMemory("cpu") as mem, timed() as t:
                    if who == "ours":
                        config = PruningConfig(method=method, sparsity=sparsity if structure == "unstructured" else 0.5,
                                               structure=structure, num_samples=args.num_samples, seq_len=args.seq_len,
                                               seed=args.seed, batch_size=args.batch_size, device="cpu")
                        SparsePruner(config).apply(model, dataset=calib, progress=False)
                    elif method == "sparsegpt":
                        run_reference_sparsegpt(modules["sparsegpt"], model, calib, structure, sparsity)
                    else:
                        run_reference_wanda(modules["wanda"], model, tokenizer, calib, structure, sparsity, args.seed)
                with timed() as t_eval:
                    ppl = perplexity(model, stream, args.eval_seq_len, windows)
                weights[who] = block_linears(model)
                entry[who] = {"perplexity": ppl, "prune_seconds": round(t["wall"], 2),
                              "prune_cpu_seconds": round(t["cpu"], 2), "eval_seconds": round(t_eval["wall"], 2),
                              "memory": mem.to_dict(), "loadavg_before": before, "loadavg_after": loadavg()}
                logger.info("%-9s %-4s %-6s ppl %8.3f  prune %7.1fs (cpu %7.1fs)", method, label, who, ppl,
                            t["wall"], t["cpu"])
            entry["weights"] = compare_weights(weights["ours"], weights["theirs"])
            o, r = entry["ours"], entry["theirs"]
            entry["perplexity_relative_difference"] = o["perplexity"] / r["perplexity"] - 1
            entry["prune_time_ratio_ours_over_theirs"] = o["prune_seconds"] / r["prune_seconds"]
            entry["prune_cpu_time_ratio_ours_over_theirs"] = o["prune_cpu_seconds"] / r["prune_cpu_seconds"]
            entry["pass_perplexity"] = abs(entry["perplexity_relative_difference"]) <= 0.03
            entry["pass_time"] = o["prune_seconds"] <= r["prune_seconds"]
            results["runs"].append(entry)
            results["total_seconds"] = round(time.perf_counter() - started_all, 1)
            write_json(output, results)
            del weights

    print(markdown_table(results))
    print(f"\nWrote {output} ({time.perf_counter() - started_all:.0f}s).")
    return 0


def markdown_table(results: dict) -> str:
    lines = ["| method | setting | ppl theirs | ppl ours | Δppl | prune s theirs | prune s ours | ours/theirs | "
             "mask agreement | pass |", "|---|---|---|---|---|---|---|---|---|---|"]
    for e in results["runs"]:
        lines.append(
            f"| {e['method']} | {e['setting']} | {e['theirs']['perplexity']:.3f} | {e['ours']['perplexity']:.3f} | "
            f"{100 * e['perplexity_relative_difference']:+.2f}% | {e['theirs']['prune_seconds']:.1f} | "
            f"{e['ours']['prune_seconds']:.1f} | {e['prune_time_ratio_ours_over_theirs']:.2f} | "
            f"{100 * e['weights']['mask_agreement']:.2f}% | "
            f"{'yes' if e['pass_perplexity'] and e['pass_time'] else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
