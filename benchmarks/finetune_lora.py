"""Benchmark: LoRA recovery of a pruned SmolLM2-135M with the sparsity kept through the merge.

Runs `examples/finetune_lora.py` (prune -> masked LoRA -> sparse merge) and writes its numbers (perplexity before
pruning, after pruning, every `--eval-every` steps and after the merge; time; sparsity after the merge) with the
machine and the command to `benchmarks/results/finetune_<tag>.json`.

    python benchmarks/finetune_lora.py                       # 50% SparseGPT, 300 steps, CPU
    python benchmarks/finetune_lora.py --sparsity 0.7 --steps 2000 --tag gpu-70   # e.g. on a GPU
    python benchmarks/finetune_lora.py --threads 1              # on a CPU shared with other jobs
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def _example():
    spec = importlib.util.spec_from_file_location("finetune_lora_example", os.path.join(ROOT, "examples", "finetune_lora.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def machine() -> dict:
    import peft
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    info["git_commit"] = commit or None
    return info


def main(argv=None) -> int:
    example = _example()
    argv = sys.argv[1:] if argv is None else argv
    own = {"--tag": None, "--threads": None}  # our own flags; the rest goes to the example
    for flag in own:
        if flag in argv:
            i = argv.index(flag)
            own[flag], argv = argv[i + 1], argv[:i] + argv[i + 2:]
    tag = own["--tag"]
    if own["--threads"]:  # on a shared CPU, 1 thread avoids OpenMP barrier stalls when other jobs hold the cores
        torch.set_num_threads(int(own["--threads"]))
    args = example.parse_args(argv)
    info = machine()
    started = time.perf_counter()
    result = example.run(args)
    result["seconds"]["total_s"] = time.perf_counter() - started
    try:
        result["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    result["machine"] = info
    result["command"] = " ".join(shlex.quote(a) for a in ["python", "benchmarks/finetune_lora.py", *sys.argv[1:]])
    label = args.structure.replace(":", "of") if args.structure != "unstructured" else f"{round(100 * args.sparsity)}"
    tag = tag or f"{args.method}{label}-{'cuda' if torch.cuda.is_available() else f'cpu-{os.cpu_count()}c'}"
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"finetune_{tag}.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    print(f"wrote {os.path.relpath(path, ROOT)}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
