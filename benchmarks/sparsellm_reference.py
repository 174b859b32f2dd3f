"""The official SparseLLM code (BaiTheBest/SparseLLM) beside ours, on the same model, calibration tokens and evaluation.

Their repository is NOT part of this project and is never copied into it: pass a checkout with `--repo` (we keep
ours in the git-ignored `.refs/SparseLLM`, extracted from a mirror with `git archive HEAD | tar -x`):

    OMP_NUM_THREADS=1 python benchmarks/sparsellm_reference.py --repo .refs/SparseLLM --settings 70% \
        --num-samples 16 --seq-len 256 --eval-windows 20 --tag n16_l256_70

What is called of theirs: `model_utils.llama_sparsellm(model, dataloader, dev, args)` (their Catcher, per-sample
block forwards, `SparseGPT_LlaMA.add_batch`/`fasterprune` from `pruning_utils.py`, SparseGPT on attention, then
the alternating W / prune / p / z / s loop on the MLP with α = β = γ = 5 and 4 iterations), with the `args`
namespace their `llama_main.py` would build. Their pruning math is not touched. Patches (all reverted after their
call, each recorded in the JSON under "patches"):

  1. `torch.cuda.synchronize` -> no-op. `fasterprune` calls it unconditionally; a CPU build of torch raises.
  2. `LlamaDecoderLayer.forward` -> when the caller passes no `position_embeddings`, compute them with the model's
     own `rotary_emb` from `position_ids` (or `arange(seq_len)`, which is what `LlamaModel.forward` uses). Their
     loop calls each block as `layer(x, attention_mask=mask)`, the transformers 4.45 signature; transformers 5
     Llama attention needs `(cos, sin)`. `check_layer_call` verifies that a block called their way returns what it
     returns inside the model's forward. (Their Catcher itself needs nothing: transformers 5 passes
     `attention_mask=None` for SDPA with no padding, which their code forwards as is and SDPA treats as causal,
     and a block now returns a tensor, whose `[0]` is the batch row their `outs[j] = ...[0]` expects.)
  3. `model.seqlen = L` (their `get_llama` hard-codes 2048; we do not call `get_llama`, we set the attribute it
     would set) and `dev = torch.device("cpu")` (their `llama_main.py` hard-codes `cuda`).
  4. Parameters cast to float16 for their call (buffers such as `rotary_emb.inv_freq` stay float32), back to
     float32 afterwards for the evaluation. Their loop hard-codes half precision (`Xinv = pinverse(X.float())
     .half()`, `av = inverse(...).to(float16)`, `s[:, chunk] = ....to(float16)`) and multiplies those with the
     model's activations, so it only runs on a float16 model (their Llama-2 checkpoints load as float16 with
     `torch_dtype='auto'`); on our float32 model it raises a dtype mismatch (method "reference-fp32" shows it).
  5. With `--layer-special-cases remap` (default): the one source line `if i == 1 or i == 30 or i == 31:` (a single
     global-loop iteration for layers 1, 30, 31 of a 32-layer Llama-2-7B) becomes `if i == 1 or i == n - 2 or
     i == n - 1:` for our n-layer model; the function is re-compiled from their source with only that line changed
     (in their module's namespace; their file is not written). `asis` runs their source unchanged (on a 30-layer
     model only layer 1 then gets one iteration).
  6. `--their-epochs K` (control only, off by default): `opt_epochs = 4` -> `opt_epochs = K`.

Calibration: `get_calibration_ids("wiki-offline", tokenizer, N, L, seed=0)`, handed to them as their
`get_loaders` format `[(input_ids[1, L], target), ...]`, and to `SparsePruner.apply(..., dataset=ids)`.
Evaluation: our `evaluate_perplexity(model, tokenizer, "wiki-offline", 512, max_windows=W)` in float32 for all.
Each run starts from a deep copy of the same dense float32 model. Prune seconds are the wall (and process CPU)
time of their call / of `SparsePruner.apply`; peak RSS is `resource.getrusage(RUSAGE_SELF).ru_maxrss` after
resetting the process high-water mark (`/proc/self/clear_refs` = 5) just before each prune, so it is the peak of
that prune (the process holds a pristine copy of the model throughout, the same for every method).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import importlib
import inspect
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import time
import traceback
from argparse import Namespace
from datetime import datetime, timezone

import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from optimum_sparse import PruningConfig, SparsePruner  # noqa: E402
from optimum_sparse.data.calibration import get_calibration_ids  # noqa: E402
from optimum_sparse.eval.perplexity import evaluate_perplexity  # noqa: E402
from optimum_sparse.models import load_model_and_tokenizer  # noqa: E402

RESULTS_DIR = os.path.join(HERE, "results")
LOG_DIR = os.path.join(RESULTS_DIR, "tmp")  # git-ignored: their (very verbose) stdout
SPECIAL_CASE_LINE = "if i == 1 or i == 30 or i == 31:"
EPOCHS_LINE = "opt_epochs = 4  # This might need to be adjusted"
METHODS = ("reference", "reference-fp32", "reference-fp32src", "sparsellm", "sparsegpt")
FP32_SOURCE_EDITS = (  # variant "reference-fp32src" only: their four hard-coded half-precision casts -> float32
    ("Xinv = torch.pinverse(X.to(dtype=torch.float32)).half()", "Xinv = torch.pinverse(X.to(dtype=torch.float32)).float()"),
    ("pinv = torch.pinverse(p.to(dtype=torch.float32)).half()", "pinv = torch.pinverse(p.to(dtype=torch.float32)).float()"),
    ("av = torch.inverse(m1 + m2).to(dtype=torch.float16)", "av = torch.inverse(m1 + m2).to(dtype=torch.float32)"),
    ("s[:,chunk] = s_batch.detach().to(dtype=torch.float16)", "s[:,chunk] = s_batch.detach().to(dtype=torch.float32)"),
)


# ----------------------------------------------------------------------------------------------- bookkeeping

def git_info(path: str) -> dict:
    def run(*cmd):
        try:
            return subprocess.run(["git", "-C", path, *cmd], capture_output=True, text=True, timeout=30).stdout.strip()
        except Exception:  # pragma: no cover
            return None
    status = run("status", "--porcelain", "--untracked-files=no") or ""
    return {"commit": run("rev-parse", "HEAD"), "dirty_tracked_files": [l[3:] for l in status.splitlines()]}


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def machine_info() -> dict:
    import transformers

    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except Exception:  # pragma: no cover
        pass
    with open("/proc/meminfo") as f:
        mem_kib = int(next(l for l in f if l.startswith("MemTotal")).split()[1])
    return {
        "platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
        "cpu_count": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)),
        "ram_gib": round(mem_kib / 2**20, 1), "torch": torch.__version__, "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "loadavg_start": os.getloadavg(),
    }


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # ru_maxrss is KiB on Linux


def parse_setting(text: str) -> dict:
    text = text.strip()
    if ":" in text:
        n, m = (int(v) for v in text.split(":"))
        return {"label": text, "structure": text, "sparsity": n / m, "prunen": n, "prunem": m}
    value = float(text.rstrip("%")) / (100 if text.endswith("%") or float(text) > 1 else 1)
    return {"label": f"{round(value * 100)}%", "structure": "unstructured", "sparsity": value, "prunen": 0, "prunem": 0}


def decoder_linears(model) -> dict:
    return {f"{i}.{n}": m for i, layer in enumerate(model.model.layers) for n, m in layer.named_modules()
            if isinstance(m, nn.Linear)}


def weight_stats(model, setting: dict) -> dict:
    zeros = total = nonfinite = 0
    per = {}
    nm_ok = True
    for name, lin in decoder_linears(model).items():
        w = lin.weight.detach()
        z = int((w == 0).sum())
        zeros += z
        total += w.numel()
        nonfinite += int((~torch.isfinite(w)).sum())
        per[name] = z / w.numel()
        if setting["prunem"]:
            groups = w.float().reshape(w.shape[0], -1, setting["prunem"])
            nm_ok &= bool(((groups == 0).sum(-1) >= setting["prunen"]).all())
    kinds = {}
    for name, s in per.items():
        kinds.setdefault(name.split(".", 1)[1], []).append(s)
    out = {"sparsity": zeros / total, "nonfinite_weights": nonfinite,
           "sparsity_min": min(per.values()), "sparsity_max": max(per.values()),
           "sparsity_by_linear": {k: round(sum(v) / len(v), 4) for k, v in sorted(kinds.items())}}
    if setting["prunem"]:
        out[f"every_group_has_{setting['prunen']}_zeros_of_{setting['prunem']}"] = nm_ok
    return out


# ------------------------------------------------------------------------------------------------ their code

def import_reference(repo: str):
    repo = os.path.abspath(repo)
    for mod in ("model_utils", "pruning_utils", "quant"):
        if mod in sys.modules and not os.path.abspath(getattr(sys.modules[mod], "__file__", "")).startswith(repo):
            raise RuntimeError(f"A different module named {mod!r} is already imported.")
    sys.path.insert(0, repo)
    module = importlib.import_module("model_utils")
    assert os.path.abspath(module.__file__).startswith(repo), module.__file__
    return module


def patched_llama_sparsellm(module, num_layers: int, special_cases: str, their_epochs, float32_source=False):
    """Their function, re-compiled from their source with at most the recorded one-line edits."""
    lines, start = inspect.getsourcelines(module.llama_sparsellm)
    source = "".join(lines)
    edits = []
    if special_cases == "remap" and num_layers != 32:
        new = f"if i == 1 or i == {num_layers - 2} or i == {num_layers - 1}:"
        assert source.count(SPECIAL_CASE_LINE) == 1, "their special-case line changed"
        source = source.replace(SPECIAL_CASE_LINE, new)
        edits.append({"from": SPECIAL_CASE_LINE, "to": new})
    if their_epochs is not None:
        new = f"opt_epochs = {their_epochs}  # CONTROL: was 4"
        assert source.count(EPOCHS_LINE) == 1, "their opt_epochs line changed"
        source = source.replace(EPOCHS_LINE, new)
        edits.append({"from": EPOCHS_LINE, "to": new})
    if float32_source:
        for old, new in FP32_SOURCE_EDITS:
            assert source.count(old) == 1, f"their line changed: {old}"
            source = source.replace(old, new)
            edits.append({"from": old, "to": new})
    if not edits:
        return module.llama_sparsellm, edits
    namespace = dict(module.__dict__)
    source = "\n" * (start - 1) + source  # tracebacks keep their file's line numbers
    exec(compile(source, module.__file__, "exec"), namespace)  # their globals; their file untouched
    return namespace["llama_sparsellm"], edits


@contextlib.contextmanager
def reference_patches(model, counters: dict):
    """torch.cuda.synchronize no-op; Llama blocks compute position_embeddings when the caller gives none."""
    from transformers.models.llama import modeling_llama

    layer_cls = modeling_llama.LlamaDecoderLayer
    original_forward = layer_cls.forward
    original_sync = torch.cuda.synchronize
    rotary = model.model.rotary_emb

    def forward(self, hidden_states, *args, position_embeddings=None, position_ids=None, **kwargs):
        if position_embeddings is None:
            counters["position_embeddings_injected"] = counters.get("position_embeddings_injected", 0) + 1
            if position_ids is None:
                position_ids = torch.arange(hidden_states.shape[1], device=hidden_states.device).unsqueeze(0)
            position_embeddings = rotary(hidden_states, position_ids)
        return original_forward(self, hidden_states, *args, position_embeddings=position_embeddings,
                                position_ids=position_ids, **kwargs)

    def synchronize(*args, **kwargs):
        counters["cuda_synchronize_skipped"] = counters.get("cuda_synchronize_skipped", 0) + 1

    layer_cls.forward = forward
    torch.cuda.synchronize = synchronize
    try:
        yield
    finally:
        layer_cls.forward = original_forward
        torch.cuda.synchronize = original_sync


@torch.no_grad()
def check_layer_call(model, ids: torch.Tensor) -> dict:
    """Max |diff| between blocks called their way (patched) and inside the model's own forward, float32."""
    seen = {}
    layers = model.model.layers
    picks = [0, len(layers) - 1]

    def hook(i):
        def fn(module, args, kwargs, output):
            seen[i] = (args[0] if args else kwargs["hidden_states"]).clone(), output.clone(), kwargs.get("attention_mask")
        return fn

    handles = [layers[i].register_forward_hook(hook(i), with_kwargs=True) for i in picks]
    try:
        model(ids[:1], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = {}
    with reference_patches(model, {}):
        for i in picks:
            x, y, mask = seen[i]
            their = layers[i](x, attention_mask=mask)[0]  # exactly their call, and their [0]
            out[f"layer_{i}_max_abs_diff"] = float((their - y[0]).abs().max())
            out[f"layer_{i}_attention_mask_passed"] = None if mask is None else list(mask.shape)
    return out


TRACE_POINTS = (  # (label, the first line of their source at which the state is read; read BEFORE it runs)
    ("iter_start", "if opt_step > 0:   # for the first step, no need for updating W"),
    ("before_pinv_p", "pinv = torch.pinverse(p.to(dtype=torch.float32)).half()"),
    ("after_W_update", "if opt_step > 0:   # for the first step, no need for updating H"),
    ("after_prune", "next_weight = subset['mlp.down_proj'].weight"),
    ("after_p_update", "del layer_nl_output, next_weight, av, m3, m4, af"),
    ("after_z_update", "w = subset['mlp.gate_proj'].weight"),
    ("after_s_update", "tmp_training_loss = "),
)
TRACE_TENSORS = ("X", "Y", "Xinv", "s", "z", "p", "av", "m3", "m4", "af")


@contextlib.contextmanager
def trace_their_loop(module, records: list):
    """Read-only instrumentation (sys.settrace) of their llama_sparsellm: at fixed lines of each global-loop
    iteration, the max |value| and non-finite count of their activations and MLP weights, and (before their s
    gradient step) the share of elements where that step is unstable, lr·(2α + 2γ(z·silu'(s))²) > 2 (lr 0.01,
    α = γ = 5, their values). Nothing of theirs is changed."""
    lines, start = inspect.getsourcelines(module.llama_sparsellm)
    points = {}
    for label, text in TRACE_POINTS:
        hits = [start + k for k, line in enumerate(lines) if line.strip().startswith(text)]
        assert len(hits) == 1, (label, hits)
        points[hits[0]] = label
    filename = module.__file__

    def stat(t):
        t = t.detach().float()
        finite = torch.isfinite(t)
        return [float(t[finite].abs().max()) if finite.any() else None, int((~finite).sum())]

    def local(frame, event, arg):
        if event == "line" and frame.f_lineno in points:
            loc = frame.f_locals
            rec = {"layer": loc.get("i"), "step": loc.get("opt_step"), "at": points[frame.f_lineno]}
            for name in TRACE_TENSORS:
                if isinstance(loc.get(name), torch.Tensor):
                    rec[name] = stat(loc[name])
            subset = loc.get("subset") or {}
            for name in ("mlp.up_proj", "mlp.gate_proj", "mlp.down_proj"):
                if name in subset:
                    rec["W_" + name.split(".")[1]] = stat(subset[name].weight)
            if rec["at"] == "after_z_update" and all(isinstance(loc.get(n), torch.Tensor) for n in ("s", "z")):
                sf, zf = loc["s"].float(), loc["z"].float()
                sig = torch.sigmoid(sf)
                slope = zf * sig * (1 + sf * (1 - sig))
                unstable = 0.01 * (2 * 5.0 + 2 * 5.0 * slope.pow(2)) > 2
                rec["s_step_unstable_fraction"] = float(unstable.float().mean())
                rec["max_abs_z_times_dsilu"] = float(slope[torch.isfinite(slope)].abs().max())
            if not records or any(records[-1].get(k) != rec[k] for k in ("layer", "step", "at")):
                records.append(rec)
        return local

    def global_(frame, event, arg):
        if event == "call" and frame.f_code.co_name == "llama_sparsellm" and frame.f_code.co_filename == filename:
            return local
        return None

    previous = sys.gettrace()
    sys.settrace(global_)
    try:
        yield
    finally:
        sys.settrace(previous)


def first_nonfinite(records: list):
    for rec in records:
        bad = [k for k, v in rec.items() if isinstance(v, list) and v[1] > 0]
        if bad:
            return {"layer": rec["layer"], "step": rec["step"], "at": rec["at"], "nonfinite": bad}
    return None


def cast_parameters(model, dtype) -> None:
    for p in model.parameters():  # the GGUF-loaded model refuses .half(); buffers (inv_freq) stay float32
        p.data = p.data.to(dtype)


def parse_their_log(path: str) -> dict:
    errors, layer, first_nonfinite = [], None, None
    with open(path, errors="replace") as f:
        for line in f:
            m = re.match(r"^(\d+) (\S+)$", line.strip())
            if m:
                layer = (int(m.group(1)), m.group(2))
            elif line.startswith("error "):
                value = float(line.split()[1])
                errors.append(value)
                if not math.isfinite(value) and first_nonfinite is None:
                    first_nonfinite = {"layer": layer[0], "linear": layer[1]} if layer else True
    return {"last_layer_seen": list(layer) if layer else None, "fasterprune_calls": len(errors), "nonfinite_fasterprune_errors": sum(not math.isfinite(e) for e in errors),
            "first_nonfinite_fasterprune": first_nonfinite}


def run_reference(model, ids, setting, args, fn, log_path, dtype, counters, module=None, records=None) -> None:
    their_args = Namespace(
        nsamples=ids.shape[0], sparsity=setting["sparsity"], prunen=setting["prunen"], prunem=setting["prunem"],
        percdamp=0.01, blocksize=128, wbits=16, minlayer=-1, maxlayer=1000, prune_only="", invert=False,
        true_sequential=False, seed=0, gmp=False,
    )
    dataloader = []
    for row in ids:  # their get_loaders format: (inp [1, seqlen], tar with all but the last token = -100)
        inp = row.unsqueeze(0).clone()
        tar = inp.clone()
        tar[:, :-1] = -100
        dataloader.append((inp, tar))
    cast_parameters(model, dtype)
    model.seqlen = ids.shape[1]
    try:
        tracing = trace_their_loop(module, records) if records is not None else contextlib.nullcontext()
        with reference_patches(model, counters), open(log_path, "w") as log, contextlib.redirect_stdout(log), tracing:
            fn(model, dataloader, torch.device("cpu"), their_args)
    finally:
        cast_parameters(model, torch.float32)


# ------------------------------------------------------------------------------------------------------ main

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", required=True, help="Checkout of BaiTheBest/SparseLLM.")
    p.add_argument("--repo-commit", default=None, help="Commit of that checkout (a `git archive` has no .git).")
    p.add_argument("--methods", nargs="+", default=["reference", "sparsellm", "sparsegpt"], choices=METHODS)
    p.add_argument("--settings", nargs="+", default=["70%"], help="e.g. 70%% 80%% 2:4")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=20)
    p.add_argument("--layer-special-cases", choices=["remap", "asis"], default="remap")
    p.add_argument("--their-epochs", type=int, default=None, help="CONTROL: override their opt_epochs = 4.")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-trace", action="store_true", help="Skip the read-only trace of their loop.")
    p.add_argument("--tag", default=None)
    p.add_argument("--output", default=None)
    return p


def main(argv=None) -> dict:
    a = build_parser().parse_args(argv)
    torch.set_num_threads(a.threads)
    tag = a.tag or f"n{a.num_samples}_l{a.seq_len}"
    output = a.output or os.path.join(RESULTS_DIR, f"sparsellm_reference_{tag}.json")
    os.makedirs(LOG_DIR, exist_ok=True)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")

    model, tok = load_model_and_tokenizer(a.model)
    model.eval()
    ids = get_calibration_ids("wiki-offline", tok, a.num_samples, a.seq_len, seed=0)

    def ppl(m):
        return evaluate_perplexity(m, tok, "wiki-offline", a.eval_seq_len, max_windows=a.eval_windows, progress=False)

    result = {
        "what": "official SparseLLM (BaiTheBest/SparseLLM llama_sparsellm) vs optimum-sparse, same model/ids/eval",
        "started": started, "command": " ".join([sys.executable] + sys.argv),
        "model": a.model, "model_dtype": str(next(model.parameters()).dtype),
        "num_layers": model.config.num_hidden_layers, "hidden_size": model.config.hidden_size,
        "intermediate_size": model.config.intermediate_size,
        "calibration": {"source": "wiki-offline", "num_samples": a.num_samples, "seq_len": a.seq_len, "seed": 0,
                        "ids_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest()},
        "evaluation": {"function": "optimum_sparse.eval.perplexity.evaluate_perplexity", "source": "wiki-offline",
                       "seq_len": a.eval_seq_len, "max_windows": a.eval_windows, "dtype": "float32"},
        "ours": {"git": git_info(ROOT), "sha256": {f: sha256(os.path.join(ROOT, "optimum_sparse", "methods", f))
                                                    for f in ("sparsellm.py", "sparsegpt.py")}},
        "machine": machine_info(),
        "runs": [],
    }
    needs_reference = any(m.startswith("reference") for m in a.methods)
    if needs_reference:
        module = import_reference(a.repo)
        fn, edits = patched_llama_sparsellm(module, model.config.num_hidden_layers, a.layer_special_cases,
                                            a.their_epochs)
        fn32, edits32 = patched_llama_sparsellm(module, model.config.num_hidden_layers, a.layer_special_cases,
                                                a.their_epochs, float32_source=True)
        repo = os.path.abspath(a.repo)
        result["reference"] = {
            "repo": "BaiTheBest/SparseLLM", "path": a.repo,
            "commit": a.repo_commit or git_info(repo).get("commit"),
            "sha256": {f: sha256(os.path.join(repo, f)) for f in ("model_utils.py", "pruning_utils.py", "quant.py")},
            "function": "model_utils.llama_sparsellm", "hyperparameters_in_their_code":
                {"alpha": 5.0, "beta": 5.0, "gamma": 5.0, "opt_epochs": their_epochs_note(a.their_epochs),
                 "percdamp": 0.01, "blocksize": 128, "s_update": "2 epochs GD lr 0.01, 1000-token chunks"},
        }
        result["patches"] = patch_list(a, edits, model.config.num_hidden_layers)
        if "reference-fp32src" in a.methods:
            result["patches_reference_fp32src_extra"] = [
                {"target": "model_utils.llama_sparsellm source line", "change": f"{e['from']!r} -> {e['to']!r}",
                 "why": "VARIANT reference-fp32src only: their hard-coded float16 casts overflow (see "
                        "their_trace_first_nonfinite); the model stays float32, no parameter cast"}
                for e in edits32 if e not in edits]
        t = time.perf_counter()
        result["layer_call_check"] = check_layer_call(model, ids)
        print("layer call check", result["layer_call_check"], f"({time.perf_counter() - t:.1f}s)", flush=True)

    t = time.perf_counter()
    result["dense_ppl"] = ppl(model)
    print(f"dense ppl {result['dense_ppl']:.3f} ({time.perf_counter() - t:.1f}s)", flush=True)
    if needs_reference:
        rounded = copy.deepcopy(model)
        cast_parameters(rounded, torch.float16)
        cast_parameters(rounded, torch.float32)
        result["dense_ppl_float16_rounded_weights"] = ppl(rounded)
        del rounded
        print(f"dense ppl, fp16-rounded weights {result['dense_ppl_float16_rounded_weights']:.3f}", flush=True)

    def save():
        result["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        result["machine"]["loadavg_end"] = os.getloadavg()
        with open(output + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(output + ".tmp", output)

    interrupted = False
    for setting_text in a.settings:
        setting = parse_setting(setting_text)
        for method in a.methods:
            run = {"method": method, "setting": setting["label"], "structure": setting["structure"],
                   "sparsity_target": setting["sparsity"]}
            if method.startswith("reference"):
                run["their_args"] = {"sparsity": setting["sparsity"], "prunen": setting["prunen"],
                                     "prunem": setting["prunem"], "nsamples": a.num_samples}
            pruned = copy.deepcopy(model)
            counters: dict = {}
            records = [] if (method in ("reference", "reference-fp32src") and not a.no_trace) else None
            if method.startswith("reference"):
                run["traced"] = records is not None  # the trace costs ~3x CPU time: no timing when traced
            log_path = os.path.join(LOG_DIR, f"sparsellm_reference_{tag}_{method}_{setting['label'].replace(':', 'of').replace('%', 'pct')}.log")
            run["peak_rss_reset"] = reset_peak_rss()
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                if method == "reference":
                    run["their_dtype"] = "float16"
                    run_reference(pruned, ids, setting, a, fn, log_path, torch.float16, counters, module, records)
                elif method == "reference-fp32":
                    run["their_dtype"] = "float32"
                    run_reference(pruned, ids, setting, a, fn, log_path, torch.float32, counters)
                elif method == "reference-fp32src":
                    run["their_dtype"] = "float32 (their 4 float16 casts edited to float32)"
                    run_reference(pruned, ids, setting, a, fn32, log_path, torch.float32, counters, module, records)
                else:
                    cfg = PruningConfig(method=method, sparsity=setting["sparsity"], structure=setting["structure"],
                                        num_samples=a.num_samples, seq_len=a.seq_len)
                    run["config"] = {k: v for k, v in cfg.to_dict().items() if k != "library_version"}
                    SparsePruner(cfg).apply(pruned, tokenizer=tok, dataset=ids, progress=False)
                run["status"] = "ok"
            except KeyboardInterrupt:  # `timeout -s INT`: record how far it got
                run["status"] = "interrupted"
                run["error"] = "KeyboardInterrupt (wall-clock cap of this benchmark, not a failure of the method)"
                interrupted = True
            except Exception as err:  # recorded faithfully, never hidden
                run["status"] = "error"
                run["error"] = f"{type(err).__name__}: {err}"
                run["traceback_tail"] = traceback.format_exc().strip().splitlines()[-8:]
            run["prune_seconds"] = round(time.perf_counter() - wall, 1)
            run["prune_cpu_seconds"] = round(time.process_time() - cpu, 1)
            run["peak_rss_mib"] = peak_rss_mib()
            run["loadavg_after"] = os.getloadavg()
            if counters:
                run["patch_counters"] = counters
            if records is not None:
                run["their_trace_first_nonfinite"] = first_nonfinite(records)
                run["their_trace"] = records
            if method.startswith("reference") and os.path.exists(log_path):
                run["their_log"] = os.path.relpath(log_path, ROOT)
                run["their_log_summary"] = parse_their_log(log_path)
            print(f"[{setting['label']}] {method}: {run['status']} in {run['prune_seconds']}s", flush=True)
            if run["status"] == "ok" and not interrupted:
                run.update(weight_stats(pruned, setting))
                t = time.perf_counter()
                value = ppl(pruned)
                run["ppl"] = value if math.isfinite(value) else str(value)
                run["eval_seconds"] = round(time.perf_counter() - t, 1)
                print(f"    ppl {value:.3f}  sparsity {run['sparsity']:.4f}  nonfinite {run['nonfinite_weights']}",
                      flush=True)
            else:
                print("    " + run.get("error", ""), flush=True)
            del pruned
            result["runs"].append(run)
            save()
            if interrupted:
                break
        if interrupted:
            break
    save()
    print("wrote", output)
    return result


def their_epochs_note(their_epochs):
    return 4 if their_epochs is None else f"{their_epochs} (CONTROL override of 4)"


def patch_list(a, edits, num_layers) -> list:
    patches = [
        {"target": "torch.cuda.synchronize", "change": "no-op during their call",
         "why": "SparseGPT_LlaMA.fasterprune calls it unconditionally; CPU-only torch raises"},
        {"target": "transformers LlamaDecoderLayer.forward",
         "change": "if position_embeddings is None: position_embeddings = model.model.rotary_emb(h, position_ids or "
                   "arange(seq_len)[None]); otherwise unchanged",
         "why": "their loop calls layer(x, attention_mask=mask) (transformers 4.45 signature); transformers 5 Llama "
                "attention needs (cos, sin). Verified equal to the in-model block output (layer_call_check)."},
        {"target": "model.seqlen", "change": f"= {a.seq_len} (their get_llama hard-codes 2048; not called)",
         "why": "our calibration windows are L tokens"},
        {"target": "dev", "change": "torch.device('cpu') (llama_main.py hard-codes 'cuda')", "why": "no GPU"},
        {"target": "model parameters dtype",
         "change": "cast to float16 for their call (buffers stay float32), back to float32 for the evaluation",
         "why": "their loop hard-codes float16 (Xinv .half(), av .to(float16), s chunks .to(float16)) and mixes it "
                "with the model's activations; a float32 (or bfloat16) model raises a dtype mismatch"},
        {"target": "data", "change": "dataloader = [(ids[i:i+1], target)] from our get_calibration_ids, "
                                     "instead of their get_loaders('c4') download", "why": "same tokens for all"},
        {"target": "args", "change": "Namespace as llama_main.py builds it: percdamp 0.01, blocksize 128, wbits 16, "
                                     "minlayer -1, maxlayer 1000, prune_only '', invert False, true_sequential False",
         "why": "their defaults"},
    ]
    for e in edits:
        patches.append({"target": "model_utils.llama_sparsellm source line", "change": f"{e['from']!r} -> {e['to']!r}",
                        "why": ("their per-layer special case is written for a 32-layer model (layers 1, 30, 31 get "
                                f"one iteration); remapped to layers 1, n-2, n-1 for n = {num_layers}")
                        if "opt_epochs" not in e["from"] else "CONTROL run only"})
    if a.layer_special_cases == "asis":
        patches.append({"target": "model_utils.llama_sparsellm", "change": "none (special cases as is)",
                        "why": f"on {num_layers} layers only layer 1 gets one iteration"})
    return patches


if __name__ == "__main__":
    main()
