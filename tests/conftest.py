"""Test set-up. Without a GPU, the Triton kernels run under the interpreter, which must be
switched on before Triton is first imported, and the CUDA C++ kernels on the CPU execution layer
(GPTFAST_CUDA_SIM=1, read when gptfast is imported); `backend="auto"` never picks either, so
only tests that ask for backend="triton" or "cuda" pay for them (the layer is compiled on its
first use)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("GPTFAST_CUDA_SIM", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run by `make gpu-check`)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy shared CPU 2 threads that
    wait on each other can be 10x slower than 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
