"""Perplexity over non-overlapping windows."""

import math

import pytest
import torch
import torch.nn.functional as F

from optimum_sparse import evaluate_perplexity
from optimum_sparse.data import tokenize_texts
from optimum_sparse.eval import perplexity_from_ids

from ..helpers import SENTENCES, make_model


def hand_perplexity(model, stream, seq_len, max_windows=None):
    """exp(mean NLL) over every predicted token of the non-overlapping windows, one window at a time, float64."""
    windows = stream.numel() // seq_len
    if max_windows is not None:
        windows = min(windows, max_windows)
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            ids = stream[w * seq_len : (w + 1) * seq_len]
            logits = model(ids.unsqueeze(0)).logits[0].double()
            logp = F.log_softmax(logits[:-1], dim=-1)
            for t in range(seq_len - 1):
                nll -= float(logp[t, ids[t + 1]])
                count += 1
    return math.exp(nll / count)


@pytest.fixture(scope="module")
def model():
    return make_model("llama", seed=3)


@pytest.fixture
def stream():
    return torch.randint(0, 128, (3 * 16 + 5,), generator=torch.Generator().manual_seed(0))  # 3 windows + a tail


def test_matches_hand_computation(model, stream):
    expected = hand_perplexity(model, stream, 16)
    assert perplexity_from_ids(model, stream, seq_len=16, progress=False) == pytest.approx(expected, rel=1e-5)
    # batching does not change the result
    assert perplexity_from_ids(model, stream, seq_len=16, batch_size=2, progress=False) == pytest.approx(expected, rel=1e-5)
    # random logits of a random model: close to the vocabulary size, but not equal to it
    assert 64 < expected < 256 and expected != pytest.approx(128, rel=1e-3)


def test_windows_do_not_overlap_and_tail_is_dropped(model, stream):
    full = perplexity_from_ids(model, stream, seq_len=16, progress=False)
    assert perplexity_from_ids(model, stream[:48], seq_len=16, progress=False) == pytest.approx(full, rel=1e-6)
    # a different window length gives another answer (the windows really are cut at seq_len)
    assert perplexity_from_ids(model, stream, seq_len=8, progress=False) != pytest.approx(full, rel=1e-4)


def test_max_windows(model, stream):
    expected = hand_perplexity(model, stream, 16, max_windows=2)
    assert perplexity_from_ids(model, stream, seq_len=16, max_windows=2, progress=False) == pytest.approx(expected, rel=1e-5)
    assert perplexity_from_ids(model, stream[:32], seq_len=16, progress=False) == pytest.approx(expected, rel=1e-5)


def test_too_short(model):
    with pytest.raises(ValueError, match="fewer than one window of 16"):
        perplexity_from_ids(model, torch.arange(10), seq_len=16, progress=False)


def test_training_mode_restored(model):
    model.train()
    try:
        perplexity_from_ids(model, torch.arange(32), seq_len=16, progress=False)
        assert model.training
    finally:
        model.eval()


def test_a_trained_model_has_low_perplexity():
    """Perplexity must reward a model that predicts the text (guards against shifted/misaligned targets)."""
    model = make_model("gpt2", seed=0)
    stream = torch.arange(64) % 128
    with torch.no_grad():
        # logits favour token (i + 1) after token i: lm_head(embedding(i)) peaks at i + 1
        emb = torch.randn(128, 32, generator=torch.Generator().manual_seed(0))
        model.transformer.wte.weight.copy_(emb)
        for block in model.transformer.h:
            for p in block.parameters():
                p.zero_()
        model.transformer.ln_f.weight.fill_(1.0)
        model.transformer.ln_f.bias.zero_()
        model.lm_head.weight = torch.nn.Parameter(torch.roll(emb, 1, dims=0) * 10)
    # position embeddings shift hidden states a little; the next-token logit still dominates
    model.transformer.wpe.weight.data.zero_()
    ppl = perplexity_from_ids(model, stream, seq_len=16, progress=False)
    assert ppl < 2.0
    assert hand_perplexity(model, stream, 16) == pytest.approx(ppl, rel=1e-5)


def test_evaluate_perplexity_with_strings(model, tokenizer):
    texts = [" ".join(SENTENCES[i:] + SENTENCES[:i]) for i in range(4)]
    stream = tokenize_texts(texts, tokenizer)
    expected = hand_perplexity(model, stream, 16)
    assert evaluate_perplexity(model, tokenizer, texts, seq_len=16, progress=False) == pytest.approx(expected, rel=1e-5)
    # a 1-D tensor of ids is used as the stream
    assert evaluate_perplexity(model, tokenizer, stream, seq_len=16, progress=False) == pytest.approx(expected, rel=1e-5)
    assert evaluate_perplexity(model, tokenizer, texts, seq_len=16, max_windows=1, progress=False) == pytest.approx(
        hand_perplexity(model, stream, 16, max_windows=1), rel=1e-5)


def test_evaluate_perplexity_uses_held_out_split(monkeypatch, model, tokenizer):
    datasets = pytest.importorskip("datasets")
    splits = []

    def fake_load_dataset(*args, split=None, **kwargs):
        splits.append(split)
        return datasets.Dataset.from_dict({"text": [" ".join(SENTENCES)] * 3})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    evaluate_perplexity(model, tokenizer, "wikitext2", seq_len=16, progress=False)
    assert splits == ["test"]
