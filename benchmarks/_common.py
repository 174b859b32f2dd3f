"""Shared helpers of the benchmark scripts: machine/git provenance, fresh-model reloads, peak-memory probes,
calibration/evaluation tokens, atomic JSON writes. Not part of the package."""

from __future__ import annotations

import copy
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")

__all__ = [
    "REPO_ROOT", "RESULTS_DIR", "machine_info", "git_info", "command_line", "default_tag", "write_json",
    "PeakMemory", "ModelBank", "calibration_ids", "evaluation_stream", "perplexity", "parse_setting",
    "setting_label", "loadavg", "timed", "configure", "resume_from",
]


# ----- provenance ---------------------------------------------------------------------------------------------
def _cpu_model() -> dict:
    info = {"model_name": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            text = f.read()
        fields = {}
        for line in text.splitlines():
            if ":" in line:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
        info["model_name"] = fields.get("model name", info["model_name"])
        info["family"] = fields.get("cpu family")
        info["model"] = fields.get("model")
        flags = set(fields.get("flags", "").split())
        info["isa"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16") if f in flags]
        info["hypervisor"] = "hypervisor" in flags
    except OSError:
        pass
    return info


def machine_info(device: str = "cpu") -> dict:
    """CPU model, cores, memory, library versions and (when used) the GPU."""
    import transformers

    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    try:
        import psutil

        info["ram_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda}
    try:
        from optimum_sparse import __version__

        info["optimum_sparse"] = __version__
    except ImportError:  # pragma: no cover
        pass
    return info


def git_info() -> dict:
    """Commit of the checkout and whether package files differ from it."""

    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False).stdout.strip()

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--", "optimum_sparse")
    return {"commit": commit or None, "package_dirty": bool(dirty), "dirty_files": dirty.splitlines()[:20]}


def command_line() -> str:
    """The command that produced a result, as it would be typed (`python benchmarks/...`)."""
    return " ".join(shlex.quote(a) for a in ["python", *sys.argv])


def default_tag(device: str = "cpu") -> str:
    """A short machine tag for result file names: `cpu-2c`, or the GPU name (`nvidia-h100-80gb-hbm3`)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0).lower()
        return "".join(c if c.isalnum() else "-" for c in name).strip("-")
    return f"cpu-{os.cpu_count()}c"


def loadavg() -> Optional[list]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def resume_from(output: str, results: dict, logger) -> None:
    """Keeps the runs of `output` in `results` when it was made with the same `settings` (logged either way)."""
    if not os.path.isfile(output):
        return
    with open(output, encoding="utf-8") as f:
        previous = json.load(f)
    if previous.get("settings") != results["settings"]:
        logger.warning("Not resuming: %s was made with other settings.", output)
        return
    results["runs"] = previous["runs"]
    results["created"] = previous.get("created", results["created"])
    results["resumed_commands"] = previous.get("resumed_commands", []) + [previous.get("command")]
    logger.info("Resuming: %d runs kept from %s.", len(results["runs"]), output)


def write_json(path: str, data: Any) -> None:
    """Atomic JSON write (temporary file in the same folder, then rename)."""
    from optimum_sparse.utils import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


# ----- peak memory ---------------------------------------------------------------------------------------------
def _proc_status(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak resident memory of this process over a region, and peak CUDA memory when on GPU.

    On Linux the kernel's high-water mark (`VmHWM`) is reset at the start of the region by writing 5 to
    `/proc/self/clear_refs`, and read at the end: an exact per-region peak, unlike `ru_maxrss`, which only grows
    over a process's life. Elsewhere a psutil thread samples RSS every 10 ms.
    """

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.method = None
        self.before = 0
        self.peak = 0
        self._samples: list[int] = []
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self) -> "PeakMemory":
        self.before = _proc_status("VmRSS") or 0
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM (reset through /proc/self/clear_refs)"
        except OSError:
            import psutil

            proc = psutil.Process()
            self.before = proc.memory_info().rss
            self.method = "psutil RSS sampled every 10 ms"

            def sample():
                while not self._stop.is_set():
                    self._samples.append(proc.memory_info().rss)
                    time.sleep(0.01)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._samples + [self.before])
        else:
            self.peak = _proc_status("VmHWM") or 0

    def to_dict(self) -> dict:
        out = {
            "peak_rss_mib": round(self.peak / 2**20, 1),
            "rss_before_mib": round(self.before / 2**20, 1),
            "peak_rss_increase_mib": round((self.peak - self.before) / 2**20, 1),
        }
        if self.device.startswith("cuda"):
            out["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return out


# ----- model, data, evaluation ---------------------------------------------------------------------------------
class ModelBank:
    """Loads a model once and restores its original weights before every run (faster than re-parsing GGUF)."""

    def __init__(self, name: str, device: str = "cpu"):
        from optimum_sparse.models import load_model_and_tokenizer

        started = time.perf_counter()
        self.model, self.tokenizer = load_model_and_tokenizer(name, dtype=torch.float32)
        self.model.eval()
        self.device = device
        self.model.to(device)
        self.load_seconds = time.perf_counter() - started
        self._state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        self._config = copy.deepcopy(self.model.config.to_dict())

    def fresh(self):
        """Restores the original weights in place and returns the model."""
        self.model.load_state_dict(self._state, strict=True)
        for attr in ("pruning_config",):
            if hasattr(self.model, attr):
                delattr(self.model, attr)
        return self.model


def calibration_ids(tokenizer, num_samples: int, seq_len: int, seed: int, source: str = "wiki-offline") -> torch.Tensor:
    """Our calibration windows `[num_samples, seq_len]` (the same tensor every method gets)."""
    from optimum_sparse.data import get_calibration_ids

    return get_calibration_ids(source, tokenizer, num_samples, seq_len, seed)


def evaluation_stream(tokenizer, source: str = "wiki-offline") -> torch.Tensor:
    """The held-out evaluation split as one token stream (never the calibration split)."""
    from optimum_sparse.data import load_texts, tokenize_texts

    return tokenize_texts(load_texts(source, "evaluation"), tokenizer)


def perplexity(model, stream: torch.Tensor, seq_len: int, max_windows: Optional[int], batch_size: int = 1) -> float:
    from optimum_sparse.eval import evaluate_perplexity

    return evaluate_perplexity(model, None, stream, seq_len=seq_len, batch_size=batch_size,
                               max_windows=max_windows, progress=False)


# ----- settings -------------------------------------------------------------------------------------------------
def parse_setting(text: str) -> tuple[str, float]:
    """`"50%"`, `"0.5"` → `("unstructured", 0.5)`; `"2:4"` → `("2:4", 0.5)`."""
    text = text.strip()
    if ":" in text:
        n, m = (int(x) for x in text.split(":"))
        return text, n / m
    value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    if value > 1:
        value /= 100
    return "unstructured", value


def setting_label(structure: str, sparsity: float) -> str:
    return structure if structure != "unstructured" else f"{round(sparsity * 100)}%"


@contextmanager
def timed() -> Iterator[dict]:
    out = {}
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield out
    finally:
        out["wall"] = time.perf_counter() - wall
        out["cpu"] = time.process_time() - cpu


def configure(threads: Optional[int]) -> None:
    """Benchmark logging (INFO, library at WARNING) and the torch thread count."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("optimum_sparse").setLevel(logging.WARNING)
    if threads:
        torch.set_num_threads(threads)


def add_upcycled_moe_args(p) -> None:
    """The arguments of the benchmarks on the MoE upcycled from a dense model (`moe.py`, `moe_expert_channels.py`)."""
    p.add_argument("--model", default="smollm2-135m", help="Dense Llama-layout model (alias, folder or Hub id).")
    p.add_argument("--experts", type=int, default=4, help="Experts per block of the upcycled model.")
    p.add_argument("--top-k", type=int, default=2, help="Experts per token.")
    p.add_argument("--num-samples", type=int, default=16, help="Calibration windows (pruning and k-means).")
    p.add_argument("--seq-len", type=int, default=512, help="Tokens per calibration window.")
    p.add_argument("--seed", type=int, default=0, help="Calibration sampling and k-means seed.")
    p.add_argument("--batch-size", type=int, default=8, help="Calibration windows per forward.")
    p.add_argument("--eval-seq-len", type=int, default=512, help="Perplexity window length.")
    p.add_argument("--max-windows", type=int, default=8, help="Evaluation windows (held-out split).")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads.")
    p.add_argument("--tag", default=None, help="Machine tag of the output name (default cpu-<cores>c).")
