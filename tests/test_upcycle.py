"""Sparse upcycling (`optimum_sparse.upcycle`): a dense Llama becomes a Mixtral with the same outputs."""

from __future__ import annotations

import pytest
import torch
import transformers

from optimum_sparse.upcycle import routing_counts, spherical_kmeans, upcycle_to_mixtral

from .helpers import make_ids, make_model


def test_upcycled_mixtral_equals_dense_and_routes_apart():
    dense = make_model("llama", num_layers=2)
    ids = make_ids(num_samples=8, seq_len=16)
    moe, info = upcycle_to_mixtral(dense, ids, num_experts=4, top_k=2, progress=False)
    assert isinstance(moe, transformers.MixtralForCausalLM)
    assert moe.config.num_local_experts == 4 and moe.config.num_experts_per_tok == 2
    assert moe.model.layers[0].mlp.experts.gate_up_proj.shape == (4, 2 * 64, 32)
    test_ids = make_ids(num_samples=4, seq_len=16, seed=1)  # not the k-means tokens
    with torch.no_grad():
        torch.testing.assert_close(moe(test_ids).logits, dense(test_ids).logits, rtol=1e-4, atol=1e-5)
    for counts in info["tokens_per_expert"]:  # 128 tokens x top-2: every expert gets some, none gets all
        assert sum(counts) == 2 * 8 * 16
        assert min(counts) > 0 and max(counts) < 8 * 16
    # the router really sends tokens by the centroids: its own forward picks what routing_counts counts
    captured = []
    handle = moe.model.layers[1].mlp.experts.register_forward_pre_hook(lambda m, args: captured.append(args[1]))
    with torch.no_grad():
        moe(ids)
    handle.remove()
    seen = torch.bincount(torch.cat(captured).flatten(), minlength=4).tolist()
    assert seen == info["tokens_per_expert"][1]


def test_upcycle_with_tied_embeddings_is_deterministic():
    dense = make_model("llama", num_layers=1)
    dense.config.tie_word_embeddings = True
    dense.lm_head.weight = dense.model.embed_tokens.weight
    ids = make_ids()
    first, info1 = upcycle_to_mixtral(dense, ids, num_experts=3, top_k=1, seed=3, progress=False)
    second, info2 = upcycle_to_mixtral(dense, ids, num_experts=3, top_k=1, seed=3, progress=False)
    assert first.lm_head.weight.data_ptr() == first.model.embed_tokens.weight.data_ptr()
    assert info1["tokens_per_expert"] == info2["tokens_per_expert"]
    torch.testing.assert_close(first.model.layers[0].mlp.gate.weight, second.model.layers[0].mlp.gate.weight)
    with torch.no_grad():
        torch.testing.assert_close(first(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-5)


def test_spherical_kmeans_separates_directions():
    generator = torch.Generator().manual_seed(0)
    axes = torch.eye(4)[:3] * 5
    x = torch.cat([axes[i] + 0.1 * torch.randn(50, 4, generator=generator) for i in range(3)])
    centroids = spherical_kmeans(x, 3, seed=0)
    torch.testing.assert_close(centroids.norm(dim=1), torch.ones(3))
    assert sorted(routing_counts(centroids, x, 1).tolist()) == [50, 50, 50]


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_experts=1), "num_experts"), (dict(top_k=5, num_experts=4), "top_k"), (dict(arch="opt"), "model types"),
])
def test_upcycle_refuses_bad_input(kwargs, match):
    arch = kwargs.pop("arch", "llama")
    with pytest.raises(ValueError, match=match):
        upcycle_to_mixtral(make_model(arch, num_layers=1), make_ids(), progress=False, **kwargs)


def test_centred_router_is_blind_to_the_mean_and_balances_a_shared_offset():
    generator = torch.Generator().manual_seed(0)
    mean = torch.zeros(8)
    mean[0] = 50.0  # a large component common to every token, as in real FFN inputs
    x = mean + torch.randn(400, 8, generator=generator)
    from optimum_sparse.upcycle import centred_router

    router = centred_router(x, 4, seed=0)
    torch.testing.assert_close(router @ x.mean(0), torch.zeros(4), atol=1e-4, rtol=0)  # logits = (x - mean) · c
    counts = routing_counts(router, x, 1)
    assert counts.min() > 50  # every expert is some tokens' first choice
