"""The CUDA C++ cross-entropy kernels (csrc/cross_entropy/) through their direct entry points, run
on the CPU execution layer under every thread/block order, against the float64 oracle of
tests/_ce_ref.py. Inputs get NaN guard bands and outputs are NaN-poisoned by the layer itself
(csrc/sim/guards.h), so an element a kernel forgets to write, or one it reads from outside an
input, fails the comparison."""
import pytest
import torch

from _ce_ref import ce_reference, linear_ce_reference
from _cuda_sim import bits_equal, sim, under_orders
from gptfast import cuda_sim

pytestmark = pytest.mark.cuda_sim
IGNORE = -100
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
OPTIONS = {
    "plain": dict(label_smoothing=0.0, z_loss=0.0, softcap=None),
    "smoothing": dict(label_smoothing=0.1, z_loss=0.0, softcap=None),
    "zloss_softcap": dict(label_smoothing=0.0, z_loss=1e-3, softcap=4.0),
    "everything": dict(label_smoothing=0.2, z_loss=1e-2, softcap=6.0),
}


def _args(o):
    return (IGNORE, o["label_smoothing"], o["z_loss"], o["softcap"])


def _targets(n, v, gen):
    t = torch.randint(0, v, (n,), generator=gen)
    t[0] = IGNORE
    t[n // 2] = IGNORE
    return t


def _close(actual, expected, tol):
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol, rtol=tol)


# ---- cross-entropy over given logits -------------------------------------------------------------

@pytest.mark.cuda_sanitize
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("opts", sorted(OPTIONS))
@pytest.mark.parametrize("V", [40, 257, 1000])
def test_row_kernels_match_the_oracle(dtype, opts, V):
    o = OPTIONS[opts]
    gen = torch.Generator().manual_seed(V)
    N = 7
    x = (torch.randn(N, V, generator=gen) * 3).to(dtype)
    t = _targets(N, V, gen)
    g = torch.rand(N, generator=gen) + 0.5
    gl = torch.randn(N, generator=gen)
    m = sim()
    loss, lse = under_orders(lambda: m.cross_entropy_fwd(x, t, *_args(o)))
    dx = under_orders(lambda: m.cross_entropy_bwd(g, gl, x, t, lse, *_args(o)))
    rl, rlse, rdx = ce_reference(x, t, g, None, ignore_index=IGNORE, **o)
    valid = t != IGNORE
    _close(loss, rl, TOL[torch.float32])
    _close(lse[valid], rlse[valid], TOL[torch.float32])
    assert torch.all(loss[~valid] == 0) and torch.all(lse[~valid] == 0)
    # the lse gradient: d/dx sum(gl * lse) = gl * softmax (times the softcap factor)
    _, _, rdx_lse = ce_reference(x, t, torch.zeros(N), gl, ignore_index=IGNORE, **o)
    _close(dx, rdx + rdx_lse.where(valid[:, None], torch.zeros(())), TOL[dtype])
    assert torch.all(dx[~valid] == 0)


def test_row_kernel_out_of_range_targets_give_nan_rows():
    x = torch.randn(4, 300)
    t = torch.tensor([3, 300, -5, IGNORE])
    m = sim()
    loss, lse = m.cross_entropy_fwd(x, t, IGNORE, 0.0, 0.0, None)
    dx = m.cross_entropy_bwd(torch.ones(4), None, x, t, lse, IGNORE, 0.0, 0.0, None)
    assert loss[0].isfinite() and loss[1:3].isnan().all() and loss[3] == 0
    assert dx[0].isfinite().all() and dx[1:3].isnan().all() and torch.all(dx[3] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_row_kernels_take_strides_misalignment_and_broadcast_gradients(dtype):
    """A row stride wider than V, a start 2 elements off 16-byte alignment (the scalar path),
    a stride-0 upstream gradient."""
    gen = torch.Generator().manual_seed(3)
    wide = (torch.randn(6, 530, generator=gen) * 2).to(dtype)
    x = wide[:, 2:515]            # (6, 513), row stride 530, misaligned
    t = _targets(6, 513, gen)
    g = torch.full((), 0.7).expand(6)
    m = sim()
    loss, lse = under_orders(lambda: m.cross_entropy_fwd(x, t, IGNORE, 0.1, 0.0, None))
    dx = under_orders(lambda: m.cross_entropy_bwd(g, None, x, t, lse, IGNORE, 0.1, 0.0, None))
    rl, _, rdx = ce_reference(x, t, torch.full((6,), 0.7), None, ignore_index=IGNORE,
                              label_smoothing=0.1, z_loss=0.0, softcap=None)
    _close(loss, rl, TOL[torch.float32])
    _close(dx, rdx, TOL[dtype])


def test_inplace_backward_overwrites_the_logits_only():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 777, generator=gen).to(torch.bfloat16)
    t = _targets(5, 777, gen)
    m = sim()
    loss, lse = m.cross_entropy_fwd(x, t, IGNORE, 0.0, 1e-3, None)
    want = m.cross_entropy_bwd(torch.ones(5), None, x, t, lse, IGNORE, 0.0, 1e-3, None)
    buf = x.clone()
    m.cross_entropy_bwd_(torch.ones(5), None, buf, t, lse, IGNORE, 0.0, 1e-3, None)
    assert bits_equal(buf, want)


@pytest.mark.parametrize("call,message", [
    (lambda m, x, t: m.cross_entropy_fwd(x[0], t, IGNORE, 0.0, 0.0, None), "logits: expected shape"),
    (lambda m, x, t: m.cross_entropy_fwd(x.double(), t, IGNORE, 0.0, 0.0, None), "float32, float16 or bfloat16"),
    (lambda m, x, t: m.cross_entropy_fwd(x.t(), t, IGNORE, 0.0, 0.0, None), "contiguous"),
    (lambda m, x, t: m.cross_entropy_fwd(x, t.int(), IGNORE, 0.0, 0.0, None), "targets: expected int64"),
    (lambda m, x, t: m.cross_entropy_fwd(x, t[:2], IGNORE, 0.0, 0.0, None), "targets: expected shape"),
    (lambda m, x, t: m.cross_entropy_fwd(x, t, IGNORE, 1.5, 0.0, None), "label_smoothing"),
    (lambda m, x, t: m.cross_entropy_fwd(x, t, IGNORE, 0.0, -1.0, None), "z_loss"),
    (lambda m, x, t: m.cross_entropy_fwd(x, t, IGNORE, 0.0, 0.0, 0.0), "softcap"),
    (lambda m, x, t: m.cross_entropy_bwd(torch.ones(3), None, x, t, torch.zeros(4), IGNORE, 0.0, 0.0, None), "grad_rows: expected shape"),
    (lambda m, x, t: m.cross_entropy_bwd(None, None, x, t, torch.zeros(4).double(), IGNORE, 0.0, 0.0, None), "lse: expected fp32"),
])
def test_row_ops_reject_bad_inputs_with_clear_errors(call, message):
    x = torch.randn(4, 10)
    t = torch.randint(0, 10, (4,))
    with pytest.raises(RuntimeError, match=message):
        call(sim(), x, t)


# ---- linear cross-entropy ------------------------------------------------------------------------

def _lce_inputs(N, D, V, dtype, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, D, generator=gen) * 0.5).to(dtype)
    w = (torch.randn(V, D, generator=gen) * 0.5).to(dtype)
    b = (torch.randn(V, generator=gen) * 0.5).to(dtype) if bias else None
    t = _targets(N, V, gen)
    t[::9] = IGNORE
    return h, w, b, t


def _lce_check(h, w, b, t, o, dtype, g, gl=None, exact_bwd=False):
    m = sim()
    loss, lse = under_orders(lambda: m.linear_cross_entropy_fwd(h, w, t, b, *_args(o)))
    tol = TOL[dtype]
    # fp32 atomics sum in block order: across orders the 16-bit gradients may differ by an ulp
    ulp2 = 2 * torch.finfo(dtype).eps
    grads = under_orders(lambda: m.linear_cross_entropy_bwd(g, gl, h, w, t, b, lse, *_args(o)),
                         exact=exact_bwd, atol=ulp2, rtol=ulp2)
    rl, rlse, rdh, rdw, rdb = linear_ce_reference(h, w, t, b, g, gl, ignore_index=IGNORE, **o)
    valid = t != IGNORE
    _close(loss, rl, 1e-4)
    _close(lse[valid], rlse[valid], 1e-4)
    assert torch.all(loss[~valid] == 0) and torch.all(lse[~valid] == 0)
    dh, dw, db = grads
    _close(dh, rdh, tol)
    _close(dw, rdw, tol)
    if b is not None:
        _close(db, rdb, tol)
    else:
        assert db.numel() == 0
    return loss, lse, grads


@pytest.mark.cuda_sanitize
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("opts", sorted(OPTIONS))
@pytest.mark.parametrize("shape", [(70, 32, 257, True), (37, 40, 130, False), (20, 33, 70, True)],
                         ids=["aligned-bias", "aligned", "odd-D-bias"])
def test_linear_kernels_match_the_oracle(dtype, opts, shape):
    N, D, V, bias = shape
    h, w, b, t = _lce_inputs(N, D, V, dtype, bias, seed=N + D)
    g = torch.rand(N) + 0.5
    _lce_check(h, w, b, t, OPTIONS[opts], dtype, g)


def test_linear_lse_gradient_and_broadcast_row_gradient():
    h, w, b, t = _lce_inputs(45, 32, 200, torch.bfloat16, True, seed=5)
    _lce_check(h, w, b, t, OPTIONS["everything"], torch.bfloat16, torch.full((), 0.3).expand(45),
               gl=torch.randn(45))


def test_linear_strided_rows():
    """hidden rows with a stride wider than D (a slice of a bigger activation)."""
    h, w, b, t = _lce_inputs(30, 48, 150, torch.float16, False, seed=6)
    wide = torch.zeros(30, 64, dtype=torch.float16)
    wide[:, 8:56] = h
    _lce_check(wide[:, 8:56], w, b, t, OPTIONS["plain"], torch.float16, torch.ones(30))


@pytest.mark.parametrize("scratch", [64 << 10, 20 << 10, 4 << 10],
                         ids=["vocab-windows", "row-windows", "two-passes"])
def test_linear_backward_windows_give_the_same_gradients(scratch):
    """The bounded-scratch schedules (fp32 accumulators in windows) against the one-window one."""
    h, w, b, t = _lce_inputs(150, 32, 300, torch.bfloat16, True, seed=7)
    o = OPTIONS["zloss_softcap"]
    m = sim()
    _, lse = m.linear_cross_entropy_fwd(h, w, t, b, *_args(o))
    g = torch.rand(150) + 0.5
    full = m.linear_cross_entropy_bwd(g, None, h, w, t, b, lse, *_args(o))
    before = m._set_linear_scratch_bytes(scratch)
    try:
        windowed = m.linear_cross_entropy_bwd(g, None, h, w, t, b, lse, *_args(o))
    finally:
        m._set_linear_scratch_bytes(before)
    for a, e in zip(windowed, full):
        torch.testing.assert_close(a.float(), e.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("num_sms,arch", [(1, 80), (64, 90)])
def test_linear_forward_vocabulary_splits_and_arch(num_sms, arch):
    h, w, b, t = _lce_inputs(40, 32, 500, torch.bfloat16, False, seed=8)
    with cuda_sim.settings(num_sms=num_sms, arch=arch):
        _lce_check(h, w, b, t, OPTIONS["smoothing"], torch.bfloat16, torch.ones(40))


@pytest.mark.parametrize("reduction", [1, 2], ids=["mean", "sum"])
def test_linear_fwd_grad_for_a_unit_upstream_gradient(reduction):
    h, w, b, t = _lce_inputs(33, 32, 100, torch.bfloat16, True, seed=10)
    o = OPTIONS["everything"]
    loss, lse, dh, dw, db = sim().linear_cross_entropy_fwd_grad(h, w, t, b, *_args(o), reduction,
                                                               1 << 30)
    n_valid = int((t != IGNORE).sum())
    g = torch.full((33,), 1.0 / n_valid if reduction == 1 else 1.0)
    rl, _, rdh, rdw, rdb = linear_ce_reference(h, w, t, b, g, None, ignore_index=IGNORE, **o)
    _close(loss, rl.sum() / (n_valid if reduction == 1 else 1), 1e-4)
    for a, e in ((dh, rdh), (dw, rdw), (db, rdb)):
        _close(a, e, TOL[torch.bfloat16])


def test_linear_all_rows_ignored():
    h, w, b, t = _lce_inputs(10, 32, 64, torch.bfloat16, True, seed=11)
    t[:] = IGNORE
    m = sim()
    loss, lse = m.linear_cross_entropy_fwd(h, w, t, b, *_args(OPTIONS["plain"]))
    dh, dw, db = m.linear_cross_entropy_bwd(torch.ones(10), None, h, w, t, b, lse,
                                            *_args(OPTIONS["plain"]))
    assert torch.all(loss == 0) and torch.all(lse == 0)
    assert torch.all(dh == 0) and torch.all(dw == 0) and torch.all(db == 0)


@pytest.mark.parametrize("call,message", [
    (lambda m, h, w, t: m.linear_cross_entropy_fwd(h.float(), w.float(), t, None, IGNORE, 0.0, 0.0, None),
     "float32 is not supported by the CUDA backend.*mma.sync.*TF32"),
    (lambda m, h, w, t: m.linear_cross_entropy_fwd(h, w.half(), t, None, IGNORE, 0.0, 0.0, None),
     "weight: expected dtype"),
    (lambda m, h, w, t: m.linear_cross_entropy_fwd(h, w[:, :5], t, None, IGNORE, 0.0, 0.0, None),
     "weight: expected shape"),
    (lambda m, h, w, t: m.linear_cross_entropy_fwd(h, w, t, w[0], IGNORE, 0.0, 0.0, None),
     "bias: expected shape"),
    (lambda m, h, w, t: m.linear_cross_entropy_fwd(h.t(), w, t, None, IGNORE, 0.0, 0.0, None),
     "weight: expected shape|last dimension contiguous"),
    (lambda m, h, w, t: m.linear_cross_entropy_fwd_grad(h, w, t, None, IGNORE, 0.0, 0.0, None, 0, 0),
     "reduction: expected 1"),
])
def test_linear_ops_reject_bad_inputs_with_clear_errors(call, message):
    h = torch.randn(4, 16).bfloat16()
    w = torch.randn(20, 16).bfloat16()
    t = torch.randint(0, 20, (4,))
    with pytest.raises(RuntimeError, match=message):
        call(sim(), h, w, t)
