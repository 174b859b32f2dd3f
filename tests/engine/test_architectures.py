"""The architecture table and the generic block search."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from optimum_sparse.engine import ARCHITECTURES, UnsupportedModelError, find_blocks, get_architecture

from ..helpers import GENERIC_ARCH, MODEL_CONFIGS, TABLE_ARCHS, block_linears, block_path, is_linear, make_model


def test_every_table_entry_has_a_test_model():
    missing = sorted(set(ARCHITECTURES) - set(MODEL_CONFIGS))
    assert not missing, f"add tiny configs for {missing} to tests/helpers.py"
    assert GENERIC_ARCH not in ARCHITECTURES


@pytest.mark.parametrize("arch", TABLE_ARCHS)
def test_table_entry_matches_model(arch):
    model = make_model(arch)
    spec = get_architecture(model)
    assert spec is ARCHITECTURES[model.config.model_type]
    blocks = find_blocks(model, spec)
    assert spec.blocks == block_path(model)
    assert len(blocks) == model.config.num_hidden_layers
    for block in blocks:
        modules = dict(block.named_modules())
        for name in spec.linear_names:
            assert name in modules and is_linear(modules[name]), f"{arch}: {name} is not a linear of the block"
        # the table lists every linear of the block, in groups that partition them
        linears = {n for n, m in block.named_modules() if is_linear(m)}
        assert linears == set(spec.linear_names)
        assert len(spec.linear_names) == len(set(spec.linear_names))
    if spec.mlp is not None:
        modules = dict(blocks[0].named_modules())
        assert is_linear(modules[spec.mlp.down]) and is_linear(modules[spec.mlp.up])
        if spec.mlp.gate is not None:
            assert is_linear(modules[spec.mlp.gate])


def test_generic_fallback_finds_blocks_of_unknown_decoder():
    model = make_model(GENERIC_ARCH, num_layers=3)
    spec = get_architecture(model)
    assert spec.blocks == block_path(model)
    assert spec.mlp is None and len(spec.groups) == 1
    blocks = find_blocks(model, spec)
    assert len(blocks) == 3
    prefix = spec.blocks + ".0."
    expected = {n[len(prefix):] for n in block_linears(model) if n.startswith(prefix)}
    assert set(spec.linear_names) == expected and expected


class _NoLinearBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)

    def forward(self, hidden, **kwargs):
        return self.norm(hidden)


class _ToyLM(nn.Module):
    """A module with embeddings but blocks that hold no linear layer."""

    _no_split_modules = ["_NoLinearBlock"]

    def __init__(self, blocks: bool = True):
        super().__init__()
        self.config = SimpleNamespace(model_type="toy", vocab_size=16)
        self.embed = nn.Embedding(16, 8)
        if blocks:
            self.layers = nn.ModuleList([_NoLinearBlock() for _ in range(3)])
        self.head = nn.Linear(8, 16)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, **kwargs):
        h = self.embed(input_ids)
        for layer in getattr(self, "layers", []):
            h = layer(h)
        return SimpleNamespace(logits=self.head(h))


@pytest.mark.parametrize("blocks", [True, False], ids=["blocks-without-linears", "no-blocks"])
def test_unsupported_model_error_names_the_fix(blocks):
    with pytest.raises(UnsupportedModelError, match="ARCHITECTURES"):
        get_architecture(_ToyLM(blocks))
