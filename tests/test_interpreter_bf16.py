"""bf16 under the Triton interpreter: gptfast's fix (kernels/_interpreter.py) pinned against
direct computations, and the refusal when the fix is unavailable.

Every expected value here comes from torch or from exact float64 arithmetic, never from the
interpreter: tiny kernels run one kind of bf16 operation each and are compared element by
element (exactly where bf16 rounding is defined, within an ulp where the order of a sum is
not)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import gptfast  # noqa: E402
from gptfast.kernels import _interpreter as interp  # noqa: E402
from gptfast.kernels import attention as attn_kernels  # noqa: E402
from gptfast.kernels import cross_entropy as ce_kernels  # noqa: E402
from gptfast.ops import backends  # noqa: E402

pytestmark = pytest.mark.skipif(not interp.interpreting(),
                                reason="tests the Triton interpreter (TRITON_INTERPRET=1)")
BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def _bf16_right():
    assert interp.bf16_problem() is None, interp.bf16_problem()
    assert interp.bf16_state() in ("native", "patched")


def _nearest_bf16(x: float) -> float:
    """Correctly rounded bf16 of a float64 (normal range), ties to even, from first principles."""
    if x == 0 or not math.isfinite(x):
        return x
    _, e = math.frexp(x)             # |x| in [2**(e-1), 2**e)
    step = 2.0 ** (e - 8)            # bf16 keeps 8 significant bits
    return round(x / step) * step    # Python's round() ties to even


def _bits(t):
    return t.view(torch.int16)


# ---- products ------------------------------------------------------------------------------


@triton.jit
def _dot_kernel(A, B, C, OUT, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
                TRANS_B: tl.constexpr):
    rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(A + rm[:, None] * K + rk[None, :])
    if TRANS_B:  # B stored (N, K): load it transposed
        b = tl.trans(tl.load(B + rn[:, None] * K + rk[None, :]))
    else:
        b = tl.load(B + rk[:, None] * N + rn[None, :])
    acc = tl.load(C + rm[:, None] * N + rn[None, :])
    out = tl.dot(a, b, acc)
    tl.store(OUT + rm[:, None] * N + rn[None, :], out)


@pytest.mark.parametrize("trans_b", [False, True], ids=["b", "bT"])
def test_dot_bf16_is_a_bf16_to_fp32_matmul(trans_b):
    """The issue's measurement: a 32x32x32 bf16 dot was off by ~5e10 (bit patterns multiplied)."""
    M, N, K = 32, 16, 32
    gen = torch.Generator().manual_seed(0)
    a = (torch.randn(M, K, generator=gen) * 3).to(BF16)
    b = torch.randn(K, N, generator=gen).to(BF16)
    c = torch.randn(M, N, generator=gen)  # fp32 accumulator going in
    out = torch.full((M, N), float("nan"))
    b_arg = b.t().contiguous() if trans_b else b
    _dot_kernel[(1,)](a, b_arg, c, out, M=M, N=N, K=K, TRANS_B=trans_b)
    want = a.double() @ b.double() + c.double()  # exact products, float64 sums
    # fp32 accumulation of 32 exact products: a few fp32 ulps of the magnitudes involved.
    bound = 32 * torch.finfo(torch.float32).eps * (a.double().abs() @ b.double().abs() + 1).max()
    assert (out.double() - want).abs().max().item() <= bound.item()
    torch.testing.assert_close(out, a.float() @ b.float() + c, rtol=1e-5, atol=1e-5)


# ---- elementwise, comparisons, casts ---------------------------------------------------------


@triton.jit
def _elementwise_kernel(X, Y, Z, OUT, CMP, N: tl.constexpr):
    r = tl.arange(0, N)
    x = tl.load(X + r)
    y = tl.load(Y + r)
    tl.store(OUT + 0 * N + r, x + y)
    tl.store(OUT + 1 * N + r, x - y)
    tl.store(OUT + 2 * N + r, x * y)
    tl.store(OUT + 3 * N + r, x / y)
    tl.store(OUT + 4 * N + r, x * 0.1)          # Python float: cast to bf16 first
    tl.store(OUT + 5 * N + r, x + 1.0)
    tl.store(OUT + 6 * N + r, tl.maximum(x, y))
    tl.store(OUT + 7 * N + r, tl.minimum(x, y))
    tl.store(OUT + 8 * N + r, -x)
    tl.store(OUT + 9 * N + r, tl.abs(x))
    tl.store(OUT + 10 * N + r, tl.where(x > y, x, y * 2.0))
    tl.store(OUT + 11 * N + r, tl.full([N], 3.3, tl.bfloat16))
    tl.store(OUT + 12 * N + r, tl.clamp(x, -0.5, 0.5))
    z = tl.load(Z + r)  # moderate magnitudes: x * y + z is exact in float64
    tl.store(OUT + 13 * N + r, tl.fma(z, z * 0.5, y))
    tl.store(CMP + 0 * N + r, (x < y).to(tl.int8))
    tl.store(CMP + 1 * N + r, (x == y).to(tl.int8))
    tl.store(CMP + 2 * N + r, (x >= 0.5).to(tl.int8))


def _bf16_samples(n, gen):
    """Negative and positive values over many binades, exact ties of the ops, subnormals."""
    x = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-20, 20, (n,), generator=gen))
    x[:4] = torch.tensor([0.0, -0.0, 2.0 ** -130, -(2.0 ** -128)])
    return x.to(BF16)


def test_elementwise_and_comparisons_round_like_torch():
    """torch computes each bf16 op in fp32 and rounds to nearest even: the bf16 result is
    the correctly rounded one, so the interpreter must match it bit for bit."""
    N = 256
    gen = torch.Generator().manual_seed(1)
    x, y = _bf16_samples(N, gen), _bf16_samples(N, gen)
    y[y == 0] = 1.5
    y[10], x[10] = x[10], x[10]  # an equal pair for ==
    z = torch.randn(N, generator=gen).to(BF16)
    out = torch.full((14, N), float("nan")).to(BF16)
    cmp = torch.full((3, N), -1, dtype=torch.int8)
    _elementwise_kernel[(1,)](x, y, z, out, cmp, N=N)
    c = lambda v: torch.tensor(v).to(BF16)  # noqa: E731 - a Python float as Triton types it
    want = [x + y, x - y, x * y, x / y, x * c(0.1), x + c(1.0), torch.maximum(x, y),
            torch.minimum(x, y), -x, x.abs(), torch.where(x > y, x, y * c(2.0)),
            torch.full((N,), 3.3).to(BF16), x.clamp(-0.5, 0.5)]
    for i, w in enumerate(want):
        assert torch.equal(_bits(out[i]), _bits(w)), (i, out[i][:8], w[:8])
    # fma: one rounding of the exact z * (z/2) + y (Triton fuses; torch would round twice).
    half = (z * c(0.5)).double()
    want_fma = [_nearest_bf16(a * b + d) for a, b, d in
                zip(z.double().tolist(), half.tolist(), y.double().tolist())]
    ok = y.double().abs() < 2.0 ** 20  # keep the exactness of the float64 sum
    assert torch.equal(out[13][ok].double(), torch.tensor(want_fma, dtype=torch.float64)[ok])
    assert torch.equal(cmp[0], (x < y).to(torch.int8))
    assert torch.equal(cmp[1], (x == y).to(torch.int8))
    assert torch.equal(cmp[2], (x >= 0.5).to(torch.int8))


@triton.jit
def _cast_kernel(F32, I32, F16, F64, TO_BF16, BF, FROM_BF16, N: tl.constexpr):
    r = tl.arange(0, N)
    tl.store(TO_BF16 + 0 * N + r, tl.load(F32 + r).to(tl.bfloat16))
    tl.store(TO_BF16 + 1 * N + r, tl.load(I32 + r).to(tl.bfloat16))
    tl.store(TO_BF16 + 2 * N + r, tl.load(F16 + r).to(tl.bfloat16))
    tl.store(TO_BF16 + 3 * N + r, tl.load(F64 + r).to(tl.bfloat16))
    tl.store(TO_BF16 + 4 * N + r, tl.load(F32 + r).to(tl.bfloat16, fp_downcast_rounding="rtz"))
    bf = tl.load(BF + r)
    tl.store(FROM_BF16 + 0 * N + r, bf.to(tl.float32))
    tl.store(FROM_BF16 + 1 * N + r, bf.to(tl.float16).to(tl.float32))
    tl.store(FROM_BF16 + 2 * N + r, bf.to(tl.int32).to(tl.float32))
    tl.store(FROM_BF16 + 3 * N + r, bf.to(tl.float64).to(tl.float32))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # 1e30 -> int32 overflows, as on a GPU
def test_casts_round_to_nearest_even():
    N = 64
    gen = torch.Generator().manual_seed(2)
    # fp32: exact ties (both parities), just off ties, NaN with a low payload (truncating
    # would give inf), overflow past bf16's max, infinities, subnormals.
    hi = torch.arange(0x3F80, 0x3F80 + N, dtype=torch.int32) << 16
    lo = torch.tensor([0x8000, 0x8000, 0x8001, 0x7FFF], dtype=torch.int32).repeat(N // 4)
    f32 = (hi + lo).view(torch.float32).clone()
    specials = [float("nan"), float("inf"), -float("inf"), 3.3961e38, -3.4e38, 2.0 ** -140,
                -(2.0 ** -135), 1e-45]
    f32[:len(specials)] = torch.tensor(specials)
    f32.view(torch.int32)[0] = 0x7F800001  # NaN whose payload is only in the low bits
    # int32: values where rounding to fp32 first would round twice (2**25 + 2**17 + 1 lies
    # just above a bf16 tie; fp32 would land exactly on the tie and then round to even).
    i32 = torch.randint(-2**31, 2**31 - 1, (N,), generator=gen, dtype=torch.int64).to(torch.int32)
    i32[:4] = torch.tensor([2**25 + 2**17 + 1, -(2**25 + 2**17 + 1), 2**24 + 1, 257])
    f16 = (torch.randn(N, generator=gen) * 100).to(torch.float16)
    f64 = torch.randn(N, generator=gen, dtype=torch.float64) * 1e3
    f64[0] = 1.0 + 2.0 ** -8 + 2.0 ** -40  # just above a tie, by less than fp32 can hold
    bf = _bf16_samples(N, gen)
    bf[:3] = torch.tensor([1e30, -7.5, 257.0]).to(BF16)
    to_bf16 = torch.full((5, N), float("nan")).to(BF16)
    from_bf16 = torch.full((4, N), float("nan"))
    _cast_kernel[(1,)](f32, i32, f16, f64, to_bf16, bf, from_bf16, N=N)

    nan = torch.isnan(f32)
    assert torch.isnan(to_bf16[0][nan]).all()
    assert torch.equal(_bits(to_bf16[0][~nan]), _bits(f32[~nan].to(BF16)))  # torch: RNE
    want_i = torch.tensor([_nearest_bf16(float(v)) for v in i32.tolist()]).to(BF16)
    assert torch.equal(to_bf16[1], want_i)
    assert to_bf16[1][0].item() == 2**25 + 2**18  # correctly rounded, not double rounded
    assert torch.equal(_bits(to_bf16[2]), _bits(f16.float().to(BF16)))
    want_d = torch.tensor([_nearest_bf16(v) for v in f64.tolist()]).to(BF16)
    assert torch.equal(to_bf16[3], want_d)
    assert to_bf16[3][0].item() == 1.0 + 2.0 ** -7
    # Round toward zero: drop the low half of the fp32 (finite values).
    fin = torch.isfinite(f32)
    rtz = (f32[fin].view(torch.int32) >> 16).to(torch.int16)
    assert torch.equal(_bits(to_bf16[4][fin]), rtz)

    assert torch.equal(from_bf16[0], bf.float())  # exact widening
    assert torch.equal(from_bf16[1], bf.to(torch.float16).float())
    assert torch.equal(from_bf16[2][1:], bf[1:].float().trunc())  # 1e30 overflows int32: skip
    assert torch.equal(from_bf16[3], bf.float())


# ---- reductions, scans, atomics ----------------------------------------------------------------


@triton.jit
def _reduce_kernel(X, RED, IDX, CUM, R: tl.constexpr, C: tl.constexpr):
    rr, rc = tl.arange(0, R), tl.arange(0, C)
    x = tl.load(X + rr[:, None] * C + rc[None, :])
    tl.store(RED + 0 * R + rr, tl.sum(x, axis=1))
    tl.store(RED + 1 * R + rr, tl.max(x, axis=1))
    tl.store(RED + 2 * R + rr, tl.min(x, axis=1))
    tl.store(IDX + rr, tl.argmax(x, axis=1))
    tl.store(CUM + rr[:, None] * C + rc[None, :], tl.cumsum(x, axis=1))


def test_reductions_and_scans():
    R, C = 8, 64
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(R, C, generator=gen) * 10).to(BF16)
    red = torch.full((3, R), float("nan")).to(BF16)
    idx = torch.full((R,), -1, dtype=torch.int32)
    cum = torch.full((R, C), float("nan")).to(BF16)
    _reduce_kernel[(1,)](x, red, idx, cum, R=R, C=C)
    # max/min/argmax are exact; a sum is rounded once from an fp32 accumulation (the GPU's
    # order differs): within one bf16 ulp of the exact sum.
    assert torch.equal(red[1], x.max(dim=1).values) and torch.equal(red[2], x.min(dim=1).values)
    assert torch.equal(idx.long(), x.float().argmax(dim=1))
    exact = x.double().sum(dim=1)
    ulp = torch.exp2(torch.floor(torch.log2(exact.abs())) - 7)
    assert ((red[0].double() - exact).abs() <= ulp).all(), (red[0], exact)
    exact_cum = x.double().cumsum(dim=1)
    ulp_cum = torch.exp2(torch.floor(torch.log2(exact_cum.abs().clamp_min(1e-30))) - 7)
    assert ((cum.double() - exact_cum).abs() <= ulp_cum).all()


@triton.jit
def _atomic_kernel(X, ACC, OLD, N: tl.constexpr, SLOTS: tl.constexpr):
    r = tl.arange(0, N)
    old = tl.atomic_add(ACC + r % SLOTS, tl.load(X + r), mask=r < N - 3)
    tl.store(OLD + r, old, mask=r < N - 3)


@pytest.mark.parametrize("slots", [64, 5], ids=["distinct", "colliding"])
def test_atomic_add_rounds_each_add(slots):
    """Each atomic add rounds to bf16; colliding adds happen one after the other, in order."""
    N = 64
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(N, generator=gen).to(BF16)
    acc0 = torch.randn(slots, generator=gen).to(BF16)
    acc = acc0.clone()
    olds = []
    for _ in range(2):  # two launches: the second adds on top of the first
        old = torch.full((N,), float("nan")).to(BF16)
        _atomic_kernel[(1,)](x, acc, old, N=N, SLOTS=slots)
        olds.append(old)
    want, want_olds = acc0.clone(), []
    for _ in range(2):
        want_old = torch.full((N,), float("nan")).to(BF16)
        for i in range(N - 3):  # the masked-off tail adds nothing
            want_old[i] = want[i % slots]
            want[i % slots] = (want[i % slots].float() + x[i].float()).to(BF16)
        want_olds.append(want_old)
    assert torch.equal(_bits(acc), _bits(want))
    for got, w in zip(olds, want_olds):  # the values each add found
        assert torch.equal(_bits(got[:N - 3]), _bits(w[:N - 3]))


# ---- the decision: native, patched, or refused -------------------------------------------------


def test_installed_triton_is_probed_and_fixed_in_a_fresh_process():
    """In a fresh interpreter process: the self-test of the unpatched Triton either passes
    (a Triton that computes bf16 right: nothing to fix) or names what is wrong, and after
    the fix it passes."""
    code = ("import json, os; os.environ['TRITON_INTERPRET'] = '1'\n"
            "from gptfast.kernels import _interpreter as I\n"
            "try:\n    first = I._self_test()\nexcept Exception as e:\n"
            "    first = ['crash: ' + repr(e)[:200]]\n"
            "I._apply_patch()\n"
            "print(json.dumps({'first': first, 'second': I._self_test()}))\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["second"] == [], out
    # Triton 3.6-3.8 are wrong (and crash on bf16 * Python float); the state says so.
    assert (out["first"] == []) == (interp.bf16_state() == "native"), out


def _bf16_qkv(requires_grad=False):
    return [torch.randn(1, 2, 16, 32).to(BF16).requires_grad_(requires_grad) for _ in range(3)]


@pytest.mark.parametrize("how", ["patch_fails", "still_wrong"])
def test_bf16_is_refused_with_a_clear_error_when_the_fix_is_unavailable(monkeypatch, how):
    """Simulated: an interpreter whose internals the fix does not know, or one that is still
    wrong after it. bf16 is refused everywhere; fp32 keeps working."""
    monkeypatch.setattr(interp, "_state", None)
    monkeypatch.setattr(interp, "_problem", None)
    monkeypatch.setattr(backends, "_DECISIONS", {})  # decisions cached before the simulation
    monkeypatch.setattr(interp, "_self_test", lambda: ["tl.dot on bf16 off by 5.2e+10"])
    if how == "patch_fails":
        def _no_patch():
            raise RuntimeError("the Triton interpreter's internals differ from the ones gptfast "
                               "patches (missing: binary_op)")
        monkeypatch.setattr(interp, "_apply_patch", _no_patch)
        expected = "could not be applied"
    else:
        monkeypatch.setattr(interp, "_apply_patch", lambda: None)
        expected = "even with gptfast's fix"

    problem = interp.bf16_problem()
    assert problem is not None and expected in problem and "tl.dot on bf16" in problem
    assert interp.bf16_state() == "refused"
    q, k, v = _bf16_qkv()
    with pytest.raises(interp.Bf16InterpreterError, match="bf16 tensors cannot run under the "
                                                          "Triton interpreter.*" + expected):
        attn_kernels.attention_forward(q, k, v, causal=True, softmax_scale=0.2)
    h, w = torch.randn(8, 16).to(BF16), torch.randn(40, 16).to(BF16)
    t = torch.randint(0, 40, (8,))
    with pytest.raises(interp.Bf16InterpreterError):
        ce_kernels.linear_cross_entropy_forward(h, w, t, None, ignore_index=-100,
                                                label_smoothing=0.0, z_loss=0.0, softcap=None,
                                                reduction="none")
    with pytest.raises(interp.Bf16InterpreterError):
        ce_kernels.cross_entropy_forward(h @ w.t(), t, ignore_index=-100, label_smoothing=0.0,
                                         z_loss=0.0, softcap=None)

    # The backend choice says why, and asking for Triton by name fails with that reason.
    decision = gptfast.explain(gptfast.attention, q, k, v, backend="torch")
    assert expected in decision.reasons["triton"] and "tl.dot on bf16" in str(decision)
    with pytest.raises(backends.BackendError, match=expected):
        gptfast.attention(q, k, v, backend="triton")
    with pytest.raises(backends.BackendError, match=expected):
        gptfast.linear_cross_entropy(h, w, t, backend="triton")
    assert "refused" in backends.report()
    # fp32 and fp16 are not affected.
    out = gptfast.attention(*(x.float() for x in (q, k, v)), backend="triton")
    assert out.dtype == torch.float32 and out.isfinite().all()
    assert gptfast.explain(gptfast.attention, *(x.half() for x in (q, k, v))
                           ).reasons["triton"] is None


def test_explain_says_triton_runs_bf16_when_right():
    q, k, v = _bf16_qkv()
    assert gptfast.explain(gptfast.attention, q, k, v).reasons["triton"] is None
    assert "bf16 under the interpreter" in backends.report()


def test_hook_ignores_other_dtypes(monkeypatch):
    monkeypatch.setattr(interp, "bf16_problem", lambda: "broken")
    interp.ensure_bf16(torch.zeros(2), torch.zeros(2).half(), None)  # no bf16: no question
    with pytest.raises(interp.Bf16InterpreterError, match="broken"):
        interp.ensure_bf16(torch.zeros(2), torch.zeros(2).to(BF16))
