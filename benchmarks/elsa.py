"""ELSA benchmark: whole-model ADMM on SmolLM2-135M, with the perplexity curve of the projected model during training.

For every sparsity it restores the dense weights, runs `optimum_sparse.integrations.elsa.run_elsa` on fresh
wiki-offline calibration windows (`steps × batch_size` of them, so no window is seen twice), evaluates the hard-projected
model every `--eval-every` steps on `--curve-windows` held-out windows, and at the end on `--max-windows` held-out
512-token windows (the same evaluation as `baselines.py`). Results go to `benchmarks/results/elsa_<tag>.json`
(rewritten after every run; `--resume` keeps finished runs with the same settings).

    python benchmarks/elsa.py --sparsities 80% 90% --steps 200 --eval-every 50 --curve-windows 8 --threads 1
    python benchmarks/elsa.py --sparsities 90% --steps 20 --eval-every 10 --curve-windows 4 --max-windows 8 --output /tmp/probe.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from datetime import datetime, timezone

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    RESULTS_DIR, ModelBank, PeakMemory, calibration_ids, command_line, default_tag, evaluation_stream, git_info,
    loadavg, machine_info, parse_setting, perplexity, setting_label, timed, write_json,
)

logger = logging.getLogger("benchmarks.elsa")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sparsities", nargs="+", default=["80%", "90%"], help="Unstructured percentages or N:M.")
    p.add_argument("--label", default="elsa", help="Name of the runs in the results file.")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=2, help="Windows per optimizer step.")
    p.add_argument("--seq-len", type=int, default=256, help="Tokens per training window.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method-kwargs", default="{}", help="JSON: ELSA method_kwargs over this script's defaults.")
    p.add_argument("--eval-every", type=int, default=50, help="Steps between evaluations of the projected model.")
    p.add_argument("--curve-windows", type=int, default=16, help="Held-out windows per curve point.")
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=64, help="Held-out windows of the final evaluation.")
    p.add_argument("--dataset", default="wiki-offline")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tag", default=None)
    p.add_argument("--output", default=None)
    p.add_argument("--resume", action="store_true", help="Keep finished runs of the output file (same settings).")
    return p


# ELSA's published defaults are for 7B models and 4096 steps of 2 × 2048 tokens (lr 2e-4, λ = 0.01, K = 32). A CPU
# budget of a few hundred steps cannot start from the dense model: a learning rate large enough to move the pruned
# weights to zero in 200 steps (2e-3, with λ growing 0.002 → 0.5) wrecked the kept ones (docs/admm.md, "What did not
# work"). So this script starts ELSA from ALPS (pruned on the first 32 training windows) and then runs ELSA's own lr
# and λ with z/u updates every 10 steps; pass --method-kwargs to change any of it.
DEFAULTS = dict(warm_start="alps", warm_start_samples=32, learning_rate=2e-4, penalty=0.01, penalty_init=None,
                penalty_schedule="constant", interval=10, projection="magnitude", gradient_checkpointing=False,
                warmup_steps=0)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("optimum_sparse").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import TrainerCallback

    from optimum_sparse import PruningConfig
    from optimum_sparse.integrations.elsa import admm_optimizer_of, run_elsa

    kwargs = {**DEFAULTS, **json.loads(args.method_kwargs), "steps": args.steps}
    tag = args.tag or default_tag(args.device)
    output = args.output or os.path.join(RESULTS_DIR, f"elsa_{tag}.json")
    started_all = time.perf_counter()
    bank = ModelBank(args.model, args.device)
    num_windows = args.steps * args.batch_size
    train = calibration_ids(bank.tokenizer, num_windows, args.seq_len, args.seed, args.dataset)
    stream = evaluation_stream(bank.tokenizer, args.dataset)
    available = stream.numel() // args.eval_seq_len
    settings = {
        "model": args.model, "dtype": "float32", "device": args.device,
        "training": {"dataset": args.dataset, "split": "calibration", "windows": num_windows, "seq_len": args.seq_len,
                     "tokens": int(train.numel()), "batch_size": args.batch_size, "seed": args.seed},
        "elsa": kwargs,
        "evaluation": {"dataset": args.dataset, "split": "evaluation", "seq_len": args.eval_seq_len,
                       "final_windows": min(available, args.max_windows), "curve_windows": args.curve_windows,
                       "eval_every": args.eval_every},
    }
    results = {"benchmark": "elsa", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "command": command_line(), "git": git_info(), "machine": machine_info(args.device),
               "settings": settings, "runs": []}
    if args.resume and os.path.isfile(output):
        with open(output, encoding="utf-8") as f:
            previous = json.load(f)
        if previous.get("settings") == settings:
            results["runs"] = previous["runs"]
        else:
            logger.warning("Not resuming: %s was made with other settings.", output)
    done = {(r["method"], r["setting"]) for r in results["runs"]}

    class Curve(TrainerCallback):
        """Perplexity of the hard-projected model every `eval_every` steps (and before the first step)."""

        def __init__(self):
            self.points = []

        def _evaluate(self, step, optimizer, model, state):
            started = time.perf_counter()
            with admm_optimizer_of(optimizer).projected():
                ppl = perplexity(model, stream, args.eval_seq_len, args.curve_windows)
            self.points.append({"step": step, "perplexity": ppl, "seconds": round(time.perf_counter() - started, 1)})
            last = state.log_history[-1] if state.log_history else {}
            logger.info("step %d: projected-model perplexity %.2f (loss %s, gap %s)", step, ppl, last.get("loss"),
                        last.get("admm_gap"))

        def on_train_begin(self, a, state, control, optimizer=None, model=None, **kw):
            self._evaluate(state.global_step, optimizer, model, state)

        def on_step_end(self, a, state, control, optimizer=None, model=None, **kw):
            if state.global_step % args.eval_every == 0 and state.global_step < state.max_steps:
                self._evaluate(state.global_step, optimizer, model, state)

    for text in args.sparsities:
        structure, sparsity = parse_setting(text)
        label = setting_label(structure, sparsity)
        if (args.label, label) in done:
            logger.info("skip %s %s", args.label, label)
            continue
        model = bank.fresh()
        config = PruningConfig(method="elsa", sparsity=sparsity if structure == "unstructured" else 0.5,
                               structure=structure, num_samples=num_windows, seq_len=args.seq_len, seed=args.seed,
                               batch_size=args.batch_size, device=args.device, method_kwargs=kwargs)
        curve = Curve()
        load_before = loadavg()
        with PeakMemory(args.device) as mem, timed() as t_run:
            report = run_elsa(model, train, config, progress=False, callbacks=[curve])
        eval_seconds = sum(p["seconds"] for p in curve.points)
        with timed() as t_eval:
            ppl = perplexity(model, stream, args.eval_seq_len, settings["evaluation"]["final_windows"])
        curve.points.append({"step": args.steps, "perplexity": perplexity(model, stream, args.eval_seq_len,
                                                                           args.curve_windows)})
        zeros = sum(int((m.weight == 0).sum()) for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and ".layers." in n)
        total = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n)
        history = report.diagnostics["elsa"]["history"]
        run = {
            "method": args.label, "setting": label, "structure": structure, "target_sparsity": sparsity,
            "measured_sparsity": round(zeros / total, 6), "perplexity": ppl, "curve": curve.points,
            "loss": [round(h["loss"], 4) for h in history],
            "admm": [{"step": h["step"], "gap": h.get("admm_gap"), "penalty": h.get("admm_penalty"),
                      "support_change": h.get("admm_support_change")} for h in history if h["step"] % kwargs["interval"] == 0],
            "train_seconds": report.diagnostics["elsa"]["train_seconds"],
            "seconds_per_step": round(report.diagnostics["elsa"]["train_seconds"] / args.steps, 2),
            "curve_eval_seconds": round(eval_seconds, 1), "total_seconds": round(t_run["wall"], 1),
            "final_eval_seconds": round(t_eval["wall"], 1), "memory": mem.to_dict(), "memory_method": mem.method,
            "loadavg_before": load_before, "loadavg_after": loadavg(),
        }
        results["runs"].append(run)
        write_json(output, results)
        logger.info("%s %s: perplexity %.2f after %d steps (%.0fs training, %.1f s/step)", args.label, label, ppl,
                    args.steps, run["train_seconds"], run["seconds_per_step"])
    print(f"Wrote {output} ({len(results['runs'])} runs, {time.perf_counter() - started_all:.0f}s).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
