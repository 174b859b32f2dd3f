"""`BlockJob` forwards that skip what is not needed: statistics stop after the last hooked linear, `input_of` stops
at the first requested module, and neither changes what is collected."""

import torch
import torch.nn as nn

from optimum_sparse import PruningConfig
from optimum_sparse.engine.block import BlockJob
from optimum_sparse.engine.capture import BlockInputs


class _ToyBlock(nn.Module):
    """attn → mlp; `reuse_first` calls the first linear twice per forward."""

    def __init__(self, reuse_first: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second, self.mlp_in, self.mlp_out = (nn.Linear(6, 6) for _ in range(4))
        self.reuse_first = reuse_first
        self.mlp_calls = 0

    def forward(self, hidden):
        h = self.first(hidden)
        if self.reuse_first:
            h = self.first(torch.tanh(h))
        h = hidden + self.second(h)
        self.mlp_calls += 1
        return h + self.mlp_out(torch.relu(self.mlp_in(h)))


def _job(block, batches=3):
    torch.manual_seed(1)
    hidden = [torch.randn(2, 5, 6) for _ in range(batches)]
    inputs = BlockInputs(hidden=hidden, args=[() for _ in hidden], kwargs=[{} for _ in hidden])
    linears = {n: getattr(block, n) for n in ("first", "second", "mlp_in", "mlp_out")}
    return BlockJob(block, 0, "block", None, linears, inputs, torch.device("cpu"), PruningConfig(), lambda n: 0.5)


def _hessians_by_hooks(block, job, names):
    """Reference: full forwards, every call of every named linear accumulated."""
    sums = {n: torch.zeros(6, 6, dtype=torch.float64) for n in names}

    def add(name, inputs):
        x = inputs[0].reshape(-1, 6)
        sums[name].add_((x.t() @ x).double())

    handles = [getattr(block, n).register_forward_hook(lambda m, a, o, n=n: add(n, a)) for n in names]
    for i in range(len(job.inputs)):
        job.forward_batch(i)
    for h in handles:
        h.remove()
    return {n: s.float() for n, s in sums.items()}


def test_stats_stop_after_the_last_hooked_linear_and_match_full_forwards():
    block = _ToyBlock()
    job = _job(block)
    expected = _hessians_by_hooks(block, job, ["first", "second"])
    block.mlp_calls = 0
    stats = job.collect_stats(["first", "second"], want_hessian=True)
    assert block.mlp_calls == 1  # only the first batch runs whole (it checks each linear is called once)
    for name in ("first", "second"):
        torch.testing.assert_close(stats[name].hessian, expected[name], rtol=1e-5, atol=1e-5)
        assert stats[name].num_tokens == 30


def test_stats_keep_full_forwards_when_a_linear_is_called_twice():
    block = _ToyBlock(reuse_first=True)
    job = _job(block)
    expected = _hessians_by_hooks(block, job, ["first", "second"])
    block.mlp_calls = 0
    stats = job.collect_stats(["first", "second"], want_hessian=True)
    assert block.mlp_calls == 3
    torch.testing.assert_close(stats["first"].hessian, expected["first"], rtol=1e-5, atol=1e-5)
    assert stats["first"].num_tokens == 60


def test_input_of_returns_the_module_input_without_running_the_rest():
    block = _ToyBlock()
    job = _job(block)
    seen = []
    handle = block.mlp_in.register_forward_hook(lambda m, a, o: seen.append(a[0].clone()))
    job.forward_batch(1)
    handle.remove()
    block.mlp_calls = 0
    x = job.input_of(1, [block.mlp_in, block.mlp_out])
    assert block.mlp_calls == 1  # reached the MLP ...
    torch.testing.assert_close(x, seen[0])
    out_calls = []
    handle = block.mlp_out.register_forward_pre_hook(lambda *a: out_calls.append(1))
    job.input_of(1, [block.mlp_in])
    handle.remove()
    assert not out_calls  # ... and stopped before its output projection
    assert not block.mlp_in._forward_pre_hooks  # hooks removed
