"""Test helpers: tiny random causal LMs for every supported architecture, token ids, an offline tokenizer.

Every model is built with `AutoModelForCausalLM.from_config` from a seeded tiny config (hidden 32, MLP 64,
2 blocks, vocab 128): all linear input sizes are multiples of 8, so 2:4 and 4:8 apply everywhere.
"""

from __future__ import annotations

from typing import Callable, Optional

import pytest
import torch
import torch.nn as nn
import transformers

VOCAB = 128
HIDDEN = 32
INTERMEDIATE = 64
SEQ_LEN = 16
NUM_SAMPLES = 8

# Decoder that is NOT in optimum_sparse.engine.ARCHITECTURES: exercises the generic block search.
# BLOOM is a good probe: fused query_key_value, ALiBi, blocks under `transformer.h`.
GENERIC_ARCH = "bloom"


def _llama_like(cls_name: str, **extra) -> Callable[[int], Optional[transformers.PretrainedConfig]]:
    def build(num_layers: int):
        cls = getattr(transformers, cls_name, None)
        if cls is None:  # pragma: no cover - depends on the installed transformers
            return None
        kwargs = dict(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=num_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
        kwargs.update(extra)
        return cls(**kwargs)

    return build


def _alternating(num_layers: int) -> list[str]:
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]


def _gemma(cls_name: str):
    def build(num_layers: int):
        # sliding window shorter than the calibration sequences, alternating with full attention: the blocks
        # receive different attention masks (and, for Gemma 3, different rotary embeddings).
        return _llama_like(cls_name, head_dim=8, sliding_window=4, layer_types=_alternating(num_layers))(num_layers)

    return build


def _opt(num_layers):
    return transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=INTERMEDIATE, word_embed_proj_dim=HIDDEN, num_hidden_layers=num_layers,
        num_attention_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def _gpt2(num_layers):
    return transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_inner=INTERMEDIATE, n_layer=num_layers, n_head=4, n_positions=64,
        bos_token_id=1, eos_token_id=2,
    )


def _gpt_neox(num_layers):
    return transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=num_layers,
        num_attention_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
    )


def _falcon(num_layers):
    return transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=num_layers, num_attention_heads=4,
        bos_token_id=1, eos_token_id=2,
    )


def _bloom(num_layers):
    return transformers.BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=num_layers, n_head=4,
                                    bos_token_id=1, eos_token_id=2)


MODEL_CONFIGS: dict[str, Callable[[int], Optional[transformers.PretrainedConfig]]] = {
    "llama": _llama_like("LlamaConfig"),
    "mistral": _llama_like("MistralConfig", sliding_window=8),
    "qwen2": _llama_like("Qwen2Config"),
    "qwen3": _llama_like("Qwen3Config", head_dim=8),
    "gemma": _llama_like("GemmaConfig", head_dim=8),
    "gemma2": _gemma("Gemma2Config"),
    "gemma3_text": _gemma("Gemma3TextConfig"),
    "phi3": _llama_like("Phi3Config"),
    "olmo2": _llama_like("Olmo2Config"),
    "olmo3": _llama_like("Olmo3Config", sliding_window=4, layer_types=None),
    "granite": _llama_like("GraniteConfig", residual_multiplier=0.5, attention_multiplier=0.3),
    "cohere": _llama_like("CohereConfig", use_qk_norm=True),
    "opt": _opt,
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
    "falcon": _falcon,
    GENERIC_ARCH: _bloom,
}

TABLE_ARCHS = [name for name in MODEL_CONFIGS if name != GENERIC_ARCH]
ALL_ARCHS = list(MODEL_CONFIGS)


def build_config(arch: str, num_layers: int = 2) -> transformers.PretrainedConfig:
    config = MODEL_CONFIGS[arch](num_layers)
    if config is None:
        pytest.skip(f"transformers {transformers.__version__} does not provide {arch}")
    return config


def make_model(arch: str, num_layers: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """A seeded tiny random `AutoModelForCausalLM` of architecture `arch`, in eval mode."""
    config = build_config(arch, num_layers)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model.to(dtype).eval()


def make_ids(num_samples: int = NUM_SAMPLES, seq_len: int = SEQ_LEN, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (num_samples, seq_len), generator=generator)


def sparsity_kwargs(structure: str, sparsity: float) -> dict:
    """`PruningConfig` keyword arguments: N:M structures prune their own N/M (another `sparsity` is refused)."""
    return {"structure": structure} if ":" in structure else {"structure": structure, "sparsity": sparsity}


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A deep copy of the state dict (tied weights included once per name)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"weights changed: {changed}"


SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a sparse model keeps only the weights that matter",
    "pruning removes half of the weights of every linear layer",
    "the calibration text is cut into windows of tokens",
    "perplexity is the exponential of the mean negative log likelihood",
    "language models predict the next token from the previous ones",
    "every block of the transformer is pruned in turn",
    "the dog and the fox are friends in this small story",
]


def build_tokenizer(vocab_size: int = VOCAB):
    """An offline `PreTrainedTokenizerFast` (BPE, whitespace pre-tokenizer) trained on `SENTENCES`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[EOS]"], show_progress=False)
    tok.train_from_iterator(SENTENCES * 4, trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    assert len(fast) <= vocab_size
    return fast


def save_model_and_text(folder, tokenizer, arch: str = "llama") -> tuple:
    """Saves a tiny model with `tokenizer` under `folder/dense` and a calibration text file; returns both paths
    (for CLI tests)."""
    model = make_model(arch)
    model.save_pretrained(folder / "dense")
    tokenizer.save_pretrained(folder / "dense")
    text = folder / "calib.txt"
    text.write_text("\n".join(SENTENCES * 20))
    return folder / "dense", text




def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def block_path(model: nn.Module) -> str:
    """Where the decoder blocks of a test model live (independent of the engine's table)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return path
    raise AssertionError(f"no blocks found in {type(model).__name__}")


def block_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear (nn.Linear, subclasses, GPT-2 Conv1D) inside the decoder blocks, by full name."""
    prefix = block_path(model)
    return {name: m for name, m in model.named_modules() if name.startswith(prefix + ".") and is_linear(m)}


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as `[out_features, in_features]` (GPT-2's Conv1D stores `[in, out]`)."""
    w = module.weight.detach()
    return w.t() if type(module).__name__ == "Conv1D" else w


def num_zeros(module: nn.Module) -> int:
    return int((module.weight == 0).sum())


PINNED_PLATFORM = ("AVX512", "2.13")  # CPU kernel set and torch version the pinned weight hashes were taken with


def requires_pinned_platform():
    """Skips a bit-for-bit (hashed weights) test off the platform its hashes were taken on: another CPU kernel set
    (AVX2, ARM) or torch version may round float sums differently, which is not a regression of this code."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != PINNED_PLATFORM[0] or not torch.__version__.startswith(PINNED_PLATFORM[1]):
        pytest.skip(f"weight hashes pinned on {PINNED_PLATFORM[0]} / torch {PINNED_PLATFORM[1]}; this is "
                    f"{capability} / torch {torch.__version__}")
