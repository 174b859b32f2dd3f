"""Tiny random mixture-of-experts models (2 blocks, hidden 32, 4 experts) for every supported MoE model type."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoConfig, AutoModelForCausalLM

from ..helpers import HIDDEN, INTERMEDIATE, SENTENCES, VOCAB

NUM_EXPERTS = 4
_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)
_MLA = dict(num_key_value_heads=4, n_routed_experts=NUM_EXPERTS, num_experts_per_tok=2, moe_intermediate_size=16,
            n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=8, n_group=1, topk_group=1)
MOE_CONFIGS = {
    "mixtral": dict(num_local_experts=NUM_EXPERTS, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=NUM_EXPERTS, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=32),
    "qwen3_moe": dict(num_experts=NUM_EXPERTS, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8),
    "qwen3_next": dict(num_experts=NUM_EXPERTS, num_experts_per_tok=2, moe_intermediate_size=16,
                       shared_expert_intermediate_size=32, head_dim=8, linear_num_value_heads=4,
                       linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
                       layer_types=["linear_attention", "full_attention"]),
    "olmoe": dict(num_experts=NUM_EXPERTS, num_experts_per_tok=2),
    "deepseek_v2": dict(_MLA, q_lora_rank=None),
    "deepseek_v3": dict(_MLA, q_lora_rank=16),
    "gpt_oss": dict(num_local_experts=NUM_EXPERTS, num_experts_per_tok=2, head_dim=8,
                    layer_types=["sliding_attention", "full_attention"]),
    "llama4_text": dict(num_local_experts=NUM_EXPERTS, num_experts_per_tok=1, intermediate_size_mlp=64, head_dim=8,
                        interleave_moe_layer_step=2, no_rope_layers=[1, 1]),
    "granitemoe": dict(num_local_experts=NUM_EXPERTS, num_experts_per_tok=2),
    "phimoe": dict(num_local_experts=NUM_EXPERTS, num_experts_per_tok=2),
}
MOE_TYPES = list(MOE_CONFIGS)
EXPECTED_LAYOUT = {"gpt_oss": "gpt_oss", "llama4_text": "llama4"}  # every other type: "concatenated"


def make_moe(model_type: str, seed: int = 0) -> torch.nn.Module:
    config = AutoConfig.for_model(model_type, **{**_COMMON, **MOE_CONFIGS[model_type]})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    if model_type == "gpt_oss":  # its router and expert biases start at zero: give them values to test
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "bias" in name and "experts" in name:
                    p.normal_(0, 0.02)
    return model


def block_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if ".layers." in n}


def _process(rank, world_size, init_file, run, args):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    if world_size == 1:  # the reference, in a fresh process too: routing is discrete, so no state of this one leaks in
        return run("single", *args)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        run(f"rank{rank}", *args)
    finally:
        dist.destroy_process_group()


def one_and_two_processes(run, tmp_path, *args) -> None:
    """Calls `run(tag, *args)` in one process (`tag="single"`), then in two gloo ranks (`"rank0"`, `"rank1"`);
    `run` must be a module-level function (it is pickled by name)."""
    mp.spawn(_process, args=(1, str(tmp_path / "init1"), run, args), nprocs=1, join=True)
    mp.spawn(_process, args=(2, str(tmp_path / "init2"), run, args), nprocs=2, join=True)


def cli_model(tmp_path, tokenizer, model_type: str = "qwen3_moe") -> tuple[str, str]:
    """`(model folder, calibration text file)` for CLI tests: a tiny random MoE saved with the tokenizer."""
    make_moe(model_type).save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    (tmp_path / "calib.txt").write_text("\n".join(SENTENCES * 20))
    return str(tmp_path / "dense"), str(tmp_path / "calib.txt")
