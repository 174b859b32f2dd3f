"""Two gloo processes, each with half of the calibration windows, prune like one process with all of them."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from optimum_sparse import PruningConfig, SparsePruner

from ..helpers import make_ids, make_model

CASES = [("llama", "sparsegpt"), ("llama", "wanda"), ("opt", "sparsellm"), ("llama", "sparsellm")]


def _config(method):
    # two windows per forward: one process batches windows (0, 1), (2, 3), two processes (0, 2) and (1, 3)
    return PruningConfig(method=method, sparsity=0.5, num_samples=4, seq_len=16, batch_size=2)


def _worker(rank, world_size, init_file, out_dir):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        for arch, method in CASES:
            model = make_model(arch, num_layers=2)
            pruner = SparsePruner(_config(method))
            pruner.apply(model, dataset=make_ids(), progress=False)
            torch.save({"state": model.state_dict()},
                       os.path.join(out_dir, f"{arch}-{method}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("arch,method", CASES)
def test_two_processes_equal_one(two_process_results, arch, method):
    single = make_model(arch, num_layers=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as many threads as each rank: a thread count changes float32 reduction order
    try:
        SparsePruner(_config(method)).apply(single, dataset=make_ids(), progress=False)
    finally:
        torch.set_num_threads(threads)
    ranks = [torch.load(two_process_results / f"{arch}-{method}-rank{r}.pt")["state"] for r in range(2)]
    for name, expected in single.state_dict().items():
        for state in ranks:
            assert torch.equal(state[name] == 0, expected == 0), f"{name}: masks differ"
            if method == "sparsellm":  # its normal-equation sums are float32, summed in another order; the
                # second block's least squares (64 tokens) amplify the first block's ~1e-6 differences
                torch.testing.assert_close(state[name], expected, atol=1e-4, rtol=1e-3, msg=name)
            else:  # per-window float64 statistics: the same weights bit for bit, whatever the batching
                assert torch.equal(state[name], expected), f"{name}: weights differ"


def test_too_few_windows_for_the_processes_is_refused(monkeypatch):
    from optimum_sparse.engine import distributed

    monkeypatch.setattr(distributed, "world", lambda: (0, 8))
    with pytest.raises(ValueError, match="cannot be split across 8 processes"):
        distributed.shard_rows(make_ids(num_samples=4))
