"""Speed of structurally pruned SmolLM2-135M models, measured in CPU time (robust on a shared machine).

The speed of a pruned model depends only on its shapes, not on its weight values. This script reads the per-layer
sizes that `benchmarks/structured.py` recorded for each run (`runs[*].layers`), rebuilds a model of exactly those
shapes from the dense one (the first KV groups / channels kept, biases added where the method adds them), and
times a full forward (logits included, no KV cache) at batch 1 and batch 8: median *thread CPU time* (what the
forward costs, whatever else the machine runs) and median wall time, over `--repeats` forwards, single-threaded.

    python benchmarks/structured_speed.py --results benchmarks/results/structured_cpu-2c.json
"""

from __future__ import annotations

import argparse
import copy
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
from _common import RESULTS_DIR, command_line, default_tag, git_info, loadavg, machine_info, write_json  # noqa: E402

logger = logging.getLogger("benchmarks.structured_speed")

BIAS_METHODS = ("flap", "structprune")  # add a bias to o_proj/down_proj (compensation)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--results", default=os.path.join(RESULTS_DIR, "structured_cpu-2c.json"),
                   help="Output of benchmarks/structured.py (per-layer sizes of every run).")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default=None)
    return p


def shaped_like(dense, layers: list, method: str):
    """A copy of `dense` with the per-layer sizes of a pruned run."""
    from optimum_sparse.structured.layout import get_structured_layout, head_geometry
    from optimum_sparse.structured.shrink import shrink_channels, shrink_heads

    model = copy.deepcopy(dense)
    layout = get_structured_layout(model)
    geometry = head_geometry(model.config, layout)
    hidden = model.config.hidden_size
    bias = torch.zeros(hidden) if method in BIAS_METHODS else None
    for block, sizes in zip(model.model.layers, layers):
        groups = geometry.num_groups(block, layout)
        if sizes["num_key_value_heads"] < groups:
            shrink_heads(block, layout, geometry, torch.arange(sizes["num_key_value_heads"]), o_bias_delta=bias)
        if sizes["intermediate_size"] < block.mlp.down_proj.in_features:
            shrink_channels(block, layout, torch.arange(sizes["intermediate_size"]), down_bias_delta=bias)
    return model


@torch.inference_mode()
def time_forward(model, vocab: int, seq_len: int, repeats: int) -> dict:
    out = {}
    generator = torch.Generator().manual_seed(0)
    for batch in (1, 8):
        ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
        model(input_ids=ids, use_cache=False)
        cpu, wall = [], []
        for _ in range(repeats):
            c0, w0 = time.thread_time(), time.perf_counter()
            model(input_ids=ids, use_cache=False)
            cpu.append(time.thread_time() - c0)
            wall.append(time.perf_counter() - w0)
        out[f"batch{batch}"] = {"cpu_seconds": statistics.median(cpu), "wall_seconds": statistics.median(wall),
                                "tokens_per_cpu_second": batch * seq_len / statistics.median(cpu),
                                "all_cpu": [round(t, 4) for t in cpu], "all_wall": [round(t, 4) for t in wall]}
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    from optimum_sparse.models import load_model_and_tokenizer

    with open(args.results, encoding="utf-8") as f:
        source = json.load(f)
    dense, _ = load_model_and_tokenizer(args.model, dtype=torch.float32)
    dense.eval()
    vocab = dense.config.vocab_size
    output = args.output or os.path.join(RESULTS_DIR, f"structured_speed_{default_tag()}.json")
    results = {"benchmark": "structured_speed", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "command": command_line(), "git": git_info(), "machine": machine_info("cpu"),
               "settings": {"model": args.model, "seq_len": args.seq_len, "repeats": args.repeats,
                            "threads": torch.get_num_threads(), "sizes_from": os.path.relpath(args.results),
                            "what": "full forward incl. lm_head, use_cache=False; median thread CPU time and wall time"},
               "runs": []}
    dense_speed = time_forward(dense, vocab, args.seq_len, args.repeats)
    results["runs"].append({"method": "dense", "setting": "dense", "params": sum(p.numel() for p in dense.parameters()),
                            "speed": dense_speed})
    for run in source["runs"]:
        if run["method"] == "dense" or not run.get("layers"):
            continue
        model = shaped_like(dense, run["layers"], run["method"])
        speed = time_forward(model, vocab, args.seq_len, args.repeats)
        entry = {"method": run["method"], "setting": run["setting"],
                 "params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()), "speed": speed,
                 "cpu_speedup_batch1": dense_speed["batch1"]["cpu_seconds"] / speed["batch1"]["cpu_seconds"],
                 "cpu_speedup_batch8": dense_speed["batch8"]["cpu_seconds"] / speed["batch8"]["cpu_seconds"],
                 "wall_speedup_batch1": dense_speed["batch1"]["wall_seconds"] / speed["batch1"]["wall_seconds"],
                 "wall_speedup_batch8": dense_speed["batch8"]["wall_seconds"] / speed["batch8"]["wall_seconds"],
                 "loadavg": loadavg()}
        results["runs"].append(entry)
        write_json(output, results)
        logger.info("%-17s %-4s params %.1fM  CPU speed-up b1 %.2fx b8 %.2fx (wall %.2fx / %.2fx)", run["method"],
                    run["setting"], entry["params"] / 1e6, entry["cpu_speedup_batch1"], entry["cpu_speedup_batch8"],
                    entry["wall_speedup_batch1"], entry["wall_speedup_batch8"])
        del model
    write_json(output, results)
    print(f"Wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
