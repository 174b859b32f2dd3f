"""The CUDA path, checked in one script: every method on random Llama-3-8B- and Qwen3-MoE-shaped bf16 models.

    python benchmarks/gpu_check.py                                   # one GPU: < 8 min on an H100 (2 blocks each)
    python benchmarks/gpu_check.py --sparsegpt-repo .refs/sparsegpt  # + the official SparseGPT solver, same GPU
    python benchmarks/gpu_check.py --device cpu --tiny               # the same code path on the CPU (in the tests)

Each model is built from a config on the machine (random weights, bf16, the real per-block shapes; `--layers` blocks
instead of the full depth, since every block has the same shape) and kept on the CPU: `PruningConfig.device` sends
one block at a time to the GPU and back, as for a model whose blocks are offloaded to the CPU. For every method the
script records, per model:

  * `status`: `ok`, `refused` (an optimum-sparse error or `ValueError` with every weight unchanged, e.g. a structured
    method on a layout it does not support) or `error` (anything else; a device error is flagged `device_error`);
  * `finite`: every block weight is finite after the run;
  * `peak_gpu_mib` beside `block_mib` (one block's weights): the memory bound of the engine is one block plus its
    statistics and calibration activations;
  * `seconds_per_block` (the report's block times) and, with `--sparsegpt-repo`, the official SparseGPT solver's
    time on block 0 of the same dense model on the same device (`fasterprune` on every linear, the repo's
    `llama_sequential` pattern);
  * `sparsity_targets` (the pruned linears) and `sparsity_all_block_weights` (every weight matrix or expert stack of
    the blocks, routers included, norms excluded), both counted from the weights. On a MoE model the second shows
    how much of the block the run really pruned (expert weights are only pruned where the engine targets them).

The JSON goes to `benchmarks/results/gpu_check_<machine>.json` (or `--output`). Exit status 1 when a method hit a
device error or wrote a non-finite weight.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import time
from datetime import datetime, timezone
from typing import Optional

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's optimum_sparse
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS_DIR, command_line, default_tag, git_info, loadavg, machine_info, write_json  # noqa: E402

logger = logging.getLogger("benchmarks.gpu_check")

METHODS = ["magnitude", "wanda", "sparsegpt", "sparsellm", "alps", "flap"]
_DEVICE_WORDS = ("device", "Expected all tensors", "cuda", "CUDA")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda", help="Solve device ('cuda', 'cuda:1', 'cpu').")
    p.add_argument("--tiny", action="store_true", help="Tiny shapes and calibration (the test-suite form).")
    p.add_argument("--models", nargs="+", default=["llama3-8b", "qwen3-moe"], choices=["llama3-8b", "qwen3-moe"])
    p.add_argument("--methods", nargs="+", default=METHODS, help="Methods to run on each model.")
    p.add_argument("--layers", type=int, default=2, help="Blocks per model (each with the real block shapes).")
    p.add_argument("--num-samples", type=int, default=None, help="Calibration sequences (default 16; tiny 4).")
    p.add_argument("--seq-len", type=int, default=None, help="Tokens per sequence (default 2048; tiny 32).")
    p.add_argument("--sparsity", type=float, default=0.5, help="Unstructured sparsity (structured methods: 0.2).")
    p.add_argument("--sparsegpt-repo", default=None,
                   help="Checkout of IST-DASLab/sparsegpt (git-ignored .refs/sparsegpt); its solver is timed beside ours.")
    p.add_argument("--output", default=None, help="JSON path (default benchmarks/results/gpu_check_<machine>.json).")
    p.add_argument("--seed", type=int, default=0)
    return p


def model_config(name: str, tiny: bool, layers: int):
    """A Llama-3-8B- or Qwen3-30B-A3B-shaped config (`tiny`: the same layout at toy sizes)."""
    import transformers

    if name == "llama3-8b":
        sizes = (dict(hidden_size=64, intermediate_size=224, num_attention_heads=8, num_key_value_heads=2, vocab_size=256)
                 if tiny else dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                   num_key_value_heads=8, vocab_size=128256))
        return transformers.LlamaConfig(num_hidden_layers=layers, max_position_embeddings=8192, rope_theta=500000.0,
                                        **sizes)
    sizes = (dict(hidden_size=64, moe_intermediate_size=32, intermediate_size=128, num_experts=8, num_experts_per_tok=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256)
             if tiny else dict(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_experts=128,
                               num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                               vocab_size=151936))
    return transformers.Qwen3MoeConfig(num_hidden_layers=layers, max_position_embeddings=8192, **sizes)


def build_model(name: str, tiny: bool, layers: int, seed: int) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(model_config(name, tiny, layers), dtype=torch.bfloat16)
    return model.eval()


def block_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight matrix (or expert stack) of the decoder blocks, by full name; norms and biases excluded."""
    from optimum_sparse.engine.architectures import get_architecture

    prefix = get_architecture(model).blocks
    return {name: p for name, p in model.named_parameters() if name.startswith(prefix + ".") and p.dim() >= 2}


def measured_sparsity(tensors) -> Optional[float]:
    tensors = list(tensors)
    total = sum(t.numel() for t in tensors)
    return sum(int((t == 0).sum()) for t in tensors) / total if total else None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextlib.contextmanager
def _peak_gpu(device: str):
    stats = {}
    if device.startswith("cuda"):
        _sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    yield stats
    if device.startswith("cuda"):
        _sync(device)
        stats["peak_gpu_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)


def run_method(model, dense: dict, method: str, args, ids: torch.Tensor, targets_before: set) -> dict:
    """One method on the dense weights: status, timing, memory, finiteness and measured sparsity."""
    from optimum_sparse import OptimumSparseError, PruningConfig, SparsePruner

    model.load_state_dict(dense)
    structured = method in ("flap", "structprune", "wanda-structured", "magnitude-structured")
    kwargs = dict(structure="channels", sparsity=0.2) if structured else dict(sparsity=args.sparsity)
    config = PruningConfig(method=method, num_samples=ids.shape[0], seq_len=ids.shape[1], batch_size=1,
                           device=args.device, seed=args.seed, **kwargs)
    out = {"method": method, "config": {k: config.to_dict()[k] for k in ("structure", "sparsity", "device")}}
    pruner = SparsePruner(config)
    started = time.perf_counter()
    try:
        with _peak_gpu(args.device) as peak:
            pruner.apply(model, dataset=ids, progress=False)
        out["status"] = "ok"
    except (OptimumSparseError, ValueError) as err:
        unchanged = all(torch.equal(v, dense[k]) for k, v in model.state_dict().items() if k in dense)
        out.update(status="refused" if unchanged else "error", error=f"{type(err).__name__}: {err}"[:2000])
        return out
    except Exception as err:  # recorded, never hidden: the point of this script is to find these
        text = f"{type(err).__name__}: {err}"
        out.update(status="error", error=text[:2000], device_error=any(w in text for w in _DEVICE_WORDS))
        logger.exception("%s failed", method)
        return out
    out["seconds"] = round(time.perf_counter() - started, 3)
    out.update(peak)
    blocks = pruner.report.blocks
    out["seconds_per_block"] = [round(b["seconds"], 3) for b in blocks] if blocks else None
    weights = block_weights(model)
    out["finite"] = all(bool(torch.isfinite(w).all()) for w in weights.values())
    layer_names = {r.name + ".weight" for r in pruner.report.layers}
    out["pruned_layers"] = len(layer_names)
    out["sparsity_targets"] = measured_sparsity(w for n, w in weights.items() if n in layer_names)
    out["sparsity_all_block_weights"] = measured_sparsity(weights.values())
    out["report_mean_sparsity"] = pruner.report.mean_sparsity
    if pruner.structured_summary:
        out["removed_prunable_fraction"] = pruner.structured_summary.get("achieved_prunable_fraction")
        out["shrunk"] = True
    out["block_weights_not_targeted"] = sorted({n.split(".", 3)[-1] for n in weights if n not in layer_names
                                                and n in targets_before})[:20]
    return out


def official_sparsegpt_block0(repo: str, model, ids: torch.Tensor, device: str, sparsity: float) -> dict:
    """The authors' `SparseGPT` (add_batch + fasterprune) on every linear of block 0, timed on `device`."""
    from optimum_sparse.engine.architectures import find_blocks
    from optimum_sparse.engine.capture import capture_block_inputs

    sys.path.insert(0, os.path.abspath(repo))
    try:
        module = __import__("sparsegpt")
    finally:
        sys.path.pop(0)
    blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks[0], ids, 1)
    block = blocks[0].to(device)
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    patch = contextlib.nullcontext() if device.startswith("cuda") else _no_cuda_sync()
    try:
        with patch, torch.no_grad(), _peak_gpu(device) as peak:
            _sync(device)
            started = time.perf_counter()
            solvers = {n: module.SparseGPT(m) for n, m in linears.items()}
            handles = [m.register_forward_hook(lambda mod, a, o, n=n: solvers[n].add_batch(a[0].data, o.data))
                       for n, m in linears.items()]
            for i in range(len(inputs)):
                block(inputs.hidden[i].to(device), *_to(inputs.args[i], device), **_to(inputs.kwargs[i], device))
            for h in handles:
                h.remove()
            with contextlib.redirect_stdout(io.StringIO()):  # fasterprune prints its time and error
                for name, solver in solvers.items():
                    solver.fasterprune(sparsity, prunen=0, prunem=0, blocksize=128, percdamp=0.01)
                    solver.free()
            _sync(device)
            seconds = time.perf_counter() - started
    finally:
        blocks[0].to("cpu")
    return {"seconds_block0": round(seconds, 3), **peak, "linears": len(linears),
            "note": "IST-DASLab/sparsegpt SparseGPT.add_batch/fasterprune, all linears of block 0 from one forward"}


def _to(obj, device):
    from optimum_sparse.engine.devices import move_to

    return move_to(obj, device)


@contextlib.contextmanager
def _no_cuda_sync():
    original = torch.cuda.synchronize
    torch.cuda.synchronize = lambda *a, **k: None  # fasterprune calls it unconditionally; CPU builds raise
    try:
        yield
    finally:
        torch.cuda.synchronize = original


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        logger.error("--device %s but torch sees no CUDA device; use --device cpu --tiny for the CPU form.", args.device)
        return 2
    num_samples = args.num_samples or (4 if args.tiny else 16)
    seq_len = args.seq_len or (32 if args.tiny else 2048)
    started = time.perf_counter()
    results = {"models": {}}
    failed = False
    for name in args.models:
        build_started = time.perf_counter()
        model = build_model(name, args.tiny, args.layers, args.seed)
        dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
        ids = torch.randint(0, model.config.vocab_size, (num_samples, seq_len),
                            generator=torch.Generator().manual_seed(args.seed))
        from optimum_sparse.engine.architectures import find_blocks

        block0 = find_blocks(model)[0]
        entry = {
            "config": {k: v for k, v in model.config.to_diff_dict().items() if isinstance(v, (int, float, str))},
            "build_seconds": round(time.perf_counter() - build_started, 2),
            "block_mib": round(sum(p.numel() * p.element_size() for p in block0.parameters()) / 2**20, 1),
            "calibration": [num_samples, seq_len],
            "methods": [],
        }
        targets = set(block_weights(model))
        for method in args.methods:
            logger.info("%s: %s", name, method)
            out = run_method(model, dense, method, args, ids, targets)
            if out.get("peak_gpu_mib") is not None:
                out["peak_over_block"] = round(out["peak_gpu_mib"] / entry["block_mib"], 2)
            if out.pop("shrunk", False):  # a structured method made the linears smaller: rebuild the dense model
                model = build_model(name, args.tiny, args.layers, args.seed)
            failed |= bool(out.get("device_error")) or out.get("finite") is False
            entry["methods"].append(out)
            logger.info("%s", {k: v for k, v in out.items() if k not in ("config", "block_weights_not_targeted")})
        if args.sparsegpt_repo:
            model.load_state_dict(dense)
            try:
                entry["official_sparsegpt"] = official_sparsegpt_block0(args.sparsegpt_repo, model, ids, args.device,
                                                                        args.sparsity)
            except Exception as err:
                entry["official_sparsegpt"] = {"status": "error", "error": f"{type(err).__name__}: {err}"[:2000]}
                logger.exception("official SparseGPT failed")
        else:
            entry["official_sparsegpt"] = {"status": "skipped", "why": "no --sparsegpt-repo checkout given"}
        results["models"][name] = entry
        del model, dense
    results.update(
        device=args.device, tiny=args.tiny, seconds_total=round(time.perf_counter() - started, 1),
        command=command_line(), date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        machine=machine_info(args.device), git=git_info(), loadavg=loadavg(),
    )
    output = args.output or os.path.join(RESULTS_DIR, f"gpu_check_{default_tag(args.device)}{'_tiny' if args.tiny else ''}.json")
    write_json(output, results)
    logger.info("Wrote %s (%.1f s)", output, results["seconds_total"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
