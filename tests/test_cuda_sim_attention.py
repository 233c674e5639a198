"""The CUDA C++ attention kernels (csrc/attention/) executed on the CPU execution layer
(gptfast/cuda_sim.py), through their direct entry points and through `gptfast.attention(...,
backend="cuda")`, against the float64 oracle of tests/_attention_ref.py with FlashAttention's
tolerance rule (tests/_tolerance.py: 2x the same-dtype eager error for out / lse, 3x for
gradients). fp16 and bf16, head dims 64, 96 and 128, tiny odd shapes.

Poisoning and bounds come from the layer itself (csrc/sim/guards.h): every output is allocated
NaN-filled, every input is copied into NaN guard bands (with a NaN gap after every row), and the
bands must be intact after each launch, so an element a kernel forgets to write, or one it reads
from outside an input, fails the comparison or the launch.

Thread / block orders (tests/_cuda_sim.py ORDERS): the forward and the deterministic backward must
be bit-equal under every order (forward, reverse, random on two OS threads); the atomic backward's
fp32 dQ accumulator is shown to depend on the block order (the control)."""
import pytest
import torch

from _attention_ref import attention_grads, attention_ref, attention_references, padding_mask
from _cuda_sim import ORDERS, bits_equal, sim, under_orders
from _tolerance import assert_rule
from gptfast import cuda_sim

pytestmark = pytest.mark.cuda_sim

ATOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
GRAD_ATOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
FP16 = pytest.param(torch.float16, id="fp16")
BF16 = pytest.param(torch.bfloat16, id="bf16")
DTYPES = [FP16, BF16]


def run_case(*, B=1, Hq=2, Hkv=None, Sq=37, Sk=53, d=64, dtype=torch.bfloat16, causal=True,
             alibi=False, window=None, padding=None, dropout_p=0.0, dlse=False,
             deterministic=False, fused_qkv=False, do_ones=False, orders=ORDERS, seed=0):
    """Forward and backward of the CUDA kernels on the CPU layer, under each order in `orders`,
    checked against the float64 oracle. Returns (out, lse, (dq, dk, dv))."""
    Hkv = Hq if Hkv is None else Hkv
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    if fused_qkv:  # transposed slices of one (B, S, Hq + 2 Hkv, d) buffer: nothing contiguous
        assert Sq == Sk
        buf = randn(B, Sq, Hq + 2 * Hkv, d)
        q, k, v = (buf[:, :, :Hq].transpose(1, 2), buf[:, :, Hq:Hq + Hkv].transpose(1, 2),
                   buf[:, :, Hq + Hkv:].transpose(1, 2))
        assert not q.is_contiguous()
    else:
        q, k, v = randn(B, Hq, Sq, d), randn(B, Hkv, Sk, d), randn(B, Hkv, Sk, d)
    scale = d ** -0.5
    slopes = torch.rand(Hq, generator=gen) * 0.5 + 0.05 if alibi else None
    kpm = padding_mask(B, Sk, padding, "cpu") if padding else None
    seed_t = keep = None
    m = sim()
    if dropout_p > 0:
        seed_t = torch.tensor([1234 + seed], dtype=torch.int64)
        keep = m.attention_dropout_keep_mask(seed_t, B, Hq, Sq, Sk, dropout_p)
    opts = dict(causal=causal, softmax_scale=scale, alibi_slopes=slopes, window=window,
                key_padding_mask=kpm, dropout_p=dropout_p)
    args = (slopes, kpm, seed_t, causal, scale, window, dropout_p)

    out, lse = under_orders(lambda: m.attention_fwd(q, k, v, *args), orders=orders)
    assert out.dtype == dtype and out.shape == (B, Hq, Sq, d) and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == (B, Hq, Sq)
    leaves64, leaves_eager, (ref_o, ref_l), (eag_o, eag_l) = attention_references(
        q, k, v, keep=keep, dtype=dtype, **opts)
    assert_rule("out", out, ref_o, eag_o, 2, ATOL[dtype])
    assert_rule("lse", lse, ref_l, eag_l.float(), 2, ATOL[dtype])

    if do_ones:  # out.sum().backward(): an expanded scalar, every stride 0
        do = torch.ones((), dtype=dtype).expand(B, Hq, Sq, d)
    else:
        do = randn(B, Hq, Sq, d)
    dlse_t = torch.randn(B, Hq, Sq, generator=gen) if dlse else None
    # dK / dV have no atomics in either mode; dQ's fp32 atomics may round differently per order.
    grads = under_orders(
        lambda: m.attention_bwd(do, dlse_t, q, k, v, out, lse, *args, deterministic),
        orders=orders, exact=deterministic, atol=4 * GRAD_ATOL[dtype], rtol=0.0)

    ref_g = attention_grads(ref_o, ref_l, leaves64, do, dlse_t, torch.float64)
    eag_g = attention_grads(eag_o, eag_l, leaves_eager, do, dlse_t, dtype)
    for name, g, t, r, e in zip(("dq", "dk", "dv"), grads, (q, k, v), ref_g, eag_g):
        assert g.shape == t.shape and g.dtype == t.dtype and g.is_contiguous(), name
        assert_rule(name, g, r, e, 3, GRAD_ATOL[dtype])
    return out, lse, grads


def test_head_dims_match_the_python_side():
    from gptfast.ops.attention import CUDA_HEAD_DIMS
    assert tuple(sim().attention_head_dims()) == CUDA_HEAD_DIMS


# ---- the sanitizer subset (make test-cuda_sanitize: the layer's ASan + UBSan build, ~10x slower) --

SANITIZED = {
    "causal_sq<sk_d128": dict(Sq=37, Sk=53, d=128, dtype=torch.float16),
    "gqa_d96_atomic": dict(Hq=4, Hkv=1, Sq=21, Sk=34, d=96),
    "full_sq>sk_left_padding": dict(B=2, Sq=29, Sk=21, causal=False, padding="left"),
    "gqa_window_alibi_dlse_deterministic": dict(Hq=4, Hkv=2, Sq=23, Sk=30, window=9, alibi=True,
                                                dlse=True, deterministic=True),
    "dropout_empty_padding": dict(B=2, Hkv=1, Sq=19, Sk=26, padding="empty", dropout_p=0.3,
                                  dtype=torch.float16),
}


@pytest.mark.cuda_sanitize
@pytest.mark.parametrize("case", sorted(SANITIZED))
def test_sanitized_subset(case):
    run_case(**SANITIZED[case], orders=ORDERS[:1])


# ---- shapes: odd lengths, Sq != Sk both ways (bottom-right causal), non-causal ------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 96, 128])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", [(37, 53), (53, 37)], ids=["sq<sk", "sq>sk"])
def test_shapes(shape, causal, d, dtype):
    Sq, Sk = shape
    run_case(Sq=Sq, Sk=Sk, d=d, dtype=dtype, causal=causal, orders=ORDERS[:1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_order_multi_tile(dtype):
    """Several query tiles (fwd 128 rows) and key blocks (bwd 128 keys) under all three orders."""
    run_case(Sq=150, Sk=261, Hq=1, d=64, dtype=dtype, causal=True)


@pytest.mark.parametrize("d", [64, 96, 128])
def test_launches_within_sm90_limits_too(d):
    """The layer enforces the simulated arch's launch limits (default sm_80); the same
    configurations run under sm_90's."""
    with cuda_sim.settings(arch=90):
        run_case(Sq=40, Sk=70, d=d, Hq=2, Hkv=1, deterministic=True, orders=ORDERS[:1])


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_d96_multi_tile_every_order(deterministic):
    """d = 96 (the odd one: 12 chunks of 16 bytes a row, 6 mma k-steps) over several tiles."""
    run_case(Sq=140, Sk=170, Hq=2, Hkv=1, d=96, dtype=torch.float16, alibi=True,
             deterministic=deterministic)


def test_causal_more_queries_than_keys_gives_dead_rows_zeros():
    """Sq = 21 > Sk = 6, causal: the first 15 queries see no key: out 0, lse -inf, dq 0."""
    out, lse, (dq, _, _) = run_case(Sq=21, Sk=6, d=64, orders=ORDERS[:1])
    assert torch.all(out[:, :, :15] == 0) and torch.all(lse[:, :, :15] == float("-inf"))
    assert torch.all(dq[:, :, :15] == 0)


# ---- grouped-query attention, masks, ALiBi, window, dlse, strides -----------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hkv", [2, 1], ids=["gqa8:2", "mqa8:1"])
def test_gqa(hkv, dtype):
    run_case(Hq=8, Hkv=hkv, Sq=19, Sk=45, dtype=dtype, orders=ORDERS[:2])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding", ["right", "left", "empty"])
def test_key_padding(padding, dtype):
    out, lse, (dq, _, _) = run_case(B=2, Sq=23, Sk=41, dtype=dtype, causal=False, padding=padding,
                                    orders=ORDERS[:1])
    if padding == "empty":  # batch row 0 has no real key at all
        assert torch.all(out[0] == 0) and torch.all(lse[0] == float("-inf"))
        assert torch.all(dq[0] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_alibi(causal, dtype):
    run_case(Sq=29, Sk=47, d=128, dtype=dtype, causal=causal, alibi=True, orders=ORDERS[:1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window,shape", [(1, (33, 33)), (7, (40, 25)), (16, (25, 70))])
def test_window(window, shape, dtype):
    run_case(Sq=shape[0], Sk=shape[1], dtype=dtype, window=window, orders=ORDERS[:1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_window_alibi_padding_gqa_dlse(dtype):
    run_case(B=2, Hq=4, Hkv=2, Sq=31, Sk=50, dtype=dtype, window=12, alibi=True,
             padding="left", dlse=True, orders=ORDERS[:2])


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_fused_qkv_strides_and_stride0_dout(deterministic):
    run_case(B=2, Hq=2, Hkv=1, Sq=27, Sk=27, d=64, fused_qkv=True, do_ones=True,
             deterministic=deterministic, orders=ORDERS[:1])


# ---- dropout: Triton's Philox stream, regenerated in backward ---------------------------------

def test_philox_is_tritons_tl_rand():
    """common/random.h's philox_uniform against Triton's own tl.rand (its interpreter), counters
    past 2**32 included (the high word of the 64-bit offset)."""
    import triton
    import triton.language as tl

    @triton.jit
    def rand_kernel(seed, OFFSETS, OUT, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        offs = tl.load(OFFSETS + i, mask=i < n, other=0)
        tl.store(OUT + i, tl.rand(seed, offs), mask=i < n)

    gen = torch.Generator().manual_seed(5)
    offsets = torch.cat([torch.arange(40), torch.randint(0, 2**40, (88,), generator=gen)])
    for seed in (0, 1234, 2**31 - 2):
        want = torch.empty(offsets.numel())
        rand_kernel[(1,)](seed, offsets, want, offsets.numel(), BLOCK=128)
        got = sim()._test_philox(torch.full_like(offsets, seed), offsets)
        assert bits_equal(got, want), (seed, (got != want).sum().item())


def test_dropout_mask_is_the_triton_kernels_mask_and_has_the_right_rate():
    from gptfast.kernels import attention as A
    p = 0.3
    seed = torch.tensor([42], dtype=torch.int64)
    m = sim().attention_dropout_keep_mask(seed, 2, 3, 17, 45, p)
    assert m.dtype == torch.bool and m.shape == (2, 3, 17, 45)
    assert torch.equal(m, A.attention_dropout_keep_mask(seed, 2, 3, 17, 45, p, "cpu"))
    big = sim().attention_dropout_keep_mask(seed, 2, 2, 64, 100, p)
    sigma = (p * (1 - p) / big.numel()) ** 0.5
    assert abs(big.float().mean().item() - (1 - p)) < 6 * sigma
    other = sim().attention_dropout_keep_mask(seed + 1, 2, 2, 64, 100, p)
    assert (big != other).float().mean().item() > 0.3


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_matches_the_reference_with_the_same_mask(dtype, deterministic):
    """The forward and the backward (which regenerates the mask from the seed) both agree with
    the oracle given the mask the seed draws."""
    run_case(Hq=2, Hkv=1, Sq=30, Sk=41, dtype=dtype, dropout_p=0.25,
             deterministic=deterministic, orders=ORDERS[:2])


def test_dropout_window_alibi_padding_dlse():
    run_case(B=2, Hq=1, Sq=22, Sk=35, d=128, window=15, alibi=True, padding="right",
             dropout_p=0.4, dlse=True, orders=ORDERS[:1])


# ---- deterministic backward: bit-equal under different block orders; the atomic one is not ----

def test_deterministic_is_bitwise_repeatable_and_atomic_follows_block_order():
    """Sk = 300: three key blocks add into each dQ row. The deterministic backward is bit-equal
    under forward / reverse / random block orders (run_case checks it); the atomic backward's fp32
    dQ accumulator differs between forward and reverse block order (the control: the test would
    see it if the order did not reach the additions)."""
    kw = dict(Hq=2, Hkv=1, Sq=40, Sk=300, d=64, dtype=torch.float16, causal=False)
    run_case(**kw, deterministic=True)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, s, 64, generator=gen).half()
               for h, s in ((2, 40), (1, 300), (1, 300)))
    m = sim()
    args = (None, None, None, False, 0.125, None, 0.0)
    out, lse = m.attention_fwd(q, k, v, *args)
    do = torch.randn(1, 2, 40, 64, generator=gen).half()
    accs = []
    for order in ("forward", "reverse"):
        with cuda_sim.settings(block_order=order, thread_order="forward", workers=1, seed=0):
            accs.append(m._attention_dq_accum(do, None, q, k, v, out, lse, *args))
    torch.testing.assert_close(accs[0], accs[1], atol=1e-4, rtol=1e-4)
    assert not bits_equal(accs[0], accs[1])


# ---- through gptfast.attention(backend="cuda"): autograd, refusals, opcheck --------------------

def test_gptfast_attention_backend_cuda_matches_the_reference():
    import gptfast
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(2, 4, 19, 64, generator=gen).bfloat16().requires_grad_()
    k = torch.randn(2, 2, 33, 64, generator=gen).bfloat16().requires_grad_()
    v = torch.randn(2, 2, 33, 64, generator=gen).bfloat16().requires_grad_()
    slopes = torch.rand(4, generator=gen) * 0.3
    kpm = padding_mask(2, 33, "right", "cpu")
    opts = dict(causal=True, alibi_slopes=slopes, key_padding_mask=kpm, window=20)
    out, lse = gptfast.attention(q, k, v, **opts, return_lse=True, backend="cuda")
    do, dl = torch.randn(out.shape, generator=gen).bfloat16(), torch.randn(lse.shape, generator=gen)
    grads = torch.autograd.grad((out, lse), (q, k, v), (do, dl))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ro, rl = attention_ref(*leaves, **opts, softmax_scale=64 ** -0.5)
    rgrads = torch.autograd.grad((ro, rl), leaves, (do.double(), dl.double()))
    torch.testing.assert_close(out.double(), ro, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.double(), rl, atol=1e-4, rtol=1e-4)
    for g, r in zip(grads, rgrads):
        torch.testing.assert_close(g.double(), r, atol=4e-2, rtol=4e-2)


def test_gptfast_attention_cuda_dropout_is_reproducible_from_torch_manual_seed():
    import gptfast
    gen = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 2, 21, 64, generator=gen).half().requires_grad_() for _ in range(3))
    runs = []
    for _ in range(2):
        torch.manual_seed(77)
        out = gptfast.attention(q, k, v, dropout_p=0.3, backend="cuda")
        runs.append((out, *torch.autograd.grad(out.float().square().sum(), (q, k, v))))
    for a, b in zip(*runs):
        assert bits_equal(a, b)
    torch.manual_seed(77)  # the seed the op drew: the reference with the kernels' mask
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)
    keep = sim().attention_dropout_keep_mask(seed, 1, 2, 21, 21, 0.3)
    ro, _ = attention_ref(q.detach(), k.detach(), v.detach(), causal=True, softmax_scale=0.125,
                          dropout_p=0.3, keep=keep)
    torch.testing.assert_close(runs[0][0].double(), ro, atol=4e-3, rtol=4e-3)


def test_cuda_backend_refuses_what_its_kernels_do_not_support():
    import gptfast
    from gptfast.ops.backends import BackendError
    sim()  # the CPU layer registers the ops' CPU implementations
    x = torch.randn(1, 2, 8, 64)
    with pytest.raises(BackendError, match="mma.sync.*no fp32 form.*TF32"):
        gptfast.attention(x, x, x, backend="cuda")
    y = torch.randn(1, 2, 8, 32).half()
    with pytest.raises(BackendError, match=r"head dim 32 is not supported \(supported: \(64, 96, 128\)\)"):
        gptfast.attention(y, y, y, backend="cuda")
    # The op itself checks too (TORCH_CHECK), naming the argument.
    with pytest.raises(RuntimeError, match="cuda_attention_fwd: float32 is not supported"):
        torch.ops.gptfast.cuda_attention_fwd(x, x, x, None, None, None, True, 0.1, None, 0.0)
    with pytest.raises(RuntimeError, match="cuda_attention_fwd: head dim 32 has no CUDA kernel"):
        torch.ops.gptfast.cuda_attention_fwd(y, y, y, None, None, None, True, 0.1, None, 0.0)
    z = torch.randn(1, 2, 8, 64).half()
    with pytest.raises(RuntimeError, match="seed: dropout_p > 0 needs a seed"):
        torch.ops.gptfast.cuda_attention_fwd(z, z, z, None, None, None, True, 0.1, None, 0.5)
    # softcap (in the shared schema for the Triton kernels) is refused by name at both levels.
    with pytest.raises(BackendError, match="softcap is not supported by these kernels"):
        gptfast.attention(z, z, z, softcap=20.0, backend="cuda")
    with pytest.raises(RuntimeError, match="cuda_attention_fwd: softcap: not supported"):
        torch.ops.gptfast.cuda_attention_fwd(z, z, z, None, None, None, True, 0.1, None, 0.0,
                                             20.0)
    lse = torch.zeros(1, 2, 8)
    with pytest.raises(RuntimeError, match="cuda_attention_bwd: softcap: not supported"):
        torch.ops.gptfast.cuda_attention_bwd(z, None, z, z, z, z, lse, None, None, None, True, 0.1,
                                             None, 0.0, False, 20.0)
    # "auto" runs what it can run elsewhere; the CPU layer is never its choice.
    d = gptfast.explain(gptfast.attention, z, z, z)
    assert d.reasons["cuda"] is None and d.backend != "cuda"


def test_opcheck_cuda_attention_ops():
    gen = torch.Generator().manual_seed(13)
    q = torch.randn(1, 4, 9, 64, generator=gen).bfloat16()
    k, v = (torch.randn(1, 2, 13, 64, generator=gen).bfloat16() for _ in range(2))
    slopes = torch.rand(4, generator=gen)
    kpm = padding_mask(1, 13, "left", "cpu")
    seed = torch.tensor([5], dtype=torch.int64)
    ops = torch.ops.gptfast
    sim()
    fwd_args = (q, k, v, slopes, kpm, seed, True, 0.125, 6, 0.2)
    torch.library.opcheck(ops.cuda_attention_fwd, fwd_args)
    out, lse = ops.cuda_attention_fwd(*fwd_args)
    do = torch.randn(q.shape, generator=gen).bfloat16()
    for det in (False, True):
        torch.library.opcheck(ops.cuda_attention_bwd,
                              (do, torch.randn(lse.shape, generator=gen), q, k, v, out, lse,
                               slopes, kpm, seed, True, 0.125, 6, 0.2, det))


def test_cuda_and_triton_agree_dropout_included():
    """Both kernel backends draw the dropout mask from the same Philox stream, so with the same
    torch seed they compute the same function (to rounding): outputs and gradients."""
    import gptfast
    gen = torch.Generator().manual_seed(14)
    q = torch.randn(1, 4, 24, 64, generator=gen).half().requires_grad_()
    k, v = (torch.randn(1, 2, 37, 64, generator=gen).half().requires_grad_() for _ in range(2))
    do = torch.randn(1, 4, 24, 64, generator=gen).half()
    results = {}
    for backend in ("cuda", "triton"):
        torch.manual_seed(21)
        out = gptfast.attention(q, k, v, dropout_p=0.2, alibi_slopes=torch.full((4,), 0.1),
                                backend=backend)
        results[backend] = (out, *torch.autograd.grad(out, (q, k, v), do))
    for name, a, b in zip(("out", "dq", "dk", "dv"), results["cuda"], results["triton"]):
        torch.testing.assert_close(a.float(), b.float(), atol=4e-3, rtol=4e-3, msg=name)


def test_fullgraph_compile_through_the_cuda_attention_ops():
    import gptfast
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(15)
    q, k, v = (torch.randn(1, 2, 17, 64, generator=gen).bfloat16().requires_grad_()
               for _ in range(3))

    def f(q, k, v):
        out, lse = gptfast.attention(q, k, v, return_lse=True, backend="cuda")
        return out.float().square().sum() + lse.sum()
    eager = f(q, k, v)                         # also loads the CPU layer before tracing
    g_eager = torch.autograd.grad(eager, (q, k, v))
    compiled = torch.compile(f, fullgraph=True)(q, k, v)
    g_comp = torch.autograd.grad(compiled, (q, k, v))
    torch.testing.assert_close(compiled, eager)
    for a, e in zip(g_comp, g_eager):
        assert bits_equal(a, e)  # the same kernels on the same inputs


def test_auto_passes_cuda_over_until_measured_but_by_name_it_runs(monkeypatch):
    """The 'auto' policy (gptfast.ops.attention.CUDA_AUTO), decided as on a GPU machine where
    both kernel backends could run: 'auto' skips the CUDA kernels with the reason, naming them
    runs them, and flipping CUDA_AUTO lets 'auto' pick them."""
    import importlib
    from gptfast.ops import backends
    att = importlib.import_module("gptfast.ops.attention")  # the module (the package exports the function)
    monkeypatch.setitem(backends._AVAILABILITY, "cuda", lambda device: None)
    monkeypatch.setitem(backends._AVAILABILITY, "triton", lambda device: "not in this test")
    f = att.Facts(torch.bfloat16, 128, True, 20)
    gpu = torch.device("cuda")
    auto = backends._decide(att.OP, "auto", gpu, f)
    assert auto.backend == "torch" and "cuda" in auto.auto_skipped
    assert "by name only" in str(auto) and "CUDA_AUTO" in str(auto)
    assert backends._decide(att.OP, "cuda", gpu, f).backend == "cuda"
    monkeypatch.setattr(att, "CUDA_AUTO", True)
    assert backends._decide(att.OP, "auto", gpu, f).backend == "cuda"
    fp32 = backends._decide(att.OP, "cuda", gpu, att.Facts(torch.float32, 128, True, 20))
    assert fp32.error and "mma.sync" in fp32.error
