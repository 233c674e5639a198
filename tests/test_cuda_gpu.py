"""On a GPU (make gpu-check): each primitive of csrc/common/ on the hardware against the CPU
execution layer running the same test kernel, and the cross-entropy kernels of gptfast._C against
the layer and the float64 oracle. Data movement (shuffles, ldmatrix, cp.async) must be bit-equal;
arithmetic within stated tolerances: tensor cores sum in their own order (bit-equal only when every
partial sum is exact), ex2.approx is within 2 ulp, fp32 atomics and FMA contraction round
differently."""
import importlib

import pytest
import torch

from _ce_ref import ce_reference, linear_ce_reference
from _cuda_sim import sim

pytestmark = pytest.mark.gpu
IGNORE = -100


@pytest.fixture(scope="module")
def gpu():
    try:
        return importlib.import_module("gptfast._C")
    except ImportError as e:  # a GPU machine must have built it (make build-cuda)
        pytest.fail(f"gptfast._C is not built: {e}")


def both(gpu, name, *args):
    """(hardware result on the CPU, CPU-layer result) of test kernel `name`."""
    cuda_args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    hw = getattr(gpu, name)(*cuda_args).cpu()
    return hw, getattr(sim(), name)(*args)


def test_shuffles_bit_equal(gpu):
    hw, cpu = both(gpu, "_test_shuffles", torch.randn(128))
    assert torch.equal(hw, cpu)


@pytest.mark.parametrize("variant", range(6))
def test_ldmatrix_bit_equal(gpu, variant):
    src = torch.randint(-32768, 32767, (256,), dtype=torch.int16)
    hw, cpu = both(gpu, "_test_ldmatrix", src, variant, 24)
    assert torch.equal(hw, cpu)


@pytest.mark.parametrize("size,src_size", [(4, 4), (8, 5), (16, 16), (16, 7), (16, 0)])
def test_cp_async_bit_equal(gpu, size, src_size):
    src = torch.randint(0, 256, (64 * size,), dtype=torch.uint8)
    hw, cpu = both(gpu, "_test_cp_async", src, size, src_size)
    assert torch.equal(hw, cpu)


@pytest.mark.parametrize("bf16", [False, True])
def test_mma_bit_equal_when_exact_and_close_otherwise(gpu, bf16):
    ints = lambda n: torch.randint(-8, 9, (n,)).float()  # noqa: E731
    dtype = torch.bfloat16 if bf16 else torch.float16

    def frag(n):  # n 16-bit small integers packed two per int32
        bits = ints(2 * n).to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF
        regs = bits[0::2] | (bits[1::2] << 16)
        return (regs - ((regs >> 31) << 32)).to(torch.int32)
    a, b, c = frag(128).view(32, 4), frag(64).view(32, 2), ints(128).view(32, 4)
    hw, cpu = both(gpu, "_test_mma", a, b, c, bf16)
    assert torch.equal(hw, cpu)
    # random values: products exact, sums rounded by the tensor core in its own order
    rnd = lambda n: torch.randn(2 * n).to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF  # noqa: E731
    regs = lambda bits: ((bits[0::2] | (bits[1::2] << 16)) - (((bits[0::2] | (bits[1::2] << 16)) >> 31) << 32)).to(torch.int32)  # noqa: E731
    a, b, c = regs(rnd(128)).view(32, 4), regs(rnd(64)).view(32, 2), torch.randn(32, 4)
    hw, cpu = both(gpu, "_test_mma", a, b, c, bf16)
    torch.testing.assert_close(hw, cpu, atol=1e-5, rtol=2 ** -20)


def test_exp2_within_two_ulp(gpu):
    x = torch.linspace(-120, 120, 4097)
    hw, cpu = both(gpu, "_test_exp2", x)
    torch.testing.assert_close(hw, cpu, atol=0, rtol=2 * 2 ** -23)


def test_atomics_exact_on_integers(gpu):
    vals = torch.randint(-100, 101, (4096,)).float()
    hw, cpu = both(gpu, "_test_atomics", vals, 13)
    assert torch.equal(hw, cpu)


def test_reductions(gpu):
    x = torch.randn(8, 512)
    hw, cpu = both(gpu, "_test_reductions", x)
    torch.testing.assert_close(hw, cpu, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("V", [1000, 50257])
def test_row_kernels_on_the_gpu(gpu, dtype, V):
    N = 64 if V <= 4096 else 16  # the CPU layer runs the same launch: keep it a few seconds
    x = (torch.randn(N, V) * 3).to(dtype)
    t = torch.randint(0, V, (N,))
    t[::7] = IGNORE
    g = torch.rand(N) + 0.5
    args = (IGNORE, 0.1, 1e-3, 8.0)
    loss, lse = gpu.cross_entropy_fwd(x.cuda(), t.cuda(), *args)
    dx = gpu.cross_entropy_bwd(g.cuda(), None, x.cuda(), t.cuda(), lse, *args)
    s_loss, s_lse = sim().cross_entropy_fwd(x, t, *args)
    s_dx = sim().cross_entropy_bwd(g, None, x, t, s_lse, *args)
    torch.testing.assert_close(loss.cpu(), s_loss, atol=1e-5, rtol=1e-5)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(dx.cpu().float(), s_dx.float(), atol=tol, rtol=tol)
    rl, _, rdx = ce_reference(x, t, g, None, ignore_index=IGNORE, label_smoothing=0.1,
                              z_loss=1e-3, softcap=8.0)
    torch.testing.assert_close(loss.cpu().double(), rl, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N,D,V", [(300, 128, 1000), (1000, 768, 8192), (129, 72, 333)])
def test_linear_kernels_on_the_gpu(gpu, dtype, N, D, V):
    h = (torch.randn(N, D) * 0.5).to(dtype)
    w = (torch.randn(V, D) * 0.05).to(dtype)
    b = (torch.randn(V) * 0.1).to(dtype)
    t = torch.randint(0, V, (N,))
    t[::5] = IGNORE
    g = torch.rand(N) + 0.5
    args = (IGNORE, 0.1, 1e-4, 15.0)
    loss, lse = gpu.linear_cross_entropy_fwd(h.cuda(), w.cuda(), t.cuda(), b.cuda(), *args)
    dh, dw, db = gpu.linear_cross_entropy_bwd(g.cuda(), None, h.cuda(), w.cuda(), t.cuda(),
                                              b.cuda(), lse, *args)
    rl, rlse, rdh, rdw, rdb = linear_ce_reference(h, w, t, b, g, None, ignore_index=IGNORE,
                                                  label_smoothing=0.1, z_loss=1e-4, softcap=15.0)
    tol = {torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(loss.cpu().double(), rl, atol=1e-3, rtol=1e-3)
    for a, e in ((dh, rdh), (dw, rdw), (db, rdb)):
        torch.testing.assert_close(a.cpu().double(), e, atol=tol, rtol=tol)


# ---- attention (csrc/attention/) -----------------------------------------------------------------

ATTN_OPTIONS = {
    "causal": dict(causal=True),
    "full": dict(causal=False),
    "alibi_window_padding": dict(causal=True, alibi=True, window=100, padding=True),
    "dropout": dict(causal=True, dropout_p=0.2),
}


def _attention_case(B, Hq, Hkv, Sq, Sk, d, dtype, causal, alibi=False, window=None,
                    padding=False, dropout_p=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, d, generator=gen).to(dtype)
    k, v = (torch.randn(B, Hkv, Sk, d, generator=gen).to(dtype) for _ in range(2))
    slopes = torch.rand(Hq, generator=gen) * 0.3 + 0.02 if alibi else None
    kpm = None
    if padding:
        kpm = torch.ones(B, Sk, dtype=torch.bool)
        kpm[0, Sk * 2 // 3:] = False
    seed_t = torch.tensor([99 + seed], dtype=torch.int64) if dropout_p > 0 else None
    args = (slopes, kpm, seed_t, causal, d ** -0.5, window, dropout_p)
    return (q, k, v), args, torch.randn(B, Hq, Sq, d, generator=gen).to(dtype)


def _cuda(x):
    return x.cuda() if isinstance(x, torch.Tensor) else x


# (dtype, d, options, Sq, Sk): every option at every head dim in bf16, fp16 at two; kept to a
# dozen cases (gpu-check's pytest stage has about a minute for every GPU test).
ATTN_GPU_CASES = [(torch.bfloat16, d, o, *shape) for d in (64, 96, 128)
                  for o, shape in zip(sorted(ATTN_OPTIONS), [(1000, 1537), (777, 300)] * 2)]
ATTN_GPU_CASES += [(torch.float16, d, "causal", 777, 1300) for d in (64, 128)]


@pytest.mark.parametrize("dtype,d,opts,Sq,Sk", ATTN_GPU_CASES,
                         ids=[f"{str(c[0])[6:]}-d{c[1]}-{c[2]}-{c[3]}x{c[4]}" for c in ATTN_GPU_CASES])
def test_attention_kernels_on_the_gpu(gpu, dtype, d, opts, Sq, Sk):
    """gptfast._C's attention on the hardware against the float64 oracle (FlashAttention's rule,
    with the yardstick computed on the GPU in the same dtype); dropout with the mask the seed
    draws; deterministic dQ bit-equal across two runs and close to the atomic one."""
    from _attention_ref import attention_ref
    from _tolerance import assert_rule
    o = ATTN_OPTIONS[opts]
    (q, k, v), args, do = _attention_case(2, 8, 2, Sq, Sk, d, dtype, **o)
    slopes, kpm, seed_t, causal, scale, window, p = args
    gq, gk, gv, gdo = (x.cuda() for x in (q, k, v, do))
    gargs = tuple(_cuda(a) for a in args)
    out, lse = gpu.attention_fwd(gq, gk, gv, *gargs)
    keep = gpu.attention_dropout_keep_mask(gargs[2], 2, 8, Sq, Sk, p) if p > 0 else None
    ref_kw = dict(causal=causal, softmax_scale=scale, alibi_slopes=_cuda(slopes), window=window,
                  key_padding_mask=_cuda(kpm), dropout_p=p, keep=keep)
    leaves64 = [x.double().requires_grad_() for x in (gq, gk, gv)]
    leaves = [x.clone().requires_grad_() for x in (gq, gk, gv)]
    ro, rl = attention_ref(*leaves64, **ref_kw, dtype=torch.float64)
    eo, el = attention_ref(*leaves, **ref_kw, dtype=dtype)
    assert_rule("out", out, ro, eo, 2, 1e-3 if dtype == torch.float16 else 8e-3)
    assert_rule("lse", lse, rl, el.float(), 2, 1e-3)
    rg = torch.autograd.grad(ro, leaves64, gdo.double())
    eg = torch.autograd.grad(eo, leaves, gdo)
    atomic = gpu.attention_bwd(gdo, None, gq, gk, gv, out, lse, *gargs, False)
    det = gpu.attention_bwd(gdo, None, gq, gk, gv, out, lse, *gargs, True)
    det2 = gpu.attention_bwd(gdo, None, gq, gk, gv, out, lse, *gargs, True)
    for name, a, b, c, r, e in zip(("dq", "dk", "dv"), atomic, det, det2, rg, eg):
        atol = 2e-3 if dtype == torch.float16 else 1.6e-2
        assert_rule(name, a, r, e, 3, atol)
        assert_rule(name + " (deterministic)", b, r, e, 3, atol)
        assert torch.equal(b, c), f"{name}: deterministic backward not bit-repeatable"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_attention_on_the_gpu_matches_the_cpu_layer(gpu, dtype):
    """The same small launch on the hardware and on the CPU layer (tensor cores and ex2.approx
    round differently: close, not bit-equal); the dropout mask is bit-equal, and is the Triton
    kernels' mask for the same seed."""
    (q, k, v), args, do = _attention_case(1, 4, 2, 67, 130, 64, dtype, causal=True,
                                          alibi=True, padding=True, dropout_p=0.3, window=80)
    out, lse = gpu.attention_fwd(*(x.cuda() for x in (q, k, v)), *(_cuda(a) for a in args))
    s_out, s_lse = sim().attention_fwd(q, k, v, *args)
    torch.testing.assert_close(out.cpu().float(), s_out.float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(lse.cpu(), s_lse, atol=1e-4, rtol=1e-4)
    seed = args[2]
    hw_mask = gpu.attention_dropout_keep_mask(seed.cuda(), 1, 4, 67, 130, 0.3).cpu()
    assert torch.equal(hw_mask, sim().attention_dropout_keep_mask(seed, 1, 4, 67, 130, 0.3))
    from gptfast.kernels import attention as A
    assert torch.equal(hw_mask, A.attention_dropout_keep_mask(seed.cuda(), 1, 4, 67, 130, 0.3,
                                                              "cuda").cpu())


def test_attention_backend_cuda_through_gptfast_attention(gpu):
    import gptfast
    q, k, v = (torch.randn(2, 8, 1024, 128, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    out = gptfast.attention(q, k, v, backend="cuda")
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    ref = gptfast.attention(q, k, v, backend="triton")
    rgrads = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    for a, b in zip(grads, rgrads):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)
