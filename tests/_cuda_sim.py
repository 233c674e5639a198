"""Helpers for the tests that run the CUDA C++ kernels on the CPU execution layer
(gptfast/cuda_sim.py). Loading the layer never skips: a missing toolkit header fails the test."""
from __future__ import annotations

import torch

from gptfast import cuda_sim

# (thread order, block order, seed, workers): every kernel test runs under each of these, and
# results that must be bit-equal are compared across them. The last one runs blocks on two OS
# threads at once.
ORDERS = [("forward", "forward", 0, 1), ("reverse", "reverse", 0, 1), ("random", "random", 7, 2)]


def sim():
    return cuda_sim.load()


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _tensors(item)]
    return []


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaN payloads included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.reshape(-1).contiguous().view(torch.uint8),
                       b.reshape(-1).contiguous().view(torch.uint8))


def under_orders(fn, *, exact=True, atol=0.0, rtol=0.0, orders=ORDERS, **settings):
    """Runs fn() under each thread/block order; returns the first result. exact: every tensor of
    the results bit-equal across orders; otherwise within atol/rtol (kernels with atomics)."""
    results = []
    for thread, block, seed, workers in orders:
        with cuda_sim.settings(thread_order=thread, block_order=block, seed=seed,
                               workers=workers, **settings):
            results.append(fn())
    first = _tensors(results[0])
    for (thread, block, _, workers), other in zip(orders[1:], results[1:]):
        for i, (a, b) in enumerate(zip(first, _tensors(other))):
            where = f"output {i} under thread order {thread}, block order {block}, {workers} workers"
            if exact:
                assert bits_equal(a, b), f"{where}: differs from the forward order"
            else:
                torch.testing.assert_close(b, a, atol=atol, rtol=rtol, equal_nan=True, msg=where)
    return results[0]
