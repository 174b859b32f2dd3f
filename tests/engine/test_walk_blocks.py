"""`engine.walk_blocks`: the one block loop of every run."""

import ast
import pathlib

import torch

from optimum_sparse import PruningConfig
from optimum_sparse.engine.architectures import find_blocks, get_architecture
from optimum_sparse.engine.sequential import capture_inputs, walk_blocks

from ..helpers import make_ids, make_model

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "optimum_sparse"


def _setup(arch="llama", num_layers=3):
    model = make_model(arch, num_layers=num_layers).eval()
    spec = get_architecture(model)
    blocks = find_blocks(model, spec)
    config = PruningConfig(method="wanda", sparsity=0.5)
    inputs = capture_inputs(model, blocks, make_ids(4), batch_size=2)
    return model, spec, blocks, config, inputs


@torch.no_grad()
def test_walk_propagates_block_outputs_to_the_final_hidden_states():
    model, spec, blocks, config, inputs = _setup()
    seen = []
    final = walk_blocks(model, blocks, spec, config, inputs, lambda job: seen.append(job.index), progress=False)
    assert seen == [0, 1, 2]
    hidden = {}
    handle = model.model.norm.register_forward_pre_hook(lambda m, args: hidden.setdefault("h", args[0]))
    model(input_ids=make_ids(4)[:2], use_cache=False)
    handle.remove()
    torch.testing.assert_close(final.hidden[0], hidden["h"])


@torch.no_grad()
def test_walk_uses_the_outputs_visit_returns_and_calls_after_with_the_next_inputs():
    model, spec, blocks, config, inputs = _setup()
    marker = [torch.full_like(h, 7.0) for h in inputs.hidden]
    firsts, nexts = [], []

    def visit(job):
        firsts.append(float(job.inputs.hidden[0].flatten()[0]))
        return marker if job.index == 0 else None

    def after(job, next_inputs):
        nexts.append(next_inputs.hidden)

    walk_blocks(model, blocks, spec, config, inputs, visit, after=after, progress=False)
    assert firsts[1] == 7.0  # block 1 ran on what visit returned for block 0
    assert nexts[0] is marker


@torch.no_grad()
def test_walk_starts_at_start_and_is_data_free_without_inputs():
    model, spec, blocks, config, _ = _setup()
    seen = []

    def visit(job):
        seen.append((job.index, len(job.inputs)))

    assert walk_blocks(model, blocks, spec, config, None, visit, start=1, progress=False) is None
    assert seen == [(1, 0), (2, 0)]


@torch.no_grad()
def test_walk_gives_each_block_the_arguments_of_its_kind():
    model, spec, blocks, config, inputs = _setup("gemma3_text", num_layers=2)
    assert inputs.variants, "gemma3_text alternates sliding/full attention blocks"
    kwargs = []
    walk_blocks(model, blocks, spec, config, inputs, lambda job: kwargs.append(job.inputs.kwargs), progress=False)
    assert kwargs[0] is not kwargs[1]


def test_no_block_loop_outside_the_engine():
    """Every pass over the decoder blocks goes through `walk_blocks`: only `engine/` onloads blocks itself."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.parts[-2] == "engine":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in (
                    "onload_block", "capture_block_inputs"):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not offenders, f"block loops outside engine.walk_blocks: {offenders}"
