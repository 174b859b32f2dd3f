"""Tiny random models of every architecture with a structured layout, and an independent masked-dense reference.

Each config is built with `AutoConfig.for_model` and exercises what makes the architecture different: decoupled
`head_dim` (Gemma: 16 with hidden 32 and 4 heads), sliding/full `layer_types`, q/k norms, fused q/k/v (three row
orders) and gate/up projections, parallel residual blocks, multi-query attention.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import transformers

from ..helpers import HIDDEN, INTERMEDIATE, VOCAB, weight_out_in

COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LAYERS = ["sliding_attention", "full_attention", "sliding_attention"]

# name -> (model_type, config kwargs)
ARCH_CONFIGS = {
    "llama": ("llama", COMMON),
    "mistral": ("mistral", dict(COMMON, sliding_window=8)),
    "qwen2": ("qwen2", COMMON),
    "qwen3": ("qwen3", dict(COMMON, head_dim=8)),
    "gemma": ("gemma", dict(COMMON, head_dim=16)),
    "gemma2": ("gemma2", dict(COMMON, head_dim=16, sliding_window=4, layer_types=LAYERS)),
    "gemma3_text": ("gemma3_text", dict(COMMON, head_dim=16, sliding_window=4, layer_types=LAYERS)),
    "phi3": ("phi3", dict(COMMON, pad_token_id=0)),
    "olmo2": ("olmo2", COMMON),
    "olmo3": ("olmo3", dict(COMMON, sliding_window=4, layer_types=LAYERS)),
    "granite": ("granite", dict(COMMON, residual_multiplier=0.5, embedding_multiplier=2.0, attention_multiplier=0.3,
                                logits_scaling=2.0)),
    "cohere": ("cohere", dict(COMMON, use_qk_norm=True)),
    "opt": ("opt", dict(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=INTERMEDIATE, word_embed_proj_dim=HIDDEN,
                        num_attention_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                        pad_token_id=0)),
    "gpt2": ("gpt2", dict(vocab_size=VOCAB, n_embd=HIDDEN, n_inner=INTERMEDIATE, n_head=4, n_positions=64,
                          bos_token_id=1, eos_token_id=2)),
    "gpt_neox": ("gpt_neox", dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                                  num_attention_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)),
    # the default Falcon form: multi-query attention, parallel attention/MLP, rotary
    "falcon": ("falcon", dict(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_hidden_size=INTERMEDIATE, num_attention_heads=4,
                              bos_token_id=1, eos_token_id=2)),
    "falcon-new": ("falcon", dict(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_hidden_size=INTERMEDIATE,
                                  num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True,
                                  bos_token_id=1, eos_token_id=2)),
    "falcon-mha": ("falcon", dict(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_hidden_size=INTERMEDIATE,
                                  num_attention_heads=4, multi_query=False, parallel_attn=False,
                                  bos_token_id=1, eos_token_id=2)),
}
ARCHS = list(ARCH_CONFIGS)
# norms over every head of the projection: removing heads changes the normalisation of the others
WHOLE_PROJECTION_NORM = {"olmo2", "olmo3"}

# how a row of the (first) attention input projection maps to an output-projection column: None = not a query row
LAYOUT = {
    "phi3": ("self_attn.qkv_proj", "self_attn.o_proj", "blocks", "mlp.gate_up_proj", "mlp.down_proj"),
    "opt": ("self_attn.q_proj", "self_attn.out_proj", "q", "fc1", "fc2"),
    "gpt2": ("attn.c_attn", "attn.c_proj", "blocks", "mlp.c_fc", "mlp.c_proj"),
    "gpt_neox": ("attention.query_key_value", "attention.dense", "per_head", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    "falcon": ("self_attention.query_key_value", "self_attention.dense", "blocks", "mlp.dense_h_to_4h",
               "mlp.dense_4h_to_h"),
    "falcon-new": ("self_attention.query_key_value", "self_attention.dense", "per_group", "mlp.dense_h_to_4h",
                   "mlp.dense_4h_to_h"),
    "falcon-mha": ("self_attention.query_key_value", "self_attention.dense", "per_head", "mlp.dense_h_to_4h",
                   "mlp.dense_4h_to_h"),
}
LLAMA_LAYOUT = ("self_attn.q_proj", "self_attn.o_proj", "q", "mlp.gate_proj", "mlp.down_proj")


def make_arch(name: str, num_layers: int = 3, seed: int = 0) -> nn.Module:
    model_type, kwargs = ARCH_CONFIGS[name]
    config = transformers.AutoConfig.for_model(model_type, num_hidden_layers=num_layers, **kwargs)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def blocks_of(model: nn.Module) -> nn.ModuleList:
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise AssertionError("no blocks")


def _q_columns(name: str, rows: torch.Tensor, config) -> torch.Tensor:
    """Output-projection columns fed by the original query rows `rows` of the attention input projection."""
    order = LAYOUT.get(name, LLAMA_LAYOUT)[2]
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) if name.startswith(("gemma", "qwen3")) else None
    head_dim = head_dim or config.hidden_size // heads
    q_width = heads * head_dim
    if order in ("q", "blocks"):
        return rows[rows < q_width]
    if order == "per_head":
        within = rows % (3 * head_dim)
        return (rows // (3 * head_dim) * head_dim + within)[within < head_dim]
    r = heads // config.num_kv_heads
    within = rows % ((r + 2) * head_dim)
    return (rows // ((r + 2) * head_dim) * r * head_dim + within)[within < r * head_dim]


def kept_rows(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Index in `old` of every row of `new` (rows of input projections are copied unchanged)."""
    match = (new[:, None, :] == old[None, :, :]).all(-1)
    assert bool((match.sum(1) == 1).all()), "a kept row is not a unique copy of an original row"
    return match.float().argmax(1)


def _write_masked(dense_block, pruned_block, name, cols):
    dense_mod, pruned_mod = dense_block.get_submodule(name), pruned_block.get_submodule(name)
    weight = torch.zeros_like(weight_out_in(dense_mod))
    weight[:, cols] = weight_out_in(pruned_mod)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=pruned_mod.bias is not None)
    linear.weight.data.copy_(weight)
    if pruned_mod.bias is not None:
        linear.bias.data.copy_(pruned_mod.bias.data)
    if type(dense_mod).__name__ == "Conv1D":
        dense_mod.weight.data.copy_(weight.t())
        dense_mod.bias.data.copy_(pruned_mod.bias.data)
        return
    parent, _, child = name.rpartition(".")
    setattr(dense_block.get_submodule(parent), child, linear)


def masked_dense(name: str, dense: nn.Module, pruned: nn.Module) -> nn.Module:
    """The dense model with the removed query heads and MLP channels masked out: zero output-projection columns, the
    pruned model's (compensated) kept columns and bias written in place. Independent of the library's layouts."""
    masked = copy.deepcopy(dense)
    attn_in, attn_out, _, mlp_in, mlp_out = LAYOUT.get(name, LLAMA_LAYOUT)
    for mblock, pblock in zip(blocks_of(masked), blocks_of(pruned)):
        rows = kept_rows(weight_out_in(pblock.get_submodule(attn_in)), weight_out_in(mblock.get_submodule(attn_in)))
        _write_masked(mblock, pblock, attn_out, _q_columns(name, rows, dense.config).sort().values)
        rows = kept_rows(weight_out_in(pblock.get_submodule(mlp_in)), weight_out_in(mblock.get_submodule(mlp_in)))
        channels = weight_out_in(mblock.get_submodule(mlp_out)).shape[1]
        _write_masked(mblock, pblock, mlp_out, rows[rows < channels].sort().values)
    return masked
