"""SparseLLM ablation on SmolLM2-135M (ad-hoc script used during development; results in
benchmarks/results/sparsellm_ablation_cpu-2c.md).

    NS=16 SL=256 python benchmarks/sparsellm_ablation.py "sparsegpt:0.7;sparsellm:0.7:{\"iterations\":0}" 20

Each spec is method:sparsity[:method_kwargs JSON]; specs are separated by ";". The last argument is the number of
512-token held-out wiki-offline windows evaluated. NS/SL set the calibration size, THREADS the torch threads.
"""
import torch, time, sys, json, logging
from optimum_sparse import PruningConfig, SparsePruner, evaluate_perplexity, load_model_and_tokenizer
from optimum_sparse.data import get_calibration_ids
logging.basicConfig(level=logging.WARNING)
torch.manual_seed(0); import os; NS=int(os.environ.get("NS",16)); SL=int(os.environ.get("SL",256)); torch.set_num_threads(int(os.environ.get("THREADS",1)))
model, tok = load_model_and_tokenizer("smollm2-135m", dtype="float32")
state = {k: v.clone() for k, v in model.state_dict().items()}
ids = get_calibration_ids("wiki-offline", tok, NS, SL, 0)
W = int(sys.argv[2]) if len(sys.argv)>2 else 30
ev = lambda: evaluate_perplexity(model, tok, "wiki-offline", 512, max_windows=W, progress=False)
print("dense", ev(), flush=True)
for spec in sys.argv[1].split(";"):
    method, sp, *rest = spec.split(":", 2)
    kw = json.loads(rest[0]) if rest else {}
    structure = "unstructured"
    if "-" in sp: structure = sp.replace("-", ":"); spf = 0.5
    else: spf = float(sp)
    model.load_state_dict(state)
    p = SparsePruner(PruningConfig(method=method, sparsity=spf, structure=structure, num_samples=NS, seq_len=SL, method_kwargs=kw))
    t = time.time(); p.apply(model, dataset=ids, progress=False); t = time.time()-t
    errs = [b.get("ffn_error_sparsegpt") for b in p.report.blocks], [b.get("ffn_error") for b in p.report.blocks]
    print(spec, "ppl", round(ev(),3), "time", round(t,1), "ffn err (sgpt->ours) first/mid/last:", [(round(a,4), round(b,4)) for a,b in zip(*errs)][::10] if errs[0][0] is not None else "", flush=True)
