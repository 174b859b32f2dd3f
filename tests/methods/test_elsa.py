"""ELSA: exact sparsity and N:M at the end, the loss goes down, resumption equals an uninterrupted run, the ADMM
optimizer on its own (plain loop, ELSA-L states, global budget), bad settings."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainerCallback, TrainingArguments

from optimum_sparse import PruningConfig, SparsePruner
from optimum_sparse.integrations.elsa import ELSATrainer, TokenWindows, admm_optimizer_of, run_elsa
from optimum_sparse.methods.admm import ADMMSettings, admm_optimizer_class, global_masks, penalty_at
from optimum_sparse.methods.masks import num_pruned

from ..engine.test_pruning import check_exact_sparsity
from ..helpers import VOCAB, assert_state_unchanged, block_linears, make_model, snapshot, sparsity_kwargs

FAST = dict(steps=16, interval=4, learning_rate=3e-3, penalty=0.05, penalty_init=0.0, penalty_schedule="linear",
            gradient_checkpointing=False)


def learnable_ids(num_samples: int = 16, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    """Token windows with structure a tiny model learns in a few steps: t[i+1] = 5·t[i] + 3 (mod V), 10% noise."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.empty(num_samples, seq_len, dtype=torch.long)
    ids[:, 0] = torch.randint(0, VOCAB, (num_samples,), generator=g)
    for i in range(1, seq_len):
        ids[:, i] = (5 * ids[:, i - 1] + 3) % VOCAB
    noise = torch.rand(num_samples, seq_len, generator=g) < 0.1
    ids[noise] = torch.randint(0, VOCAB, (int(noise.sum()),), generator=g)
    return ids


def elsa_config(ids, sparsity=0.7, structure="unstructured", **kwargs):
    return PruningConfig(method="elsa", **sparsity_kwargs(structure, sparsity), num_samples=ids.shape[0],
                         seq_len=ids.shape[1], batch_size=4, method_kwargs={**FAST, **kwargs})


def lm_loss(model, ids) -> float:
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
        return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


@pytest.mark.parametrize("arch, structure", [("llama", "unstructured"), ("llama", "2:4"), ("gpt2", "4:8"),
                                             ("gpt2", "unstructured"), ("opt", "2:4")])
def test_exact_sparsity_and_pattern_at_the_end(arch, structure):
    model, ids = make_model(arch), learnable_ids()
    pruner = SparsePruner(elsa_config(ids, 0.8, structure, gradient_checkpointing=arch == "llama"))
    pruner.apply(model, dataset=ids, progress=False)
    check_exact_sparsity(model, structure, 0.8 if structure == "unstructured" else 0.5)
    assert not model.training and all(p.requires_grad for p in model.parameters())
    report = pruner.report
    assert report.method == "elsa" and len(report.layers) == len(block_linears(model))
    assert report.diagnostics["elsa"]["steps"] == FAST["steps"]
    assert pruner.record.to_dict()["diagnostics"]["elsa"]["history"]


def test_loss_decreases_and_the_sparse_model_beats_magnitude():
    ids = learnable_ids(32)
    magnitude = make_model("llama")
    SparsePruner(PruningConfig(method="magnitude", sparsity=0.7)).apply(magnitude, progress=False)
    model = make_model("llama")
    pruner = SparsePruner(elsa_config(ids, 0.7, steps=40, interval=5))
    pruner.apply(model, dataset=ids, progress=False)
    losses = [entry["loss"] for entry in pruner.report.diagnostics["elsa"]["history"]]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2
    check_exact_sparsity(model, "unstructured", 0.7)
    assert lm_loss(model, ids) < lm_loss(magnitude, ids) - 0.2


class _Crash(Exception):
    pass


class _CrashAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise _Crash


@pytest.mark.parametrize("low_memory", [False, True])
def test_resumed_run_equals_an_uninterrupted_one(tmp_path, low_memory):
    ids = learnable_ids()
    settings = dict(steps=12, interval=3, save_steps=4, projection="second_moment", penalty_init=0.01,
                    penalty_schedule="cosine", low_memory=low_memory)
    whole = make_model("llama")
    run_elsa(whole, ids, elsa_config(ids, output_dir=str(tmp_path / "a"), **settings), progress=False)
    interrupted = make_model("llama")
    with pytest.raises(_Crash):
        run_elsa(interrupted, ids, elsa_config(ids, output_dir=str(tmp_path / "b"), **settings), progress=False,
                 callbacks=[_CrashAt(10)])
    resumed = make_model("llama")  # a fresh process would start from the dense model again
    report = run_elsa(resumed, ids, elsa_config(ids, output_dir=str(tmp_path / "b"), resume_from_checkpoint=True,
                                                **settings), progress=False)
    assert report.diagnostics["elsa"]["resumed_from"] == "checkpoint-8"
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_global_budget_and_second_moment_projection():
    ids = learnable_ids()
    model = make_model("llama")
    pruner = SparsePruner(elsa_config(ids, 0.8, budget="global", projection="second_moment"))
    pruner.apply(model, dataset=ids, progress=False)
    linears = block_linears(model)
    total = sum(m.weight.numel() for m in linears.values())
    zeros = sum(int((m.weight == 0).sum()) for m in linears.values())
    assert zeros == num_pruned(total, 0.8)
    per_layer = [r.sparsity for r in pruner.report.layers]
    assert max(per_layer) - min(per_layer) > 0.01  # the budget moved between layers


def test_warm_start_from_sparsegpt():
    ids = learnable_ids()
    model = make_model("llama")
    pruner = SparsePruner(elsa_config(ids, 0.7, steps=4, warm_start="sparsegpt"))
    pruner.apply(model, dataset=ids, progress=False)
    check_exact_sparsity(model, "unstructured", 0.7)
    assert pruner.report.diagnostics["warm_start"]["method"] == "sparsegpt"


def test_admm_optimizer_in_a_plain_loop_with_low_memory_states():
    """The optimizer alone (any training loop, accelerate included): ELSA-L keeps z in float8 and u in bfloat16."""
    model = make_model("llama")
    ids = learnable_ids()
    targets = {n: m for n, m in block_linears(model).items()}
    settings = ADMMSettings(names=list(targets), sparsities=[0.75] * len(targets), interval=2, penalty=0.1,
                            low_memory=True)
    weights = [m.weight for m in targets.values()]
    others = [p for p in model.parameters() if all(p is not w for w in weights)]
    optimizer = admm_optimizer_class(torch.optim.AdamW)(
        [{"params": weights, "admm": True}, {"params": others}], lr=1e-3, admm=settings)
    model.train()
    for step in range(4):
        loss = model(ids[:4], labels=ids[:4]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    state = optimizer.state[weights[0]]
    assert state["admm_z"].dtype == torch.float8_e4m3fn and state["admm_u"].dtype == torch.bfloat16
    assert "exp_avg_sq" in state and optimizer.admm_metrics["admm_step"] == 4
    with optimizer.projected():
        assert all(int((w == 0).sum()) == num_pruned(w.numel(), 0.75) for w in weights)
    assert all(int((w == 0).sum()) == 0 for w in weights)  # restored
    masks = optimizer.final_projection()
    assert set(masks) == set(targets)
    assert all(int((w == 0).sum()) == num_pruned(w.numel(), 0.75) for w in weights)
    assert admm_optimizer_of(optimizer) is optimizer


def test_elsa_trainer_with_its_own_training_arguments(tmp_path):
    ids = learnable_ids()
    model = make_model("gpt2")
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3,
                             report_to="none", use_cpu=True, disable_tqdm=True, logging_steps=1,
                             save_strategy="no")
    trainer = ELSATrainer(model=model, args=args, train_dataset=TokenWindows(ids, 24),
                          pruning_config=PruningConfig(method="elsa", sparsity=0.6, method_kwargs={"interval": 2}))
    trainer.train()
    masks = trainer.finalize()
    assert len(masks) == len(block_linears(model))
    check_exact_sparsity(model, "unstructured", 0.6)
    assert any("admm_gap" in entry for entry in trainer.state.log_history)


def test_global_masks_are_exact_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = [torch.randint(0, 5, (7, 9), generator=g).float(), torch.rand(4, 4, generator=g), torch.zeros(3, 3)]
    for count in (0, 1, 10, 40, 60, 88, 200):
        masks = global_masks(scores, count)
        assert sum(int(m.sum()) for m in masks) == min(count, 88)
        pruned = torch.cat([s[m] for s, m in zip(scores, masks)])
        kept = torch.cat([s[~m] for s, m in zip(scores, masks)])
        if pruned.numel() and kept.numel():
            assert float(pruned.max()) <= float(kept.min())


def test_penalty_schedules():
    base = dict(names=[], sparsities=[], penalty=1.0, penalty_init=0.0, total_steps=100)
    assert penalty_at(50, ADMMSettings(**base, penalty_schedule="constant")) == 1.0
    assert penalty_at(50, ADMMSettings(**base, penalty_schedule="linear")) == pytest.approx(0.5)
    assert penalty_at(50, ADMMSettings(**base, penalty_schedule="cosine")) == pytest.approx(0.5)
    assert penalty_at(25, ADMMSettings(**base, penalty_schedule="cosine")) == pytest.approx(0.5 * (1 - math.cos(math.pi / 4)))
    exp = ADMMSettings(**{**base, "penalty_init": 0.01}, penalty_schedule="exponential")
    assert penalty_at(0, exp) == pytest.approx(0.01) and penalty_at(50, exp) == pytest.approx(0.1)
    assert penalty_at(500, exp) == pytest.approx(1.0)


@pytest.mark.parametrize("kwargs, match", [
    ({"penalty": 0}, r"method_kwargs\['penalty'\] \(λ\) must be a number > 0"),
    ({"penalty": -0.1}, r"\(λ\) must be a number > 0"),
    ({"penalty": float("inf")}, r"\(λ\) must be a number > 0"),
    ({"interval": 0}, r"method_kwargs\['interval'\] \(K, steps between dual updates\) must be an integer >= 1"),
    ({"interval": 2.5}, r"'interval'.*integer >= 1"),
    ({"penalty_schedule": "step"}, r"\['penalty_schedule'\] must be one of"),
    ({"penalty_schedule": "linear", "penalty_init": None}, "needs 'penalty_init'"),
    ({"penalty_schedule": "exponential", "penalty_init": 0.0}, r"'penalty_init'.*> 0"),
    ({"projection": "hessian"}, r"\['projection'\] must be one of"),
    ({"budget": "block"}, r"\['budget'\] must be 'layer' or 'global'"),
    ({"save_steps": 10}, "needs an 'output_dir'"),
    ({"resume_from_checkpoint": True}, "needs the 'output_dir'"),
    ({"steps": 0}, r"'steps'.*integer >= 1"),
    ({"warm_start": "elsa"}, r"\['warm_start'\] must be None or one of"),
    ({"adam_beta2": 1.0}, r"\['adam_beta2'\] must be below 1"),
    ({"lmda": 0.01}, "unknown ELSA parameters"),
])
def test_bad_settings_name_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruningConfig(method="elsa", method_kwargs={**FAST, **kwargs})


def test_global_budget_with_nm_is_refused():
    with pytest.raises(ValueError, match=r"\['budget'\]='global' is for unstructured"):
        PruningConfig(method="elsa", structure="2:4", method_kwargs={"budget": "global"})


def test_model_without_gradients_fails_before_any_change():
    ids = learnable_ids()
    model = make_model("llama").requires_grad_(False)
    before = snapshot(model)
    pruner = SparsePruner(elsa_config(ids))
    with pytest.raises(ValueError, match="ELSA trains the weights it prunes.*requires_grad=False"):
        pruner.apply(model, dataset=ids, progress=False)
    assert_state_unchanged(model, before)


def test_elsa_needs_training_windows():
    with pytest.raises(ValueError, match="tokenizer"):
        SparsePruner(PruningConfig(method="elsa")).apply(make_model("llama"), progress=False)


def test_admm_optimizer_on_sharded_parameters(tmp_path):
    """FSDP2 shards parameters as DTensors: projections work on the full tensor and z/u stay sharded like the weight."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        g = torch.Generator().manual_seed(0)
        weight = torch.nn.Parameter(distribute_tensor(torch.randn(8, 16, generator=g), mesh, [Shard(0)]))
        other = torch.nn.Parameter(distribute_tensor(torch.randn(4, 8, generator=g), mesh, [Shard(0)]))
        settings = ADMMSettings(names=["w"], sparsities=[0.5], interval=2, penalty=0.1, projection="second_moment")
        optimizer = admm_optimizer_class(torch.optim.AdamW)([{"params": [weight], "admm": True}, {"params": [other]}],
                                                            lr=1e-2, admm=settings)
        x = distribute_tensor(torch.randn(5, 16, generator=g), mesh, [Replicate()])
        for _ in range(6):
            (((x @ weight.t()) ** 2).sum() + (other ** 2).sum()).backward()
            optimizer.step()
            optimizer.zero_grad()
        assert isinstance(optimizer.state[weight]["admm_z"], DTensor)
        optimizer.load_state_dict(optimizer.state_dict())
        optimizer.final_projection()
        assert int((weight.full_tensor() == 0).sum()) == 64
    finally:
        dist.destroy_process_group()


def test_per_layer_sparsity_from_an_allocation():
    ids = learnable_ids()
    model = make_model("llama")
    allocation = lambda name: 0.8 if "mlp" in name else 0.4  # noqa: E731
    pruner = SparsePruner(elsa_config(ids, 0.6, steps=4))
    pruner.apply(model, dataset=ids, sparsity_for=allocation, progress=False)
    for name, module in block_linears(model).items():
        assert int((module.weight == 0).sum()) == num_pruned(module.weight.numel(), allocation(name)), name
