"""Structured pruning as users feel it: perplexity, KV-cache decode speed and prefill latency, both shape forms.

For every ratio × method × shape form (`per-layer`: the method's own allocation, sizes may differ per block and load
with `trust_remote_code`; `uniform`: `PruningConfig(uniform_shapes=True)`, the stock config, loads anywhere) it copies
the dense SmolLM2-135M, prunes it on the same wiki-offline calibration windows, and records:

- perplexity on the held-out wiki-offline split;
- decode speed: `generate` with the KV cache, greedy, exactly `--new-tokens` new tokens after a `--prompt-len` prompt,
  at batch 1 and 8; decode tokens/s = `batch × (new_tokens − 1) / (t(new_tokens) − t(1))` (the prompt's prefill and
  first token cancel), from thread CPU time and from wall time;
- prefill latency: one forward of `--prefill-len` tokens at batch 1 with the cache on;
- parameter bytes, and the peak RSS increase while generating at batch 8 (kernel high-water mark, see `_common`).

`--speed-from FILE` measures only the speed of the per-layer models of an earlier `benchmarks/structured.py` result
(same calibration and evaluation settings): a copy of the dense model shrunk to each run's recorded per-layer sizes
(`structured_speed.shaped_like`, biases where the method adds them; speed depends on the shapes only), written to its
own output file with the run's perplexity and the file it comes from.

Every timing is repeated `--repeats` times: the median is reported with min/max (the spread is the noise of the shared
machine). A method whose own rule is `uniform` (Wanda-structured) gives the same model in both forms: it runs once and
is recorded with `shapes: "both"`. Results go to `benchmarks/results/structured_decode_<tag>.json` after every run;
`--resume` keeps finished runs made with the same settings.

    OMP_NUM_THREADS=1 python benchmarks/structured_decode.py --threads 1 --ratios 30% 20% 50% 10% --resume
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import statistics
import sys
import time
from datetime import datetime, timezone

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's optimum_sparse
from _common import (  # noqa: E402
    RESULTS_DIR, PeakMemory, calibration_ids, command_line, configure, default_tag, evaluation_stream, git_info,
    loadavg, machine_info, parse_setting, perplexity, resume_from, timed, write_json,
)
from structured import model_params  # noqa: E402

logger = logging.getLogger("benchmarks.structured_decode")

METHODS = ["structprune", "flap", "wanda-structured"]
SHAPES = ["per-layer", "uniform", "uniform-search"]  # uniform-search: uniform_shapes + allocation="search"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="Model alias, folder or Hub id (float32).")
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--ratios", nargs="+", default=["30%", "20%", "50%", "10%"], help="In the order they run.")
    p.add_argument("--shapes", nargs="+", default=SHAPES[:2], choices=SHAPES)
    p.add_argument("--search-samples", type=int, default=4, help="uniform-search: calibration windows scoring a split.")
    p.add_argument("--structure", default="channels+heads", choices=["channels", "heads", "channels+heads"])
    p.add_argument("--num-samples", type=int, default=16, help="Calibration windows.")
    p.add_argument("--seq-len", type=int, default=256, help="Tokens per calibration window.")
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=33, help="Generated tokens (the first comes from the prefill).")
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--speed-from", default=None, help="Speed only, for the per-layer sizes of this structured.py result.")
    return p


def _clock():
    return time.thread_time(), time.perf_counter()


def _spread(values: list) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "all": [round(v, 5) for v in values]}


@torch.inference_mode()
def _generate_seconds(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    c0, w0 = _clock()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
    c1, w1 = _clock()
    if out.shape[1] != ids.shape[1] + new_tokens:
        raise RuntimeError(f"generate produced {out.shape[1] - ids.shape[1]} tokens, asked {new_tokens}.")
    return c1 - c0, w1 - w0


@torch.inference_mode()
def measure_speed(model, vocab: int, args) -> dict:
    """Decode tokens/s at batch 1 and 8, prefill latency, parameter bytes, peak RSS increase while decoding."""
    generator = torch.Generator().manual_seed(0)
    out = {"parameter_bytes": sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())}
    for batch in (1, 8):
        ids = torch.randint(3, vocab, (batch, args.prompt_len), generator=generator)
        _generate_seconds(model, ids, 2)  # warm-up
        cpu, wall = [], []
        with PeakMemory() as memory:
            for _ in range(args.repeats):
                c_full, w_full = _generate_seconds(model, ids, args.new_tokens)
                c_one, w_one = _generate_seconds(model, ids, 1)
                steps = batch * (args.new_tokens - 1)
                cpu.append(steps / max(c_full - c_one, 1e-9))
                wall.append(steps / max(w_full - w_one, 1e-9))
        out[f"decode_batch{batch}"] = {"tokens_per_cpu_second": _spread(cpu), "tokens_per_wall_second": _spread(wall),
                                       "memory": memory.to_dict()}
    ids = torch.randint(3, vocab, (1, args.prefill_len), generator=generator)
    model(input_ids=ids, use_cache=True)  # warm-up
    cpu, wall = [], []
    for _ in range(args.repeats):
        c0, w0 = _clock()
        model(input_ids=ids, use_cache=True)
        c1, w1 = _clock()
        cpu.append(c1 - c0)
        wall.append(w1 - w0)
    out["prefill"] = {"tokens": args.prefill_len, "cpu_seconds": _spread(cpu), "wall_seconds": _spread(wall)}
    return out


def markdown_table(results: dict) -> str:
    lines = ["| method | ratio | shapes | format | ppl | params | decode b1 tok/s (CPU) | decode b8 tok/s (CPU) | "
             "prefill 512 ms (CPU) |", "|" + "---|" * 9]
    for r in results["runs"]:
        s = r["speed"]
        lines.append("| " + " | ".join([
            r["method"], r["setting"], r["shapes"], r["format"] or "dense", f"{r['perplexity']:.2f}",
            f"{r['model_params'] / 1e6:.1f}M",
            f"{s['decode_batch1']['tokens_per_cpu_second']['median']:.1f}",
            f"{s['decode_batch8']['tokens_per_cpu_second']['median']:.1f}",
            f"{1000 * s['prefill']['cpu_seconds']['median']:.0f}"]) + " |")
    return "\n".join(lines)


def speed_from_sizes(args, dense_model, output: str) -> int:
    """Decode/prefill speed of the per-layer sizes recorded in `args.speed_from` (no pruning, no perplexity run)."""
    from structured_speed import shaped_like

    with open(args.speed_from, encoding="utf-8") as f:
        source = json.load(f)
    results = {"benchmark": "structured_decode_speed_from_sizes",
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command_line(),
               "git": git_info(), "machine": machine_info("cpu"),
               "settings": {"model": args.model, "threads": torch.get_num_threads(), "sizes_from": args.speed_from,
                            "source_settings": source["settings"],
                            "speed": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                                      "prefill_len": args.prefill_len, "repeats": args.repeats, "batches": [1, 8]}},
               "runs": []}
    if args.resume:
        resume_from(output, results, logger)
    done = {(r["method"], r["setting"]) for r in results["runs"]}
    wanted = [f"{round(100 * parse_setting(r)[1])}%" for r in args.ratios]
    runs = [r for setting in wanted for r in source["runs"] if r["setting"] == setting and r["method"] in args.methods
            and r.get("allocation", "method") == "method" and r.get("layers")]
    for run in runs:
        if (run["method"], run["setting"]) in done:
            continue
        model = shaped_like(dense_model, run["layers"], run["method"])
        speed = measure_speed(model, dense_model.config.vocab_size, args)
        results["runs"].append({"method": run["method"], "setting": run["setting"], "shapes": "per-layer",
                                "format": run.get("format"), "perplexity": run["perplexity"],
                                "perplexity_from": args.speed_from, "model_params": model_params(model),
                                "source_model_params": run["model_params"], "speed": speed, "loadavg_after": loadavg()})
        write_json(output, results)
        logger.info("%-17s %-5s per-layer sizes: decode b1 %.1f b8 %.1f tok/s (CPU) prefill %.0f ms", run["method"],
                    run["setting"], speed["decode_batch1"]["tokens_per_cpu_second"]["median"],
                    speed["decode_batch8"]["tokens_per_cpu_second"]["median"],
                    1000 * speed["prefill"]["cpu_seconds"]["median"])
        del model
        gc.collect()
    print(f"Wrote {output}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    configure(args.threads)
    from optimum_sparse import PruningConfig, SparsePruner
    from optimum_sparse.methods import get_method_class
    from optimum_sparse.models import load_model_and_tokenizer

    output = args.output or os.path.join(RESULTS_DIR, f"structured_decode_{default_tag()}.json")
    dense_model, tokenizer = load_model_and_tokenizer(args.model, dtype=torch.float32)
    dense_model.eval()
    if args.speed_from:
        return speed_from_sizes(args, dense_model, output)
    calib = calibration_ids(tokenizer, args.num_samples, args.seq_len, 0)
    stream = evaluation_stream(tokenizer)
    windows = min(stream.numel() // args.eval_seq_len, args.max_windows)
    settings = {"model": args.model, "dtype": "float32", "threads": torch.get_num_threads(), "structure": args.structure,
                "calibration": {"dataset": "wiki-offline", "num_samples": args.num_samples, "seq_len": args.seq_len,
                                "seed": 0},
                "evaluation": {"seq_len": args.eval_seq_len, "windows": windows},
                "speed": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "prefill_len": args.prefill_len,
                          "repeats": args.repeats, "batches": [1, 8], "greedy": True, "kv_cache": True}}
    results = {"benchmark": "structured_decode", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "command": command_line(), "git": git_info(), "machine": machine_info("cpu"), "settings": settings,
               "runs": []}
    if args.resume:
        resume_from(output, results, logger)
    done = {(r["method"], r["setting"], r["shapes"]) for r in results["runs"]}
    vocab = dense_model.config.vocab_size
    plan = [("dense", 0.0, "dense")]
    for ratio in args.ratios:
        for method in args.methods:
            uniform_rule = get_method_class(method).default_allocation == "uniform"
            for shapes in (["both"] if uniform_rule else args.shapes):
                plan.append((method, parse_setting(ratio)[1], shapes))
    started = time.perf_counter()
    for method, ratio, shapes in plan:
        label = "dense" if method == "dense" else f"{round(100 * ratio)}%"
        if (method, label, shapes) in done:
            continue
        model, summary, prune_seconds = dense_model, None, 0.0
        if method != "dense":
            model = copy.deepcopy(dense_model)
            search = {"allocation": "search", "allocation_kwargs": {"search_samples": args.search_samples}} \
                if shapes == "uniform-search" else {}
            config = PruningConfig(method=method, sparsity=ratio, structure=args.structure, num_samples=args.num_samples,
                                   seq_len=args.seq_len, uniform_shapes=shapes != "per-layer", **search)
            with timed() as t_prune:
                pruner = SparsePruner(config)
                pruner.apply(model, dataset=calib, progress=False)
            summary, prune_seconds = pruner.structured_summary, t_prune["wall"]
            if shapes == "uniform-search":
                candidates = pruner.allocation.info["candidates"]
            del pruner
        with timed() as t_eval:
            ppl = perplexity(model, stream, args.eval_seq_len, windows)
        speed = measure_speed(model, vocab, args)
        run = {"method": method, "setting": label, "target": ratio, "shapes": shapes,
               "format": summary["format"] if summary else None,
               "achieved_prunable_fraction": summary["achieved_prunable_fraction"] if summary else 0.0,
               "achieved_model_fraction": summary["achieved_model_fraction"] if summary else 0.0,
               "model_params": model_params(model), "perplexity": ppl, "prune_seconds": round(prune_seconds, 1),
               "eval_seconds": round(t_eval["wall"], 1), "speed": speed, "loadavg_after": loadavg(),
               "layers": summary["layers"] if summary else None}
        if shapes == "uniform-search":
            run["split_candidates"] = candidates
        results["runs"].append(run)
        results["total_seconds"] = round(time.perf_counter() - started, 1)
        write_json(output, results)
        logger.info("%-17s %-5s %-9s ppl %8.3f params %.1fM decode b1 %.1f b8 %.1f tok/s (CPU) prefill %.0f ms",
                    method, label, shapes, ppl, run["model_params"] / 1e6,
                    speed["decode_batch1"]["tokens_per_cpu_second"]["median"],
                    speed["decode_batch8"]["tokens_per_cpu_second"]["median"],
                    1000 * speed["prefill"]["cpu_seconds"]["median"])
        if method != "dense":
            del model
        gc.collect()
    print(markdown_table(results))
    print(f"\nWrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
