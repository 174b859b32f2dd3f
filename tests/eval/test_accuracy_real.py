"""Slow: `wiki_offline_mc` on the bundled SmolLM2-135M discriminates (well above chance dense, clearly lower when
the model is wrecked). Skips cleanly when the real assets or lm-eval are missing."""

import pytest

from optimum_sparse import evaluate_tasks

from ..test_real_model import smollm2  # noqa: F401  (the fixture: skips without the real assets)


@pytest.mark.slow
def test_smollm2_wiki_offline_mc_above_chance(smollm2):  # noqa: F811
    pytest.importorskip("lm_eval")
    model, tokenizer = smollm2
    dense = evaluate_tasks(model, tokenizer, "wiki_offline_mc", limit=40, batch_size=16)["wiki_offline_mc"]
    assert dense["acc"] >= 0.5, dense  # 0.70 on the first 100 items (benchmarks/results/accuracy_cpu-2c.json); chance 0.25
    for layer in model.model.layers[2:]:  # wreck the model: zero the MLP outputs of all but two blocks
        layer.mlp.down_proj.weight.data.zero_()
    wrecked = evaluate_tasks(model, tokenizer, "wiki_offline_mc", limit=40, batch_size=16)["wiki_offline_mc"]
    assert wrecked["acc"] < dense["acc"] - 0.15, (dense, wrecked)
