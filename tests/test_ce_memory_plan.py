"""The linear cross-entropy's memory plan against what its launchers really allocate, at the
three full shapes of the benchmark, without a GPU and without computing anything.

The launchers run their CUDA code path (H100 configurations and grids) on fake CUDA tensors
(FakeTensorMode: shapes, dtypes and devices, no memory) with the Triton launches stubbed;
cuBLAS products on fake tensors compute nothing. A dispatch mode above the fake one sees
every tensor the launchers create and counts the bytes of its storage while it is alive, so
the peak is that of the real allocations (not counted: cuBLAS/cub workspaces, which PyTorch
allocates once per process). A data-dependent host read would raise under FakeTensorMode: the
test also proves that neither schedule syncs with the host.

Goals (issue 10, bf16, a training step: forward, then backward, gradients included):
  lean      peak <= gradients + 64 MiB
  budgeted  peak <= gradients + budget, and under half of torch.compile's measured memory
            (3242 / 3070 / 5162 MiB on an H200) with the default budget (LINEAR_CE_BUDGET).
"""
import os
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import gptfast  # noqa: E402
from gptfast.kernels import configs  # noqa: E402
from gptfast.kernels import cross_entropy as CE  # noqa: E402
from gptfast.kernels import cross_entropy_plan as plan  # noqa: E402

MiB = 1 << 20
H100 = configs.Target((9, 0), 132)
A100 = configs.Target((8, 0), 108)
# (name, N, D, V, torch.compile's peak on the H200 in MiB: benchmarks' anchors)
SHAPES = [("gpt2", 16384, 768, 50257, 3242), ("llama3", 8192, 4096, 128256, 3070),
          ("gemma2", 8192, 2304, 256000, 5162)]
KERNELS = ("_ce_fused_kernel", "_lce_fwd_kernel", "_lce_combine_kernel", "_lce_bwd_kernel",
           "_lce_dh_store_kernel")


class AllocationCounter(TorchDispatchMode):
    """Bytes of the storages of every tensor an op returns, from the first op that returns
    one until the storage dies (a weakref on the storage: views share it, in-place and out=
    ops return tensors whose storage is already counted)."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._count(t.untyped_storage())
        return out

    def inputs(self, *tensors):
        """Storages that exist before the step (its inputs): their views count nothing."""
        for t in tensors:
            self._count(t.untyped_storage(), counted=False)

    def _count(self, storage, counted=True):
        key = storage._cdata
        if key in self.live:
            return
        self.live[key] = n = storage.nbytes() if counted else 0
        self.now += n
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, key)

    def _free(self, key):
        self.now -= self.live.pop(key)


class _Stub:
    """A @triton.jit kernel that launches nothing: `kernel[grid](...)` returns at once."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _step(h, w, t, budget, opts):
    """One training step as the ops run it (reduction mean): forward, the reduction, backward
    with the mean's per-row gradient (lean) or in-place scaling (budgeted). Returns the
    gradients, which outlive the step as the parameters' .grad."""
    count = t.ne(-100).sum(dtype=torch.float32)
    grad_loss = torch.ones((), device=h.device)
    if budget is None:
        rows, lse, _ = CE.linear_cross_entropy_forward(h, w, t, None, reduction="none", **opts)
        loss = rows.sum() / count
        del rows
        g = (grad_loss / count).expand(h.shape[0])
        grads = CE.linear_cross_entropy_backward(g, None, h, w, t, None, lse, **opts)
    else:
        rows, lse, grads = CE.linear_cross_entropy_forward(h, w, t, None, reduction="mean",
                                                           memory_budget=budget, **opts)
        loss = rows.sum() / count
        del rows
        for x in grads:
            if x is not None:
                x.mul_(grad_loss)
    del loss, lse
    return grads


def _measure(monkeypatch, N, D, V, budget, target, dtype=torch.bfloat16):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from gptfast.kernels._interpreter import bf16_problem
    bf16_problem()  # the interpreter's bf16 self-test runs real tensors: before faking
    for name in KERNELS:
        monkeypatch.setattr(CE, name, _Stub())
    opts = dict(ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None)
    with configs.compile_target(target), FakeTensorMode():
        h = torch.empty(N, D, dtype=dtype, device="cuda")
        w = torch.empty(V, D, dtype=dtype, device="cuda")
        t = torch.empty(N, dtype=torch.int64, device="cuda")
        with AllocationCounter() as counter:
            counter.inputs(h, w, t)
            grads = _step(h, w, t, budget, opts)
        assert [tuple(x.shape) for x in grads[:2]] == [(N, D), (V, D)]
        assert grads[0].dtype == grads[1].dtype == dtype
    return counter.peak


@pytest.mark.parametrize("name,N,D,V,compiled_mib", SHAPES, ids=[s[0] for s in SHAPES])
def test_lean_plan_counts_the_real_allocations_and_meets_its_goal(monkeypatch, name, N, D, V,
                                                                  compiled_mib):
    grads = (N * D + V * D) * 2
    want = plan.plan(N, D, V, torch.bfloat16, None, target=H100)
    got = _measure(monkeypatch, N, D, V, None, H100)
    # The plan is an upper bound with at most its per-row allowance to spare.
    assert got <= want.peak <= got + plan.ROW_BYTES * N, (got / MiB, want)
    assert want.peak <= grads + 64 * MiB, (want.peak / MiB, grads / MiB)
    assert want.peak == gptfast.linear_cross_entropy_memory(N, D, V, dtype=torch.bfloat16) \
        or torch.cuda.is_available()  # the public function plans for the GPU it finds


@pytest.mark.parametrize("name,N,D,V,compiled_mib", SHAPES, ids=[s[0] for s in SHAPES])
def test_budgeted_plan_counts_the_real_allocations_and_meets_its_goal(monkeypatch, name, N, D,
                                                                      V, compiled_mib):
    grads = (N * D + V * D) * 2
    budget = gptfast.LINEAR_CE_BUDGET
    want = plan.plan(N, D, V, torch.bfloat16, budget, target=H100, fp32_dw=True)
    got = _measure(monkeypatch, N, D, V, budget, H100)
    assert got <= want.peak <= got + plan.ROW_BYTES * N, (got / MiB, want)
    assert want.peak <= grads + budget
    assert want.peak < compiled_mib * MiB / 2, (want.peak / MiB, compiled_mib / 2)


def test_lock_mode_plan_counts_its_locks(monkeypatch):
    """sm_80 has no bf16 atomics: the lean backward takes locks (one int32 per vocabulary tile
    and D block), and the plan counts them."""
    N, D, V = 8192, 4096, 128256
    want = plan.plan(N, D, V, torch.bfloat16, None, target=A100)
    assert want.dw_accumulation == "lock"
    got = _measure(monkeypatch, N, D, V, None, A100)
    assert got <= want.peak <= got + plan.ROW_BYTES * N
    assert want.peak <= (N * D + V * D) * 2 + 64 * MiB


def test_plan_rules():
    """The rules the plans rest on, on small numbers."""
    # dH chunks: <= DH_CHUNK_BYTES of fp32 rows, multiples of ROW_ALIGN, or all rows.
    assert plan.dh_chunk_rows(100, 4096) == 100
    rows = plan.dh_chunk_rows(8192, 4096)
    assert rows * 4096 * 4 <= plan.DH_CHUNK_BYTES and rows % plan.ROW_ALIGN == 0 and rows < 8192
    # Budgeted: an fp32 dW accumulator only within half the budget; the chunk from the rest.
    small = plan.budgeted_layout(4096, 768, 50257, torch.bfloat16, 384 * MiB, False)
    assert small.dw_fp32 and small.accumulators == 4 * 50257 * 768
    big = plan.budgeted_layout(4096, 4096, 128256, torch.bfloat16, 384 * MiB, False)
    assert not big.dw_fp32 and big.accumulators == 0
    for lay, (d, v) in ((small, (768, 50257)), (big, (4096, 128256))):
        assert lay.row_stride % plan.LOGIT_ROW_ALIGN == 0
        # Until the last chunk is freed, the 16-bit dW of an fp32 accumulation does not exist.
        deferred = v * d * 2 if lay.dw_fp32 else 0
        assert (lay.accumulators + plan.ROW_BYTES * 4096
                + lay.chunk_rows * lay.row_stride * 2) <= 384 * MiB + deferred
    # A budget under one row still gets one row; fp32 inputs never need an fp32 copy of dW.
    assert plan.budgeted_layout(10, 8, 1000, torch.bfloat16, 1, False).chunk_rows == 1
    assert not plan.budgeted_layout(10, 8, 1000, torch.float32, 1 << 30, False).dw_fp32


def test_public_memory_function_checks_its_arguments():
    with pytest.raises(ValueError, match="N"):
        gptfast.linear_cross_entropy_memory(-1, 8, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="dtype"):
        gptfast.linear_cross_entropy_memory(8, 8, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="memory_budget"):
        gptfast.linear_cross_entropy_memory(8, 8, 8, dtype=torch.bfloat16, memory_budget=-3)
    lean = gptfast.linear_cross_entropy_memory(1024, 64, 1000, dtype=torch.float32)
    assert lean >= (1024 * 64 + 1000 * 64) * 4
