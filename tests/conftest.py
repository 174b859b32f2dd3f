"""Shared fixtures (the model factory and helpers live in `tests/helpers.py`)."""

from __future__ import annotations

import os

# Some CPUs/VMs advertise AMX without enabling it, and oneDNN's AMX bf16 kernels then die with SIGILL ("Illegal
# instruction"). Cap oneDNN's ISA; it is read when torch loads, so this must run before `import torch`.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from .helpers import ALL_ARCHS, build_tokenizer, make_ids, make_model


@pytest.fixture(params=ALL_ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def model_factory():
    return make_model


@pytest.fixture
def calib_ids() -> torch.Tensor:
    return make_ids()


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(autouse=True, scope="session")
def _quiet_transformers():
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(verbosity)
