"""Profile SparseGPT vs SparseLLM on two SmolLM2 blocks (layers 3 and 4) at a given calibration size (cProfile, one thread).

    python benchmarks/sparsellm_profile.py "sparsegpt:0.7;sparsellm:0.7" 64 512

Prints wall and CPU time and the top of the cumulative profile per spec (`method:sparsity[:kwargs JSON]`, `2-4` for
2:4). Used for the per-block times in docs/sparsellm.md "Speed"; all 30 blocks are still forwarded.
"""
import torch, time, sys, json, logging, cProfile, pstats, io
from optimum_sparse import PruningConfig, SparsePruner, load_model_and_tokenizer
from optimum_sparse.data import get_calibration_ids
torch.set_num_threads(1)
model, tok = load_model_and_tokenizer("smollm2-135m", dtype="float32")
state = {k: v.clone() for k, v in model.state_dict().items()}
NS, SL = int(sys.argv[2]), int(sys.argv[3])
ids = get_calibration_ids("wiki-offline", tok, NS, SL, 0)
for spec in sys.argv[1].split(";"):
    method, sp, *rest = spec.split(":", 2)
    kw = json.loads(rest[0]) if rest else {}
    structure = "unstructured"
    if "-" in sp: structure = sp.replace("-", ":"); spf = 0.5
    else: spf = float(sp)
    model.load_state_dict(state)
    p = SparsePruner(PruningConfig(method=method, sparsity=spf, structure=structure, num_samples=NS, seq_len=SL, method_kwargs=kw, targets=[r"re:model\.layers\.(3|4)\..*"]))
    pr = cProfile.Profile(); t = time.time(); c = time.process_time(); pr.enable()
    p.apply(model, dataset=ids, progress=False)
    pr.disable(); t = time.time() - t; c = time.process_time() - c
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(35)
    print(spec, "time", round(t, 2), "cpu", round(c, 2), [ (b.get("ffn_error_sparsegpt"), b.get("ffn_error"), b.get("ffn_best")) for b in p.report.blocks if b.get("ffn_error") is not None])
    print(s.getvalue()[:9000])
