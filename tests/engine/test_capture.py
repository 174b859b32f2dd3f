"""The engine feeds every block exactly the inputs the model itself gives it."""

import pytest
import torch

from optimum_sparse import PruningConfig
from optimum_sparse.engine import run_sequential
from optimum_sparse.engine.capture import capture_block_inputs
from optimum_sparse.engine.architectures import find_blocks
from optimum_sparse.methods import PruningMethod

from ..helpers import ALL_ARCHS, make_ids, make_model


class _Recorder(PruningMethod):
    """Prunes nothing; records the calibration inputs the engine hands to each block."""

    name = "recorder"
    stats = "norms"

    def __init__(self, config):
        super().__init__(config)
        self.inputs = []

    def prune_block(self, job):
        self.inputs.append(torch.cat([h.clone() for h in job.inputs.hidden]))


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_block_inputs_match_model_hidden_states(arch):
    """4 blocks, uneven batches (3+3+2); Gemma 2/3 alternate sliding-window and full attention layers."""
    model = make_model(arch, num_layers=4)
    ids = make_ids(num_samples=8, seq_len=16)
    config = PruningConfig(method="wanda", num_samples=8, seq_len=16, batch_size=3)
    recorder = _Recorder(config)
    with torch.no_grad():
        hidden_states = model(ids, output_hidden_states=True).hidden_states
    report = run_sequential(model, recorder, config, ids, progress=False)
    assert len(recorder.inputs) == 4 and len(report.blocks) == 4
    for index, captured in enumerate(recorder.inputs):
        torch.testing.assert_close(captured, hidden_states[index], rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"inputs of block {index}: {m}")


def test_capture_stops_before_second_block_and_drops_cache():
    model = make_model("llama", num_layers=2)
    blocks = find_blocks(model)
    calls = []
    handle = blocks[1].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        inputs = capture_block_inputs(model, blocks[0], make_ids(), batch_size=4)
    finally:
        handle.remove()
    assert not calls
    assert len(inputs) == 2 and inputs.num_tokens == 8 * 16
    for kwargs in inputs.kwargs:
        assert kwargs.get("past_key_values") is None and kwargs.get("use_cache") in (None, False)
    # equal tensors shared between batches (one attention mask / rotary table in memory)
    for key, value in inputs.kwargs[0].items():
        if isinstance(value, torch.Tensor):
            assert inputs.kwargs[1][key] is value, key
