"""Bad input fails with a clear error BEFORE any weight changes."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from optimum_sparse import CalibrationError, PruningConfig, SparsePruner, UnsupportedModelError
from optimum_sparse.errors import NonFiniteActivationError, NonFiniteWeightError

from ..helpers import VOCAB, assert_state_unchanged, make_ids, make_model, snapshot

CALIB = dict(num_samples=8, seq_len=16)


def expect_error(model, error, match, tokenizer=None, dataset=None, **config_kwargs):
    before = snapshot(model)
    pruner = SparsePruner(PruningConfig(**{"method": "sparsegpt", **CALIB, **config_kwargs}))
    with pytest.raises(error, match=match):
        pruner.apply(model, tokenizer=tokenizer, dataset=dataset, progress=False)
    assert_state_unchanged(model, before)
    assert pruner.report is None


def test_not_a_model():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        SparsePruner(PruningConfig(method="magnitude")).apply(nn.Linear(4, 4))


class _Block(nn.Module):
    def __init__(self, with_linear: bool):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8) if with_linear else None

    def forward(self, hidden, **kwargs):
        return self.norm(hidden)


class _ToyLM(nn.Module):
    def __init__(self, layout: str):
        super().__init__()
        self.config = SimpleNamespace(model_type="toy", vocab_size=16)
        self.embed = nn.Embedding(16, 8)
        if layout == "blocks-without-linears":
            self.layers = nn.ModuleList([_Block(False) for _ in range(2)])
        self.lm_head = nn.Linear(8, 16)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, **kwargs):
        h = self.embed(input_ids)
        for layer in getattr(self, "layers", []):
            h = layer(h)
        return SimpleNamespace(logits=self.lm_head(h))


@pytest.mark.parametrize("layout", ["no-blocks", "blocks-without-linears"])
def test_unsupported_model(layout):
    expect_error(_ToyLM(layout), UnsupportedModelError, "Cannot find the decoder blocks", dataset=make_ids(vocab=16))


def test_missing_tokenizer_with_text_dataset():
    expect_error(make_model("llama"), ValueError, "tokenizer", dataset=["some calibration text " * 50])


def test_missing_tokenizer_with_default_dataset():
    expect_error(make_model("llama"), ValueError, "tokenizer")


@pytest.mark.parametrize("dataset", [[], [""], ["  ", "\n"], torch.empty(0, 16, dtype=torch.long), torch.tensor([], dtype=torch.long)],
                         ids=["empty-list", "empty-string", "blank-strings", "empty-2d", "empty-1d"])
def test_empty_calibration_set(dataset, tokenizer):
    expect_error(make_model("llama"), CalibrationError, "empty", tokenizer=tokenizer, dataset=dataset)


def test_too_short_calibration_text(tokenizer):
    expect_error(make_model("llama"), CalibrationError, r"too short for seq_len=64", tokenizer=tokenizer,
                 dataset=["the quick brown fox"], num_samples=4, seq_len=64)


def test_nm_with_indivisible_input_size():
    import transformers

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=36, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    expect_error(model, ValueError, r"model\.layers\.0\.mlp\.down_proj has 36 inputs, not a multiple of M=8.*ignore",
                 dataset=make_ids(), structure="4:8")
    # 36 is a multiple of 4, and ignoring down_proj makes 4:8 work
    SparsePruner(PruningConfig(method="magnitude", structure="2:4")).apply(model, progress=False)
    SparsePruner(PruningConfig(method="magnitude", structure="4:8", ignore=["down_proj"])).apply(model, progress=False)


def test_targets_matching_nothing():
    expect_error(make_model("llama"), ValueError, r"No linear layer.*targets=\['lm_head'\]", dataset=make_ids(), targets=["lm_head"])
    expect_error(make_model("llama"), ValueError, "No linear layer", dataset=make_ids(), ignore=["Linear"])


@pytest.mark.parametrize("dataset", [torch.rand(8, 16), make_ids().double(), [[0.5] * 16] * 8], ids=["float32", "float64", "float-lists"])
def test_non_integer_input_ids(dataset):
    expect_error(make_model("llama"), CalibrationError, "integers", dataset=dataset)


@pytest.mark.parametrize("dataset", [make_ids() + VOCAB, make_ids() - VOCAB], ids=["above-vocab", "negative"])
def test_out_of_vocab_ids(dataset):
    expect_error(make_model("llama"), CalibrationError, rf"\[0, {VOCAB}\)", dataset=dataset)


@pytest.mark.parametrize("dataset", [make_ids()[0], make_ids().unsqueeze(0), [[1, 2, 3], [4, 5]]], ids=["1d", "3d", "ragged"])
def test_malformed_input_ids(dataset):
    expect_error(make_model("llama"), CalibrationError, "input_ids", dataset=dataset)


def test_unsupported_source_type(tokenizer):
    expect_error(make_model("llama"), CalibrationError, "Unsupported calibration source", tokenizer=tokenizer,
                 dataset={"text": "x"})


def test_missing_local_file(tmp_path, tokenizer):
    expect_error(make_model("llama"), CalibrationError, "not found", tokenizer=tokenizer, dataset=str(tmp_path / "nope.jsonl"))


def test_non_finite_norm_refused_before_any_change():
    """An inf in a norm the calibration forward uses: refused up front (it used to surface mid-run)."""
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight.fill_(float("inf"))
    expect_error(model, NonFiniteWeightError, r"model\.layers\.1\.input_layernorm\.weight is used by the calibration",
                 dataset=make_ids())


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "sparsellm", "alps"])
def test_non_finite_activations_stop_the_run(method):
    """Activations that turn non-finite inside the run (e.g. float16 overflow) stop it before the layer is pruned."""
    model = make_model("llama")
    model.model.layers[1].input_layernorm.register_forward_hook(lambda m, a, out: torch.full_like(out, float("inf")))
    pruner = SparsePruner(PruningConfig(method=method, **CALIB))
    with pytest.raises(NonFiniteActivationError, match=r"model\.layers\.1\.self_attn\.q_proj: .*already pruned"):
        pruner.apply(model, dataset=make_ids(), progress=False)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            assert torch.isfinite(module.weight).all()


def test_non_finite_activations_in_first_block_change_nothing():
    model = make_model("llama")
    model.model.layers[0].input_layernorm.register_forward_hook(lambda m, a, out: torch.full_like(out, float("nan")))
    expect_error(model, NonFiniteActivationError, "nothing was changed", dataset=make_ids(), method="wanda")
