"""Mask selection: exact unstructured counts (whole layer and per row) and exact N:M groups."""

import math

import pytest
import torch

from optimum_sparse.methods.masks import layer_mask, nm_mask, num_pruned, row_mask, select_mask

SHAPES = [(24, 40), (17, 37), (8, 24), (1, 7), (5, 1)]
SPARSITIES = [0.0, 0.1, 0.33, 0.5, 0.7, 0.9, 0.95]


def _scores(shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("numel,sparsity,expected", [
    (960, 0.5, 480), (960, 0.7, 672), (960, 0.9, 864), (10, 0.3, 3), (10, 0.29, 2), (7, 0.5, 3), (100, 0.0, 0),
    (1000, 0.7, 700),  # 1000 * 0.7 = 699.999... in floating point
])
def test_num_pruned(numel, sparsity, expected):
    assert num_pruned(numel, sparsity) == expected


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_layer_mask_exact_count_and_lowest(shape, sparsity):
    scores = _scores(shape)
    mask = layer_mask(scores, sparsity)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    k = num_pruned(scores.numel(), sparsity)
    assert int(mask.sum()) == k
    if 0 < k < scores.numel():
        assert scores[mask].max() <= scores[~mask].min()


def test_layer_mask_explicit_count():
    scores = _scores((6, 10))
    assert int(layer_mask(scores, 0.5, count=7).sum()) == 7
    assert int(layer_mask(scores, 0.5, count=0).sum()) == 0


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_row_mask_exact_layer_count_balanced_rows(shape, sparsity):
    scores = _scores(shape, seed=1)
    mask = row_mask(scores, sparsity)
    rows, cols = shape
    assert int(mask.sum()) == num_pruned(rows * cols, sparsity)
    per_row = mask.sum(1)
    floor = math.floor(cols * sparsity + 1e-9)
    assert per_row.min() >= floor and per_row.max() <= floor + 1
    # within each row the pruned scores are the lowest ones
    for r in range(rows):
        if 0 < per_row[r] < cols:
            assert scores[r][mask[r]].max() <= scores[r][~mask[r]].min()


def test_row_mask_extra_weights_go_to_lowest_candidates():
    # 3 x 4 at 7/12: 2 per row plus 1 extra, taken by the row whose 3rd-lowest score is lowest (row 1)
    scores = torch.tensor([[0.1, 0.2, 0.9, 0.9], [0.1, 0.2, 0.3, 0.9], [0.1, 0.2, 0.8, 0.9]])
    mask = row_mask(scores, 7 / 12)
    assert int(mask.sum()) == 7
    assert mask[1, 2] and not mask[0, 2] and not mask[2, 2]


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
@pytest.mark.parametrize("shape", [(24, 40), (3, 8), (16, 64)], ids=str)
def test_nm_mask_exact_groups(n, m, shape):
    scores = _scores(shape, seed=2)
    mask = nm_mask(scores, n, m)
    rows, cols = shape
    groups = mask.view(rows, cols // m, m)
    assert bool((groups.sum(-1) == n).all())
    scored = scores.view(rows, cols // m, m)
    pruned_max = torch.where(groups, scored, torch.full_like(scored, -1)).amax(-1)
    kept_min = torch.where(~groups, scored, torch.full_like(scored, 2)).amin(-1)
    assert bool((pruned_max <= kept_min).all())


def test_nm_mask_groups_are_consecutive_inputs():
    # the lowest two scores of each group of 4 columns, not of each group of 4 rows
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0, 1.0, 2.0, 3.0, 4.0]])
    assert nm_mask(scores, 2, 4).tolist() == [[False, False, True, True, True, True, False, False]]


def test_nm_mask_rejects_indivisible_columns():
    with pytest.raises(ValueError, match="multiple of M=4"):
        nm_mask(torch.rand(4, 10), 2, 4)


def test_select_mask_dispatch():
    scores = _scores((8, 16), seed=3)
    assert torch.equal(select_mask(scores, 0.5, (2, 4), per_row=True), nm_mask(scores, 2, 4))
    assert torch.equal(select_mask(scores, 0.3, None, per_row=True), row_mask(scores, 0.3))
    assert torch.equal(select_mask(scores, 0.3, None, per_row=False), layer_mask(scores, 0.3))
