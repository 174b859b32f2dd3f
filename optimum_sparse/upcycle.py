"""Sparse upcycling: a dense Llama-layout causal LM turned into a Mixtral mixture of experts with the same outputs.

Every decoder block's FFN is copied into `num_experts` identical experts, and a router is added that sends each token
by a fixed rule: the block's FFN inputs (the `post_attention_layernorm` outputs) on calibration text, minus their mean
`μ`, are clustered by seeded spherical k-means (cosine similarity, k-means++ start); the router's weights are the
centroids made orthogonal to `μ` and unit-norm, so `logits = x · c_e = (x − μ) · c_e` and a token goes to the `top_k`
experts whose centroids are closest in angle to its deviation from the mean. (Without centring, the large common
component of the inputs makes one central expert the second choice of almost every token and starves others: on
SmolLM2 an expert of block 24 got 0.1% of the routing slots, against 19-33% per expert with centring.) Mixtral
normalises the top-k routing weights to sum to 1, so with equal experts the block computes exactly the dense FFN:
the upcycled model has the dense model's outputs (up to float rounding), while every expert sees its own tokens.

It is how the MoE benchmark model is built (`benchmarks/moe.py`; no MoE checkpoint can be fetched offline), and a
start for users who want to test MoE pruning, or to train an MoE from a dense model (Komatsuzaki et al., 2022).

```python
>>> from optimum_sparse.upcycle import upcycle_to_mixtral
>>> moe, info = upcycle_to_mixtral(dense_model, calibration_ids, num_experts=4, top_k=2)
>>> info["tokens_per_expert"][0]   # block 0: calibration tokens routed to each expert
```
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .utils import forward_batches

__all__ = ["upcycle_to_mixtral", "spherical_kmeans", "centred_router", "routing_counts"]

logger = logging.getLogger(__name__)

_SUPPORTED = ("llama", "mistral")


def spherical_kmeans(x: torch.Tensor, k: int, seed: int = 0, iterations: int = 30) -> torch.Tensor:
    """Seeded spherical k-means (k-means++ start); returns unit-norm centroids `[k, d]` (float32).

    Points are compared by cosine similarity; an empty cluster is restarted at the point farthest from its centroid.
    """
    if x.dim() != 2 or x.shape[0] < k:
        raise ValueError(f"spherical_kmeans needs at least k={k} points [n, d], got shape {tuple(x.shape)}.")
    generator = torch.Generator().manual_seed(seed)
    points = nn.functional.normalize(x.detach().to("cpu", torch.float32), dim=-1)
    first = int(torch.randint(points.shape[0], (1,), generator=generator))
    centroids = [points[first]]
    for _ in range(1, k):  # k-means++: next centre drawn with probability ∝ squared distance to the nearest centre
        similarity = points @ torch.stack(centroids).t()
        distance = (2 - 2 * similarity.max(dim=1).values).clamp_min(0)
        if float(distance.sum()) <= 0:
            raise ValueError(f"spherical_kmeans: fewer than k={k} distinct directions among the points.")
        centroids.append(points[int(torch.multinomial(distance, 1, generator=generator))])
    centroids = torch.stack(centroids)
    for _ in range(iterations):
        similarity = points @ centroids.t()
        assign = similarity.argmax(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=k)
        for empty in (counts == 0).nonzero().flatten().tolist():
            farthest = int(similarity.max(dim=1).values.argmin())
            sums[empty] = points[farthest]
            counts[empty] = 1
        new = nn.functional.normalize(sums, dim=-1)
        if torch.allclose(new, centroids, atol=1e-6):
            break
        centroids = new
    return centroids


def centred_router(x: torch.Tensor, num_experts: int, seed: int = 0, iterations: int = 30) -> torch.Tensor:
    """Router weights `[E, d]` for FFN inputs `x` `[n, d]`: spherical k-means of `x − μ`, centroids made orthogonal
    to `μ` (so `x · c = (x − μ) · c`) and unit-norm."""
    x = x.to(torch.float32)
    mean = x.mean(dim=0)
    centroids = spherical_kmeans(x - mean, num_experts, seed=seed, iterations=iterations)
    direction = nn.functional.normalize(mean, dim=0)
    return nn.functional.normalize(centroids - (centroids @ direction)[:, None] * direction, dim=-1)


def _mixtral_config(config, num_experts: int, top_k: int):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        hidden_act=config.hidden_act, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps, pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id, tie_word_embeddings=config.tie_word_embeddings,
        sliding_window=None, attention_dropout=0.0, num_experts_per_tok=top_k, num_local_experts=num_experts,
        router_jitter_noise=0.0, output_router_logits=False, rope_parameters=dict(config.rope_parameters),
    )


def _check(model: nn.Module, num_experts: int, top_k: int) -> None:
    config = model.config
    if config.model_type not in _SUPPORTED:
        raise ValueError(f"upcycle_to_mixtral supports model types {list(_SUPPORTED)} (Llama layout), got "
                         f"{config.model_type!r}.")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("upcycle_to_mixtral: Mixtral has no attention/MLP biases; this model has some.")
    if getattr(config, "hidden_act", None) != "silu":
        raise ValueError(f"upcycle_to_mixtral: Mixtral experts are SwiGLU (silu), got {config.hidden_act!r}.")
    if (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default") not in ("default", "llama3",
                                                                                           "linear", "dynamic", "yarn"):
        raise ValueError(f"upcycle_to_mixtral: unsupported rope parameters {config.rope_parameters!r}.")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 2:
        raise ValueError(f"upcycle_to_mixtral: num_experts must be an integer >= 2, got {num_experts!r}.")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"upcycle_to_mixtral: top_k must be an integer in [1, num_experts={num_experts}], got {top_k!r}.")


@torch.no_grad()
def _ffn_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int, max_tokens: int, seed: int,
                progress: bool) -> list[torch.Tensor]:
    """Every block's FFN inputs on `input_ids` (a seeded subsample of at most `max_tokens` tokens per block)."""
    layers = model.model.layers
    inputs: list[list[torch.Tensor]] = [[] for _ in layers]
    handles = [layer.mlp.register_forward_pre_hook(
        lambda module, args, i=i: inputs[i].append(args[0].detach().reshape(-1, args[0].shape[-1]).to("cpu")))
        for i, layer in enumerate(layers)]
    forward_batches(model, input_ids, batch_size, handles, "Upcycling: FFN inputs", progress)
    generator = torch.Generator().manual_seed(seed)
    out = []
    for chunks in inputs:
        x = torch.cat(chunks).to(torch.float32)
        if x.shape[0] > max_tokens:
            x = x[torch.randperm(x.shape[0], generator=generator)[:max_tokens]]
        out.append(x)
    return out


def routing_counts(router_weight: torch.Tensor, x: torch.Tensor, top_k: int) -> torch.Tensor:
    """Tokens routed to each expert (`int64 [E]`) when `x` `[n, d]` goes to the `top_k` largest logits `x · Wᵀ`."""
    logits = x.to(torch.float32) @ router_weight.to(torch.float32).t()
    return torch.bincount(logits.topk(top_k, dim=-1).indices.flatten(), minlength=router_weight.shape[0])


@torch.no_grad()
def upcycle_to_mixtral(model: nn.Module, input_ids: torch.Tensor, num_experts: int = 4, top_k: int = 2,
                       seed: int = 0, iterations: int = 30, batch_size: int = 8, max_tokens: int = 16384,
                       progress: bool = True) -> tuple[nn.Module, dict]:
    """Builds a `MixtralForCausalLM` with `num_experts` copies of each FFN of a dense Llama-layout `model`.

    Args:
        model: a dense `LlamaForCausalLM` / `MistralForCausalLM` (SiLU, no biases); left unchanged.
        input_ids: calibration tokens `[n, seq_len]` whose FFN inputs set the routers (k-means).
        num_experts: experts per block (`>= 2`).
        top_k: experts per token (`num_experts_per_tok`); the routing weights of the chosen experts sum to 1.
        seed: seed of the token subsample and of k-means.
        iterations: k-means iterations at most.
        batch_size: sequences per forward while collecting the FFN inputs.
        max_tokens: FFN inputs per block given to k-means at most (a seeded subsample).
        progress: show a progress bar.

    Returns:
        `(moe_model, info)`: the Mixtral model (float32, same device as `model`, eval mode) and `info` with
        `"rule"`, `"num_experts"`, `"top_k"`, `"seed"` and `"tokens_per_expert"` (per block, the k-means tokens
        routed to each expert by the new router, top-k slots counted).
    """
    from transformers import MixtralForCausalLM

    _check(model, num_experts, top_k)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError("upcycle_to_mixtral needs calibration token ids [n, seq_len].")
    was_training = model.training
    model.eval()
    try:
        ffn_inputs = _ffn_inputs(model, input_ids, batch_size, max_tokens, seed, progress)
    finally:
        model.train(was_training)
    config = _mixtral_config(model.config, num_experts, top_k)
    device = next(model.parameters()).device
    moe = MixtralForCausalLM(config)
    state = {}
    info = {"rule": "spherical k-means of each block's FFN inputs minus their mean; router weight = centroids made "
                    "orthogonal to the mean, unit norm (logits = x·c = (x-mean)·c); top-k weights normalised to 1", "num_experts": num_experts, "top_k": top_k, "seed": seed,
            "tokens_per_expert": []}
    dense_state = model.state_dict()
    for name, tensor in dense_state.items():
        if ".mlp." not in name:
            state[name] = tensor.detach().to(torch.float32)
    for i, layer in enumerate(tqdm(model.model.layers, desc="Upcycling: routers", disable=not progress)):
        mlp = layer.mlp
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0).detach().to(torch.float32)
        down = mlp.down_proj.weight.detach().to(torch.float32)
        prefix = f"model.layers.{i}.mlp."
        state[prefix + "experts.gate_up_proj"] = gate_up.unsqueeze(0).repeat(num_experts, 1, 1)
        state[prefix + "experts.down_proj"] = down.unsqueeze(0).repeat(num_experts, 1, 1)
        centroids = centred_router(ffn_inputs[i], num_experts, seed=seed + i, iterations=iterations)
        state[prefix + "gate.weight"] = centroids
        info["tokens_per_expert"].append(routing_counts(centroids, ffn_inputs[i], top_k).tolist())
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    result = moe.load_state_dict(state, strict=False)
    missing = [n for n in result.missing_keys if not (config.tie_word_embeddings and n == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"upcycle_to_mixtral: weights not mapped: missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
    moe.to(device).eval()
    logger.info("Upcycled %s into Mixtral with %d experts (top-%d) per block.", model.config.model_type, num_experts,
                top_k)
    return moe, info
