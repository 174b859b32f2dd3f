"""Fixtures for the Hub tests: a fake Hub on loopback, an isolated huggingface_hub environment, a saved pruned model."""

from __future__ import annotations

import pytest

from ..helpers import build_tokenizer, make_ids, make_model
from .fake_hub import FakeHub

GOOD_TOKEN = "hf_GoodFakeTokenForTests0123456789"
BAD_TOKEN = "hf_WrongFakeTokenForTests987654321"
USER = "tester"


@pytest.fixture
def fake_hub():
    """A fake Hub on 127.0.0.1 (stopped after the test, and by itself after 120 s at most)."""
    hub = FakeHub(tokens={GOOD_TOKEN: USER}).start()
    try:
        yield hub
    finally:
        hub.stop()


@pytest.fixture
def hub_env(fake_hub, monkeypatch, tmp_path):
    """Points huggingface_hub at the fake Hub through HF_ENDPOINT/HF_TOKEN, with no saved token and no telemetry."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"), raising=False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True, raising=False)
    return fake_hub


@pytest.fixture(scope="session")
def pruned():
    """A tiny random Llama (hidden 32, 2 blocks, vocab 128) pruned to 50% with SparseGPT, its pruner and tokenizer."""
    from optimum_sparse import PruningConfig, SparsePruner

    model = make_model("llama")
    tokenizer = build_tokenizer()
    pruner = SparsePruner(PruningConfig(method="sparsegpt", sparsity=0.5, num_samples=8, seq_len=16, batch_size=8))
    pruner.apply(model, tokenizer=tokenizer, dataset=make_ids(), progress=False)
    pruner.record_perplexity(before=121.5, after=130.25, dataset="wiki-offline", seq_len=16, windows=4)
    return model, pruner, tokenizer


@pytest.fixture(scope="session")
def saved_folder(pruned, tmp_path_factory):
    """The pruned model saved with `SparsePruner.save_pretrained` (treat as read-only)."""
    model, pruner, tokenizer = pruned
    folder = tmp_path_factory.mktemp("saved") / "tiny-llama-sparsegpt"
    pruner.save_pretrained(model, folder, tokenizer=tokenizer)
    return folder
